"""The CLI and config fuzzer (Hypothesis): random and mutated configs and random argument lists for every
subcommand, run in-process through the CLI's main(). The suite runs a fast profile (tests/test_fuzz_cli.py); the
long run is benchmarks/fuzz_cli.py, and docs/reliability.md records what it tried and found.

Each case asserts the failure contract (README "Exit codes", docs/reliability.md):
- the exit code is a documented one (0-5; argparse's usage errors are 2), never 70 (an internal error);
- no traceback on stderr unless -v was given;
- nothing is written outside the run's places: the fixture files (the zoo) change only inside run directories (a
  case may name a zoo run as its out_dir), and the working directory gains only run directories and export folders.

Bounded: a case never trains or exports. Everything before the run directory's work runs for real (argument
parsing, overrides, config validation, the preflight checks that build the models and open the data, taking the
run directory: marker, lock, stale temporaries); the first training step (`api._run_in`) and the first export
(`export_only.export_model`) raise Reached, which ends the case as "reached" (the README's other tests cover what
follows). Models are built once per (teacher, student, seed) and reused by later cases. Model sizes in mutated configs are either the tiny ones or absurd ones (fail at allocation), never
merely large, so no case builds a big model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import shutil
import typing
from collections import Counter
from pathlib import Path

import yaml
from hypothesis import strategies as st

from singer_deploy.config import RunConfig
from singer_deploy.pipeline import api, cli, export_only
from singer_deploy.pipeline.rundir import MARKER

from test_reliability import TINY

DOCUMENTED_EXITS = {0, 1, 2, 3, 4, 5}
SUBCOMMANDS = ("demo", "run", "distill", "check-config", "export", "bench", "doctor", "verify", "scan")

# The reliability tests' tiny run, exporting ONNX (so export settings are checked too).
BASE = {**TINY, "export": {"formats": ["onnx"], "benchmark": False}}


class Reached(BaseException):
    """A case got as far as training or exporting: the fuzzer stops it there (a BaseException, so main()'s
    exit-code handler does not turn it into a code)."""


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, nested sections included (train.lr, export.precision, ...)."""
    paths = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        paths.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            paths += _field_paths(hint, f"{prefix}{f.name}.")
    return paths


KEYS = _field_paths(RunConfig) + ["teacher.planted.depth", "teacher.planted.embed_dim", "student.kwargs.depth",
                                  "student.kwargs.img_size"]

# Numbers: edges, absurd sizes (fail at allocation or validation at once) and non-finite floats; never "merely
# large", which could build a big model or generate a big data set inside a fast test.
NUMBERS = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 7, 64, 2 ** 31, 2 ** 63, 10 ** 12, -10 ** 12, 10 ** 30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 70))
ODD_TEXT = st.one_of(st.text(max_size=24), st.sampled_from(
    ["", " ", "synthetic", "onnx", "fp16", "int8", "auto", "trt", "planted", "vit_tiny_patch16_224", "hf-hub:x/y",
     "local-dir:/nonexistent", "1e-3", "~", "..", "/", "\x00", "a" * 300, "runs/../..", "null", "[onnx", "{a: 1"]))


def scalars(zoo_paths: list[str]) -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), NUMBERS, ODD_TEXT, st.sampled_from(zoo_paths))


def values(zoo_paths: list[str]) -> st.SearchStrategy:
    leaf = scalars(zoo_paths)
    return st.one_of(leaf, st.lists(leaf, max_size=4), st.dictionaries(ODD_TEXT, leaf, max_size=3))


