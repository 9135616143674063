"""`singer-deploy`: the command line. Exit codes (singer_deploy/errors.py, README "Exit codes"): 0 ok, 1 a parity gate
failed, 2 bad input or configuration, 3 a backend is not available here, 4 training stopped, 5 an I/O problem (disk
full, read-only, out_dir a file, out_dir in use), 130 interrupted, 70 an internal error (a bug). Never a traceback
for a bad input: every error this SDK raises on purpose is a SingerDeployError with expected / found / fix."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from singer_deploy import __version__
from singer_deploy.errors import (EXIT_BACKEND, EXIT_INPUT, EXIT_IO, EXIT_OK, EXIT_PARITY, EXIT_TRAINING, ConfigError,
                                  ParityError, SingerDeployError, TrainingError, exit_code)
from singer_deploy.pipeline.runconfig import read_config_file

if TYPE_CHECKING:
    from singer_deploy.pipeline.api import PipelineResult

__all__ = ["EXIT_BACKEND", "EXIT_INPUT", "EXIT_IO", "EXIT_OK", "EXIT_PARITY", "EXIT_TRAINING", "main"]
EXIT_INTERRUPTED, EXIT_BUG = 130, 70   # 128 + SIGINT as shells report it; 70 = EX_SOFTWARE (sysexits.h)


def demo_config_path() -> Path:
    return Path(str(resources.files("singer_deploy").joinpath("demo.yaml")))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # KEY=VALUE overrides may stand anywhere after the command (also after options such as --formats a b):
    # argparse assigns positionals before it sees later ones, so the leftovers are collected here.
    args, extra = parser.parse_known_args(argv)
    # `--formats onnx KEY=VALUE`: nargs="+" takes the override too; a format name never holds "=".
    if getattr(args, "formats", None) and any("=" in item for item in args.formats):
        extra = [*extra, *(item for item in args.formats if "=" in item)]
        args.formats = [item for item in args.formats if "=" not in item]
        if not args.formats:
            parser.error("--formats needs at least one format name (e.g. --formats onnx)")
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # Our own progress lines (export / quantize / build stages, resume, bench) always show; -v adds the libraries'.
    logging.getLogger("singer_deploy").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("singer-deploy: interrupted; an unfinished run resumes when started again", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the exit-code contract: every error ends in a code and one message
        code = exit_code(err)
        if code is None:
            if args.verbose:   # our own loggers always print at INFO, so the traceback is printed only on request
                traceback.print_exc(file=sys.stderr)
            print(f"singer-deploy: internal error (a bug, please report it; -v shows the traceback): "
                  f"{type(err).__name__}: {err}", file=sys.stderr)
            return EXIT_BUG
        prefix = {ParityError: "parity gate failed: ", TrainingError: "training stopped: "}.get(type(err), "")
        if not isinstance(err, SingerDeployError):  # an OSError that reached us without a SingerDeployError
            prefix = "I/O error: "
        print(f"singer-deploy: {prefix}{err}", file=sys.stderr)
        return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="singer-deploy",
        description="Distil a large ViT into a small, artifact-free student (SiNGER) and export it to "
                    "ONNX / OpenVINO / TensorRT with parity checks.",
        epilog="Exit codes: 0 ok, 1 parity gate failed, 2 bad input/config, 3 backend unavailable, 4 training stopped, "
               "5 I/O problem (disk full, read-only, out_dir a file or in use), 70 internal error, 130 interrupted.")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log the libraries' progress details")
    parser.add_argument("--version", action="version", version=f"singer-deploy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(sub)
    _add_artifact_commands(sub)
    return parser


def _add_run_commands(sub) -> None:
    """demo, run, distill, check-config: the commands that read a config."""
    demo = sub.add_parser("demo", help="run the whole pipeline offline on the planted-artifact teacher (CPU, minutes)")
    demo.add_argument("--out-dir", default=None, help="output directory (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    _common_run_flags(demo)
    demo.set_defaults(handler=_cmd_demo)

    for name, handler, text in (
            ("run", _cmd_run, "run distill -> merge -> export -> verify -> bench -> report from a YAML config"),
            ("distill", _cmd_distill, "distil and merge only (no export): student, refined teacher, report")):
        command = sub.add_parser(name, help=text)
        command.add_argument("config", help="YAML config (see examples/)")
        _overrides_argument(command)
        command.add_argument("--out-dir", default=None, help="override out_dir from the config")
        _common_run_flags(command)
        command.set_defaults(handler=handler)

    scan = sub.add_parser("scan", help="where a teacher's artifacts are, before distilling (no training): per-block "
                                       "artifact share, strength and threshold, suggested layers and singer.rank; "
                                       "writes DIR/scan.html and DIR/scan.json")
    scan.add_argument("config", help="YAML config (its teacher and data sections are read), or a bare timm name")
    _overrides_argument(scan)
    scan.add_argument("--out", default=None, help="output directory (default scans/TEACHER)")
    scan.add_argument("--overwrite", action="store_true", help="replace what the output directory holds (only a "
                      "directory singer-deploy created)")
    scan.set_defaults(handler=_cmd_scan)

    check = sub.add_parser("check-config", help="validate a YAML config (and KEY=VALUE overrides) without running")
    check.add_argument("config")
    _overrides_argument(check)
    check.add_argument("--print", action="store_true", dest="print_config",
                       help="print the resolved config (defaults filled in) as YAML")
    check.set_defaults(handler=_cmd_check)


def _add_artifact_commands(sub) -> None:
    """export, bench, doctor, verify: the commands about exported artifacts and this machine's runtimes."""
    export = sub.add_parser("export", help="export a distilled student (RUN_DIR/student/), or any timm ViT as it is "
                                           "(NAME [--weights FILE]), to deployable formats with parity and goldens")
    export.add_argument("source", help="a run directory written by `run`/`demo`, or a timm ViT name "
                                       "(vit_small_patch14_dinov2, hf-hub:org/name, local-dir:PATH)")
    _overrides_argument(export)
    export.add_argument("--weights", default=None, help="local weights file for a timm name (no download)")
    export.add_argument("--images", default=None, help="image folder for parity and goldens of a timm model "
                                                       "(default: synthetic shapes)")
    export.add_argument("--formats", nargs="+", default=None,
                        help="e.g. onnx openvino trt (default onnx openvino; wins over export.formats=)")
    export.add_argument("--precision", default=None,
                        help="fp32, fp16, bf16, int8, or auto (the fastest passing precision the target runs "
                             "natively, per format); default fp32; wins over export.precision=")
    export.add_argument("--target", default=None,
                        help="CPU the artifacts will run on: host, avx2, avx512, avx512_vnni, avx512_bf16, amx ... "
                             "(default: the run config's export.target, host for a timm model)")
    export.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="deployment batch sizes: auto ships the fastest at the first and ranks the others "
                             "(default: the run config's export.batch_sizes, [1])")
    export.add_argument("--out", default=None, help="output folder (default RUN_DIR/export-PRECISION, or "
                                                    "exports/NAME-PRECISION for a timm model)")
    export.set_defaults(handler=_cmd_export)

    bench = sub.add_parser("bench", help="latency of a run's exported artifacts next to eager PyTorch, as a table")
    bench.add_argument("run_dir", help="a finished run directory with an export/ folder")
    bench.add_argument("--formats", nargs="+", default=None, help="only these formats' artifacts (default all)")
    bench.add_argument("--batch-sizes", nargs="+", type=int, default=[1], help="one table per batch size")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads (PyTorch, ORT, OpenVINO)")
    bench.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                       help="pick the number of timed calls so the benchmark takes about this long")
    bench.add_argument("--json", default=None, help="also write the rows to this JSON file")
    bench.set_defaults(handler=_cmd_bench)

    doctor = sub.add_parser("doctor", help="what this machine can run: runtimes, providers, devices, CPU, CUDA, "
                                           "TensorRT, and what each export format is missing")
    doctor.set_defaults(handler=_cmd_doctor)

    verify = sub.add_parser("verify", help="re-run an exported artifact against a golden bundle; non-zero on drift")
    verify.add_argument("artifact", help=".onnx, .xml (OpenVINO IR) or .engine file")
    verify.add_argument("bundle", help="golden bundle folder (RUN_DIR/export/goldens/...)")
    verify.set_defaults(handler=_cmd_verify)


