"""The long run of the CLI and config fuzzer (tests/fuzz_cli.py; the suite runs its fast profile).

    python benchmarks/fuzz_cli.py --cases 10000 --json fuzz.json     # ~half mutated configs, half argument lists

Random (not derandomised) Hypothesis cases, in-process, bounded as tests/fuzz_cli.py describes (no case trains or
exports). Prints a progress line to stderr every PROGRESS_EVERY_S seconds (cases done, elapsed, exits so far), then
what it tried (cases per subcommand and outcome, distinct error messages) and every case that broke the failure
contract; exits 1 if any did. docs/reliability.md records a run (under an address-space cap, so that a case which
allocates without bound fails as exit 70 instead of pushing the machine into the OOM killer).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_cli import TALLY, argument_lists, build_zoo, mutated_configs, run_case, write_config  # noqa: E402

# A long run takes an hour or more on a small machine: say how far it got this often.
PROGRESS_EVERY_S = 30.0


class Progress:
    """Progress lines on stderr, flushed (a run under nohup or a pipe shows them as they come)."""

    def __init__(self, total: int):
        self.total, self.start, self.last = total, time.perf_counter(), time.perf_counter()

    def case_done(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        exits = Counter()
        for (_, outcome), count in TALLY.outcomes.items():
            exits[outcome] += count
        shown = ", ".join(f"{outcome} x {count}" for outcome, count in sorted(exits.items()))
        print(f"fuzz: {sum(exits.values())}/{self.total} cases, {now - self.start:.0f} s, exits so far: {shown}; "
              f"contract broken: {len(TALLY.failures)}; peak RSS {peak_rss_mb()} MB", file=sys.stderr, flush=True)


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000, help="total cases (half configs, half argument lists)")
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    args = parser.parse_args()
    long = settings(max_examples=args.cases // 2, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
    start = time.perf_counter()
    progress = Progress(args.cases)
    with tempfile.TemporaryDirectory(prefix="singer-fuzz-") as tmp:
        zoo = build_zoo(Path(tmp))

        @long
        @given(config=mutated_configs(zoo.paths), command=st.booleans())
        def configs(config, command):
            path = write_config(zoo, config)
            try:
                run_case(zoo, ["check-config", str(path)] if command else
                         ["run", str(path), "--out-dir", "runs/x", "--no-progress"])
            except AssertionError:
                TALLY.failures[-1]["config"] = config   # case.yaml is rewritten by the next case
                raise
            progress.case_done()

        @long
        @given(argv=argument_lists(zoo))
        def argument_lists_case(argv):
            run_case(zoo, argv)
            progress.case_done()

        for fuzz in (configs, argument_lists_case):
            try:
                fuzz()
            except AssertionError as err:   # recorded in TALLY.failures (Hypothesis re-raises the shrunk case)
                print(f"contract broken: {str(err)[:2000]}", file=sys.stderr, flush=True)
        progress.case_done(final=True)
    summary = {**TALLY.summary(), "seconds": round(time.perf_counter() - start),
               "peak_rss_mb": peak_rss_mb(),
               "host": f"{platform.node()} {platform.processor() or platform.machine()}",
               "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 1 if TALLY.failures else 0


if __name__ == "__main__":
    sys.exit(main())