@st.composite
def mutated_configs(draw, zoo_paths: list[str]):
    """BASE with 1-4 mutations: a key set to an odd value, a key removed, an extra key, a section replaced; or,
    rarely, a whole document that is not a mapping."""
    if draw(st.integers(0, 19)) == 0:
        return draw(values(zoo_paths))
    config = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "set", "remove", "extra", "section"]))
        path = draw(st.sampled_from(KEYS)).split(".")
        section = config
        for part in path[:-1]:
            nxt = section.get(part) if isinstance(section, dict) else None
            if not isinstance(nxt, dict):
                nxt = {}
                if isinstance(section, dict):
                    section[part] = nxt
            section = nxt
        if kind == "set":
            section[path[-1]] = draw(values(zoo_paths))
        elif kind == "remove":
            section.pop(path[-1], None)
        elif kind == "extra":
            section[draw(ODD_TEXT)] = draw(scalars(zoo_paths))
        else:
            config[path[0]] = draw(values(zoo_paths))
    return config


def override_items(zoo_paths: list[str]) -> st.SearchStrategy:
    key = st.one_of(st.sampled_from(KEYS), ODD_TEXT)
    value = st.one_of(ODD_TEXT, scalars(zoo_paths).map(lambda v: json.dumps(v) if not isinstance(v, str) else v))
    return st.one_of(st.builds(lambda k, v: f"{k}={v}", key, value), ODD_TEXT)


FLAGS = {
    "demo": ["--out-dir", "--steps", "--overwrite", "--restart", "--no-progress"],
    "run": ["--out-dir", "--overwrite", "--restart", "--no-progress"],
    "distill": ["--out-dir", "--overwrite", "--restart", "--no-progress"],
    "check-config": ["--print"],
    "export": ["--weights", "--images", "--formats", "--precision", "--target", "--out", "--batch-sizes"],
    "bench": ["--formats", "--batch-sizes", "--threads", "--time-budget", "--json"],
    "doctor": [],
    "verify": [],
    "scan": ["--out", "--overwrite"],
}


@st.composite
def argument_lists(draw, zoo: "Zoo"):
    """A subcommand (or a stray word) and a random list of its flags, positionals, overrides and odd tokens."""
    command = draw(st.sampled_from([*SUBCOMMANDS, "frobnicate", "--help", "-v", "--version"]))
    token = st.one_of(st.sampled_from(FLAGS.get(command, []) + ["-v", "--bogus", "-"]) if FLAGS.get(command)
                      else st.sampled_from(["-v", "--bogus", "-"]),
                      st.sampled_from(zoo.paths + zoo.configs + zoo.runs), override_items(zoo.paths),
                      NUMBERS.map(str), ODD_TEXT)
    argv = [command] + draw(st.lists(token, max_size=6))
    # Most cases name a config or a source first, as a user would: the deeper paths get exercised.
    if command in ("run", "distill", "check-config") and draw(st.booleans()):
        argv.insert(1, draw(st.sampled_from(zoo.configs)))
    if command in ("export", "bench") and draw(st.booleans()):
        argv.insert(1, draw(st.sampled_from(zoo.runs + ["vit_tiny_patch16_224"])))
    if command == "demo" and "--steps" not in argv and draw(st.booleans()):
        argv += ["--steps", str(draw(NUMBERS))]
    return [str(a) for a in argv]


@dataclasses.dataclass
class Zoo:
    """Fixture files every case may point at (never to be changed by a case) and the working directory."""

    root: Path
    work: Path
    paths: list[str]         # odd files: empty, binary, a folder, a FIFO, a dangling link, a loop, /dev/zero ...
    configs: list[str]       # config files: the valid BASE and odd ones
    runs: list[str]          # a finished distill-only run, an unfinished one, folders that are not runs

    pristine: Path           # a copy of the zoo's run folders, to put back after a case that used one as out_dir

    def snapshot(self) -> dict[Path, tuple]:
        """Every entry of the zoo with its kind, size and mtime (links not followed)."""
        return {path: (info.st_mode, info.st_size, info.st_mtime_ns)
                for path in sorted(self.root.rglob("*")) for info in [path.lstat()]}

    def changes_outside_runs(self, before: dict[Path, tuple]) -> list[Path]:
        """Zoo entries a case changed outside run directories (a case may use a zoo run as its out_dir: with
        --overwrite it empties it). Run folders it changed are put back from the pristine copy."""
        after = self.snapshot()
        changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        runs = {p.parent for p in before.keys() | after.keys() if p.name == MARKER}
        outside = [p for p in changed if not ({p, *p.parents} & runs)]
        for top in {self.root / p.relative_to(self.root).parts[0] for p in changed if p not in outside}:
            shutil.rmtree(top, ignore_errors=True)
            if (self.pristine / top.name).is_dir():
                shutil.copytree(self.pristine / top.name, top)
        return sorted(outside)