def _overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.steps=100 export.precision=fp16 (YAML values)")


def _config_with_overrides(path: str | Path, overrides: list[str]) -> dict:
    from singer_deploy.pipeline.overrides import apply_overrides

    return apply_overrides(read_config_file(Path(path)), overrides)


def _common_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace the run in the output directory, finished "
                        "or not (only a directory singer-deploy created; default: a finished run is kept and this "
                        "one goes to a new numbered directory, an unfinished one resumes)")
    parser.add_argument("--restart", action="store_true", help="start an unfinished run over instead of resuming "
                        "it (needed when its checkpoint belongs to different settings)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _cmd_demo(args) -> int:
    overrides = {}
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    config = read_config_file(demo_config_path())
    if args.steps is not None:
        config["train"]["steps"] = args.steps  # 0 or less is refused by the config check, not ignored
    return _run(config, overrides, args)


def _cmd_run(args) -> int:
    overrides = {"out_dir": args.out_dir} if args.out_dir else {}
    return _run(_config_with_overrides(args.config, args.overrides), overrides, args)


def _cmd_distill(args) -> int:
    overrides = {"out_dir": args.out_dir} if args.out_dir else {}
    config = _config_with_overrides(args.config, args.overrides)
    config["export"] = {**config.get("export", {}), "formats": []}
    return _run(config, overrides, args)


def _cmd_bench(args) -> int:
    from singer_deploy.export.bench import markdown_table, to_json
    from singer_deploy.io import atomic_write_text
    from singer_deploy.pipeline.export_only import bench_run

    rows = bench_run(Path(args.run_dir), formats=args.formats, batch_sizes=args.batch_sizes, threads=args.threads,
                     time_budget_s=args.time_budget)
    print(markdown_table(rows, ["runner", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_ips", "size_mb",
                                "speedup_vs_pytorch/fp32"]))
    if args.json:
        atomic_write_text(args.json, to_json(rows))
    return EXIT_OK


def _run(config: dict, overrides: dict, args) -> int:
    from singer_deploy.pipeline.api import distill_and_export

    result = distill_and_export(config, overwrite=args.overwrite, resume=not args.restart,
                                progress=not args.no_progress, **overrides)
    print(format_summary(result))
    if not result.passed:
        failed = [k for k, v in result.summary["parity"].items() if v != "pass"]
        print(f"singer-deploy: parity gate failed for {', '.join(failed)} (see {result.files['report']})",
              file=sys.stderr)
        return EXIT_PARITY
    return EXIT_OK


_LINE = 120   # a detail line longer than this is split, one entry per line


def format_summary(result: PipelineResult) -> str:
    """The verdict first (reporting/verdict.py), aligned; then the run's other details, one line each (a mapping too
    long for one line gets a line per entry); then where the full detail is: manifest.json and the report."""
    from singer_deploy.reporting.report import SHOWN_ELSEWHERE, inline_text
    from singer_deploy.reporting.verdict import verdict_lines

    distill = result.summary.get("distill_seconds")
    lines = [f"Run: {result.out_dir}  ({result.timings.get('total_s', 0):.0f} s"
             + (f", distillation {distill:.0f} s)" if isinstance(distill, (int, float)) else ")")]
    if "verdict" in result.summary:
        lines += verdict_lines(result.summary["verdict"])
    details = {key: value for key, value in result.summary.items()
               if key not in SHOWN_ELSEWHERE and key != "distill_seconds"}
    if details:
        lines.append("Details:")
    for key, value in details.items():
        line = f"  {key}: {inline_text(value, key)}"
        if len(line) > _LINE and isinstance(value, dict):
            lines += [f"  {key}:"] + [f"    {inner}: {inline_text(v, str(inner))}" for inner, v in value.items()]
        else:
            lines.append(line)
    lines.append(f"Full detail: {result.files.get('manifest', result.out_dir / 'manifest.json')}, "
                 f"report: {result.files.get('report')}")
    return "\n".join(lines)


def _cmd_check(args) -> int:
    import yaml

    from singer_deploy.pipeline.api import prepare
    from singer_deploy.pipeline.runconfig import load_run_config

    config = load_run_config(_config_with_overrides(args.config, args.overrides))
    if args.print_config:
        print(yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False), end="")
    _, train_data, eval_images, _ = prepare(config)  # what `run` checks before it touches a directory
    print(f"{args.config}{' with ' + ' '.join(args.overrides) if args.overrides else ''}: ok "
          f"(teacher {config.teacher.name}, student {config.student.name}, "
          f"{len(train_data)} training / {len(eval_images)} evaluation images)",
          file=sys.stderr if args.print_config else sys.stdout)
    return EXIT_OK


