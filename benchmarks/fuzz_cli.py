"""The long run of the CLI and config fuzzer (tests/fuzz_cli.py; the suite runs its fast profile).

    python benchmarks/fuzz_cli.py --cases 10000 --json fuzz.json     # ~half mutated configs, half argument lists

Random (not derandomised) Hypothesis cases, in-process, bounded as tests/fuzz_cli.py describes (no case trains or
exports). Prints what it tried (cases per subcommand and outcome, distinct error messages) and every case that broke
the failure contract; exits 1 if any did. docs/reliability.md records a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_cli import TALLY, argument_lists, build_zoo, mutated_configs, run_case, write_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000, help="total cases (half configs, half argument lists)")
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    args = parser.parse_args()
    long = settings(max_examples=args.cases // 2, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="singer-fuzz-") as tmp:
        zoo = build_zoo(Path(tmp))

        @long
        @given(config=mutated_configs(zoo.paths), command=st.booleans())
        def configs(config, command):
            path = write_config(zoo, config)
            run_case(zoo, ["check-config", str(path)] if command else
                     ["run", str(path), "--out-dir", "runs/x", "--no-progress"])

        @long
        @given(argv=argument_lists(zoo))
        def argument_lists_case(argv):
            run_case(zoo, argv)

        for fuzz in (configs, argument_lists_case):
            try:
                fuzz()
            except AssertionError as err:   # recorded in TALLY.failures (Hypothesis re-raises the shrunk case)
                print(f"contract broken: {str(err)[:2000]}", file=sys.stderr)
    summary = {**TALLY.summary(), "seconds": round(time.perf_counter() - start),
               "host": f"{platform.node()} {platform.processor() or platform.machine()}",
               "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 1 if TALLY.failures else 0


if __name__ == "__main__":
    sys.exit(main())