def build_zoo(root: Path) -> Zoo:
    """The fixture files, plus one real finished distill-only run of BASE (a few seconds)."""
    zoo, work = root / "zoo", root / "work"
    zoo.mkdir()
    work.mkdir()
    (zoo / "empty.yaml").write_text("")
    (zoo / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (zoo / "folder").mkdir()
    (zoo / "folder" / "notes.txt").write_text("not a run's")   # a foreign folder: a run must refuse it
    (zoo / "images").mkdir()
    (zoo / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (zoo / "list.txt").write_text("images/broken.png\n/nonexistent.jpg\n")
    (zoo / "weights.safetensors").write_bytes(b"\x00" * 64)
    (zoo / "weights.pt").write_bytes(b"garbage")
    (zoo / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]\n")
    (zoo / "python_tag.yaml").write_text("teacher: !!python/object/apply:os.system ['true']\n")
    (zoo / "tabs.yaml").write_text("teacher:\n\tname: planted\n")
    (zoo / "list.yaml").write_text("- 1\n- 2\n")
    (zoo / "model.onnx").write_bytes(b"not onnx")
    (zoo / "model.xml").write_text("<net/>")
    os.mkfifo(zoo / "fifo")
    (zoo / "dangling").symlink_to(zoo / "nowhere")
    (zoo / "loop").symlink_to(zoo / "loop")
    (zoo / "no_read.yaml").write_text("teacher: {name: planted}\n")
    (zoo / "no_read.yaml").chmod(0)
    paths = sorted(str(p) for p in zoo.iterdir()) + ["/dev/zero", "/dev/null", "/proc/self/status",
                                                      str(zoo / "missing"), "relative/missing", ""]
    (zoo / "base.yaml").write_text(yaml.safe_dump(BASE))
    (zoo / "base_tiny_steps.yaml").write_text(yaml.safe_dump({**BASE, "out_dir": str(work / "runs" / "cfg")}))
    configs = [str(zoo / name) for name in ("base.yaml", "base_tiny_steps.yaml", "empty.yaml", "bomb.yaml",
                                            "python_tag.yaml", "tabs.yaml", "list.yaml", "binary.bin",
                                            "no_read.yaml")]
    finished = zoo / "finished"
    distill_only = {**BASE, "export": {"formats": [], "benchmark": False}}
    (zoo / "distill_only.yaml").write_text(yaml.safe_dump(distill_only))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["distill", str(zoo / "distill_only.yaml"), "--out-dir", str(finished), "--no-progress"])
    assert code == 0, "the zoo's finished run failed"
    unfinished = zoo / "unfinished"
    shutil.copytree(finished, unfinished)
    (unfinished / "manifest.json").unlink()
    foreign_manifest = zoo / "foreign"
    foreign_manifest.mkdir()
    (foreign_manifest / "manifest.json").write_text("{}")
    runs = [str(finished), str(unfinished), str(foreign_manifest), str(zoo / "folder"), str(zoo / "missing")]
    pristine = root / "pristine"
    for run in (finished, unfinished):
        shutil.copytree(run, pristine / run.name)
    return Zoo(zoo, work, paths, configs, runs, pristine)


@dataclasses.dataclass
class Tally:
    """What the fuzzer tried and what came out: cases per subcommand and outcome, distinct messages."""

    outcomes: Counter = dataclasses.field(default_factory=Counter)
    messages: set = dataclasses.field(default_factory=set)
    failures: list = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        by_command: dict[str, dict[str, int]] = {}
        for (command, outcome), count in sorted(self.outcomes.items()):
            by_command.setdefault(command, {})[outcome] = count
        return {"cases": sum(self.outcomes.values()), "by_command": by_command,
                "distinct_error_messages": len(self.messages), "failures": self.failures}


TALLY = Tally()


_BUILT: dict[str, api.Models] = {}


def _build_models_once(config):
    """api.build_models, kept per (teacher, student, seed): the same specs build the same models (seeded), and
    the preflight only reads them; building them again for every case would make a long run take hours."""
    key = repr((config.teacher, config.student, config.train.seed))
    if key not in _BUILT:
        _BUILT[key] = _REAL_BUILD(config)
    return _BUILT[key]


_REAL_BUILD = api.build_models


@contextlib.contextmanager
def bounded():
    """Stop a case where it would start training or exporting (see the module docstring); models built once."""
    def reached(*args, **kwargs):
        raise Reached
    saved = api._run_in, export_only.export_model, api.build_models
    api._run_in, export_only.export_model, api.build_models = reached, reached, _build_models_once
    try:
        yield
    finally:
        api._run_in, export_only.export_model, api.build_models = saved


def run_case(zoo: Zoo, argv: list[str]) -> tuple[str, str]:
    """Run `singer-deploy ARGV` in the work folder; returns (outcome, stderr). Checks the contract and records it."""
    before, entries = zoo.snapshot(), set(os.listdir(zoo.work))
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(zoo.work)
    try:
        with bounded(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                outcome = str(cli.main(argv))
            except SystemExit as stop:   # argparse: usage errors (2), --help and --version (0)
                outcome = str(stop.code if isinstance(stop.code, int) else 2)
            except Reached:
                outcome = "reached"
    finally:
        os.chdir(previous)
    err = stderr.getvalue()
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "other"
    TALLY.outcomes[(command, outcome)] += 1
    if outcome not in ("0", "reached"):
        TALLY.messages.add(err.strip().splitlines()[-1][:160] if err.strip() else "")
    problems = []
    if outcome != "reached" and int(outcome) not in DOCUMENTED_EXITS:
        problems.append(f"exit {outcome}")
    if "Traceback" in err and "-v" not in argv and "--verbose" not in argv:
        problems.append("a traceback without -v")
    outside = zoo.changes_outside_runs(before)
    if outside:
        problems.append(f"changed outside a run directory: {[str(p) for p in outside[:5]]}")
    new = set(os.listdir(zoo.work)) - entries
    if any(not _a_run_place(zoo.work / name) for name in new):
        problems.append(f"wrote outside a run directory: {sorted(new)}")
    _clean(zoo.work)
    if problems:
        TALLY.failures.append({"argv": argv, "problems": problems, "stderr": err[-2000:]})
    assert not problems, (argv, problems, err[-2000:])
    return outcome, err


def _a_run_place(path: Path) -> bool:
    """A run directory (marker or manifest), an export folder, or a folder holding only those."""
    if (path / ".singer-deploy-run.json").is_file() or (path / "manifest.json").is_file():
        return True
    if path.name in ("exports",) or path.name.startswith("export"):
        return True
    return path.is_dir() and not path.is_symlink() and all(_a_run_place(p) for p in path.iterdir())


def _clean(work: Path) -> None:
    """Empty the work folder between cases (each case starts from the same state)."""
    for entry in work.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def write_config(zoo: Zoo, config) -> Path:
    """A mutated config as a YAML file next to the zoo (not in it: cases must not change the zoo)."""
    path = zoo.root.parent / "case.yaml"
    try:
        text = yaml.safe_dump(config, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        text = json.dumps(config, default=str)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path