def _cmd_scan(args) -> int:
    from singer_deploy.pipeline.api import is_config_file, scan
    from singer_deploy.pipeline.overrides import apply_overrides

    raw = read_config_file(args.config) if is_config_file(args.config) else {"teacher": {"name": args.config}}
    result = scan(apply_overrides(raw, args.overrides), out_dir=args.out, overwrite=args.overwrite)
    print(f"Scan of {result.teacher} ({result.images} images, {result.seconds:.0f} s): {result.verdict}")
    for line in result.notes:
        print(f"  note: {line}")
    print(f"  suggested: layers={result.layers} (distils {result.distilled}), singer.rank="
          f"{'keep the configured rank' if result.rank is None else result.rank}")
    for line in result.reasons:
        print(f"    {line}")
    print(f"  page: {result.files['page']}, facts: {result.files['json']}")
    return EXIT_OK


def _cmd_doctor(args) -> int:
    from singer_deploy.pipeline.doctor import doctor_report

    print(doctor_report())
    return EXIT_OK


def _cmd_export(args) -> int:
    from singer_deploy.pipeline.api import safe_name
    from singer_deploy.pipeline.export_only import export_run, export_settings, export_timm_model
    from singer_deploy.pipeline.runconfig import load_run_config

    source = Path(args.source)
    flags = {"formats": args.formats, "precision": args.precision, "target": args.target,
             "batch_sizes": args.batch_sizes}
    if source.is_dir():   # a timm name is never a directory (a timm model folder is local-dir:PATH)
        if args.weights or args.images:
            raise ConfigError("--weights and --images apply to exporting a timm model",
                              expected="a timm name with them, or a run directory without them", found=str(source),
                              fix="drop them: a run directory exports its own student on its own images")
        result = export_run(source, out_dir=Path(args.out) if args.out else None, overrides=args.overrides, **flags)
    else:
        raw = {"student": {"name": args.source, "weights": args.weights},
               "data": {"source": args.images or "synthetic"}, "export": {}}
        config = load_run_config(export_settings(raw, args.overrides, flags))
        name = safe_name(args.source)
        result = export_timm_model(config, Path(args.out or f"exports/{name}-{config.export.precision}"))
    shipped = set(result.artifacts if result.shipped is None else result.shipped.values())
    for key, record in result.artifacts.items():
        role = "" if result.shipped is None else ("  SHIPPED" if key in shipped else "  (candidate)")
        print(f"{key}: {record.path} parity {'pass' if record.parity.passed else 'FAIL'}"
              f" realised {record.runner_info.get('realised_precision', '?')}{role}")
    decision = result.notes.get("precision_decision", {})
    for row in decision.get("table", []):
        print(f"  auto {row['key']}: {'SHIPPED' if row['chosen'] else 'not chosen'} - {row['reason']}")
    for line in decision.get("ranking_lines", []):
        print(f"  auto ranking at {line}")
    result.raise_if_failed()
    return EXIT_OK


def _cmd_verify(args) -> int:
    from singer_deploy.export.golden import verify

    report = verify(args.artifact, args.bundle)
    print(report.markdown())
    if report.notes.get("artifact_changed"):
        print("note: the artifact bytes differ from the golden's (a rebuilt or modified artifact)")
    changed = report.notes.get("environment_diff") or {}
    if changed:
        print("note: the environment differs from the golden's: " + ", ".join(
            f"{key} {values['golden']} -> {values['now']}" for key, values in changed.items()))
    report.raise_if_failed()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
