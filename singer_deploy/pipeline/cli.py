"""`singer-deploy`: the command line. Exit codes: 0 ok, 1 a parity gate failed, 2 bad input or configuration,
3 a backend is not available here, 4 training stopped (e.g. non-finite loss)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from singer_deploy.errors import (BackendUnavailableError, ConfigError, DataError, ModelError, ParityError,
                                  SingerDeployError, TrainingError)
from singer_deploy.pipeline.runconfig import read_config_file

if TYPE_CHECKING:
    from singer_deploy.pipeline.api import PipelineResult

EXIT_OK, EXIT_PARITY, EXIT_INPUT, EXIT_BACKEND, EXIT_TRAINING = 0, 1, 2, 3, 4


def demo_config_path() -> Path:
    return Path(str(resources.files("singer_deploy").joinpath("demo.yaml")))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.handler(args)
    except ParityError as err:
        print(f"singer-deploy: parity gate failed: {err}", file=sys.stderr)
        return EXIT_PARITY
    except BackendUnavailableError as err:
        print(f"singer-deploy: {err}", file=sys.stderr)
        return EXIT_BACKEND
    except TrainingError as err:
        print(f"singer-deploy: training stopped: {err}", file=sys.stderr)
        return EXIT_TRAINING
    except (ConfigError, DataError, ModelError, SingerDeployError) as err:
        print(f"singer-deploy: {err}", file=sys.stderr)
        return EXIT_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="singer-deploy",
        description="Distil a large ViT into a small, artifact-free student (SiNGER) and export it to "
                    "ONNX / OpenVINO / TensorRT with parity checks.",
        epilog="Exit codes: 0 ok, 1 parity gate failed, 2 bad input/config, 3 backend unavailable, 4 training stopped.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the whole pipeline offline on the planted-artifact teacher (CPU, minutes)")
    demo.add_argument("--out-dir", default=None, help="output directory (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    _common_run_flags(demo)
    demo.set_defaults(handler=_cmd_demo)

    run = sub.add_parser("run", help="run distill -> merge -> export -> verify -> bench -> report from a YAML config")
    run.add_argument("config", help="YAML config (see examples/)")
    run.add_argument("--out-dir", default=None, help="override out_dir from the config")
    _common_run_flags(run)
    run.set_defaults(handler=_cmd_run)

    distill = sub.add_parser("distill", help="distil and merge only (no export): student, refined teacher, report")
    distill.add_argument("config", help="YAML config (see examples/)")
    distill.add_argument("--out-dir", default=None, help="override out_dir from the config")
    _common_run_flags(distill)
    distill.set_defaults(handler=_cmd_distill)

    check = sub.add_parser("check-config", help="validate a YAML config without running anything")
    check.add_argument("config")
    check.set_defaults(handler=_cmd_check)

    export = sub.add_parser("export", help="export a distilled student (RUN_DIR/student/) to deployable formats")
    export.add_argument("run_dir", help="a run directory written by `run`/`demo` (holds manifest.json)")
    export.add_argument("--formats", nargs="+", default=["onnx", "openvino"], help="e.g. onnx openvino trt")
    export.add_argument("--precision", default="fp32", help="fp32, fp16, bf16 or int8")
    export.add_argument("--out", default=None, help="output folder (default RUN_DIR/export-PRECISION)")
    export.set_defaults(handler=_cmd_export)

    bench = sub.add_parser("bench", help="latency of a run's exported artifacts next to eager PyTorch, as a table")
    bench.add_argument("run_dir", help="a finished run directory with an export/ folder")
    bench.add_argument("--json", default=None, help="also write the rows to this JSON file")
    bench.set_defaults(handler=_cmd_bench)

    verify = sub.add_parser("verify", help="re-run an exported artifact against a golden bundle; non-zero on drift")
    verify.add_argument("artifact", help=".onnx, .xml (OpenVINO IR) or .engine file")
    verify.add_argument("bundle", help="golden bundle folder (RUN_DIR/export/goldens/...)")
    verify.set_defaults(handler=_cmd_verify)
    return parser


def _common_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in the output directory "
                        "(default: write to a new numbered directory)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _cmd_demo(args) -> int:
    overrides = {}
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    config = read_config_file(demo_config_path())
    if args.steps:
        config["train"]["steps"] = args.steps
    return _run(config, overrides, args)


def _cmd_run(args) -> int:
    overrides = {"out_dir": args.out_dir} if args.out_dir else {}
    return _run(read_config_file(Path(args.config)), overrides, args)


def _cmd_distill(args) -> int:
    overrides = {"out_dir": args.out_dir} if args.out_dir else {}
    config = read_config_file(Path(args.config))
    config["export"] = {**config.get("export", {}), "formats": []}
    return _run(config, overrides, args)


def _cmd_bench(args) -> int:
    from singer_deploy.export.bench import markdown_table, to_json
    from singer_deploy.io import atomic_write_text
    from singer_deploy.pipeline.export_only import bench_run

    rows = bench_run(Path(args.run_dir))
    print(markdown_table(rows, ["runner", "p50_ms", "p90_ms", "p99_ms", "throughput_ips", "size_mb",
                                "speedup_vs_pytorch/fp32"]))
    if args.json:
        atomic_write_text(args.json, to_json(rows))
    return EXIT_OK


def _run(config: dict, overrides: dict, args) -> int:
    from singer_deploy.pipeline.api import distill_and_export

    result = distill_and_export(config, overwrite=args.overwrite, progress=not args.no_progress, **overrides)
    print(format_summary(result))
    if not result.passed:
        failed = [k for k, v in result.summary["parity"].items() if v != "pass"]
        print(f"singer-deploy: parity gate failed for {', '.join(failed)} (see {result.files['report']})",
              file=sys.stderr)
        return EXIT_PARITY
    return EXIT_OK


def format_summary(result: PipelineResult) -> str:
    lines = [f"Run: {result.out_dir}  ({result.timings.get('total_s', 0):.0f} s)"]
    for key, value in result.summary.items():
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            lines.append(f"  {key}:")  # nested tables (e.g. HNR_4 per source) get a line each
            lines += [f"    {k}: {_inline(v)}" for k, v in value.items()]
        else:
            lines.append(f"  {key}: {_inline(value)}")
    lines.append(f"  report: {result.files.get('report')}")
    return "\n".join(lines)


def _inline(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _cmd_check(args) -> int:
    from singer_deploy.pipeline.runconfig import load_run_config

    load_run_config(Path(args.config))
    print(f"{args.config}: ok")
    return EXIT_OK


def _cmd_export(args) -> int:
    from singer_deploy.pipeline.export_only import export_run

    result = export_run(Path(args.run_dir), args.formats, args.precision, Path(args.out) if args.out else None)
    for key, record in result.artifacts.items():
        print(f"{key}: {record.path} parity {'pass' if record.parity.passed else 'FAIL'}")
    result.raise_if_failed()
    return EXIT_OK


def _cmd_verify(args) -> int:
    from singer_deploy.export.golden import verify

    report = verify(args.artifact, args.bundle)
    print(report.markdown())
    report.raise_if_failed()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
