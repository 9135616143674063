"""Export benchmark: PyTorch eager vs ONNX Runtime vs OpenVINO vs the `precision: auto` artifact on one CPU.

    python benchmarks/bench_export.py [--model vit_small_patch16_224] [--threads 2] [--budget-s 5]
                                      [--batch-sizes 1 8] [--json out.json]
    quick check: --model vit_tiny_patch16_224 --img-size 64 --budget-s 0.3 --calib-images 16

Random-init timm model, latency at each batch size on the same inputs for every runner (a time budget per runner, timed calls
interleaved across runners so load from other processes falls on all alike), ratios against eager (same CPU) from
this one run. Every row carries its parity against eager on synthetic-shape images and the precision its runtime
reports it executed; OpenVINO runs at the f32 parity hint and at its deployment default. The yardstick is a plain
`torch.onnx` export of the bare timm model; the `auto` artifact is what `precision: auto` ships for this host with
`export.batch_sizes` = --batch-sizes (INT8 calibrated on other synthetic images than the parity ones), run at the
inference precision hint it was gated with. Target: auto / fastest plain export >= 1.0 at every batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

from singer_deploy.calibration.auto_export import export_auto
from singer_deploy.export.bench import add_ratios, benchmark_runners, markdown_table, with_deployment_defaults
from singer_deploy.export.golden import open_runner
from singer_deploy.export.hardware import host_capabilities
from singer_deploy.export.onnx import OnnxRuntimeRunner
from singer_deploy.export.openvino import OpenVINORunner, export_openvino
from singer_deploy.export.parity import compare_outputs
from singer_deploy.export.runner import TorchRunner
from singer_deploy.models.data import SyntheticShapes, stack_images

COLUMNS = ["runner", "batch", "realised_precision", "parity", "p50_ms", "p90_ms", "min_ms", "iters", "speedup_vs_torch",
           "throughput_ips", "size_mb", "build_s"]


def _images(n: int, size: int, patch: int, seed: int) -> np.ndarray:
    return stack_images(SyntheticShapes(n=n, img_size=size, patch_size=patch, seed=seed)).numpy()


def _plain_exports(model: torch.nn.Module, img_size: int, work: Path, threads: int) -> dict:
    """The yardstick: a plain torch.onnx export of the bare timm model (its own forward, no named outputs), in ONNX
    Runtime and OpenVINO (f32 hint and deployment default)."""
    plain = work / "plain_timm.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, img_size, img_size),), str(plain), dynamo=True,
                      opset_version=18, dynamic_shapes=({0: torch.export.Dim("batch")},))
    plain_ir = export_openvino(plain, work, stem="plain_timm", fp16=False)
    return with_deployment_defaults({"plain/onnx": OnnxRuntimeRunner(plain, num_threads=threads),
                                     "plain/openvino": OpenVINORunner(plain_ir.fp32_xml, num_threads=threads)})


def _parity(reference: dict, runners: dict, images: np.ndarray) -> dict[str, bool]:
    """Gate each of our runners against eager at the precision it really runs (read back from its runtime). The plain
    timm exports are only the speed yardstick: their single unnamed output has no gate here."""
    passed = {}
    for label, runner in runners.items():
        if label == "torch" or label.startswith("plain/"):
            continue
        realised = runner.load().info.get("realised_precision") or "fp32"
        precision = next((p for p in ("int8", "bf16", "fp16") if realised.startswith(p)), "fp32")
        passed[label] = compare_outputs(reference, runner.run(images), precision, candidate_name=label).passed
    return passed


def _print_report(args, host, rows: list[dict], decision, load: tuple, auto_label: str, parity: dict,
                  work: Path) -> list[dict]:
    """Latency table with realised precision and parity, the auto decision table and, per batch size, the same-run
    ratios; returns the ratio rows."""
    load_before, load_after = load
    print(f"# {args.model} @ {args.img_size}px, batch sizes {args.batch_sizes}, {args.threads} threads, "
          f"budget {args.budget_s:.1f} s/runner")
    print(f"# host: {host.summary()}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min; > {args.threads} means "
          f"other processes shared the CPU)\n")
    print(markdown_table(rows, COLUMNS))
    print("\nprecision auto, per format (candidates gated and timed on this host; the first batch size decides):")
    extra = [f"p50_ms@{b}" for b in args.batch_sizes[1:]]
    print(markdown_table(decision.rows, ["key", "realised", "native", "gate", "p50_ms", *extra, "chosen", "reason"]))
    for line in decision.ranking_lines():
        print(f"ranking at {line}")
    ratios = []
    for batch in args.batch_sizes:
        p50 = {row["runner"]: row["p50_ms"] for row in rows if row["batch"] == batch}
        plain_best = min((label for label in p50 if label.startswith("plain/")), key=p50.get)
        ratios.append({"batch": batch, "auto": auto_label, "auto_p50_ms": p50[auto_label],
                       "fastest_plain": plain_best, "plain_p50_ms": p50[plain_best],
                       "auto_vs_plain": p50[plain_best] / p50[auto_label],
                       "ours_vs_plain_onnx": p50["onnx/fp32"] / p50["plain/onnx"],
                       "ours_vs_plain_openvino": p50["openvino/fp32"] / p50["plain/openvino"]})
    print(f"\nauto artifact vs the fastest plain export, same run (p50 ratio, >= 1.0 is the target; auto passes its "
          f"gate: {parity[auto_label]}); our fp32 exports vs plain timm (> 1 means ours is slower):")
    print(markdown_table(ratios))
    print(f"\nartifacts in {work}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=5.0, help="seconds of timed batch-1 calls per runner")
    parser.add_argument("--parity-images", type=int, default=16)
    parser.add_argument("--calib-images", type=int, default=64, help="INT8 calibration images for auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                        help="deployment batch sizes (export.batch_sizes): auto ships the fastest at the first")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    host = host_capabilities()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size).eval()
    patch = model.patch_embed.patch_size[0]
    images = _images(args.parity_images, args.img_size, patch, seed=0)
    calib = _images(args.calib_images, args.img_size, patch, seed=1)
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))

    auto = export_auto(model, work / "auto", ("onnx", "openvino"), img_size=args.img_size, parity_images=images,
                       calib_images=calib, budget_s=args.budget_s / 2, batch_sizes=args.batch_sizes)
    result, decision = auto.result, auto.decision
    fastest = decision.fastest
    ours = {key: result.artifacts[key] for key in ("onnx/fp32", "openvino/fp32")}
    runners = {"torch": TorchRunner(model, device="cpu")}
    runners.update(with_deployment_defaults({key: open_runner(rec.path, num_threads=args.threads)
                                             for key, rec in ours.items()}))
    runners.update(_plain_exports(model, args.img_size, work, args.threads))
    auto_label = f"auto ({fastest})"
    shipped = result.artifacts[fastest]
    runners[auto_label] = open_runner(shipped.path, num_threads=args.threads, **shipped.runner_options)
    reference = runners["torch"].load().run(images)
    parity = _parity(reference, runners, images)
    rows = [row for batch in args.batch_sizes for row in add_ratios(benchmark_runners(
        runners, images, budget_s=args.budget_s, parity=parity, batch=batch,
        artifacts={k: r.path for k, r in ours.items()} | {auto_label: shipped.path},
        build_seconds={k: r.seconds for k, r in ours.items()}), baseline="torch")]
    load_after = os.getloadavg()

    ratios = _print_report(args, host, rows, decision, (load_before, load_after), auto_label, parity, work)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "decision": decision.to_dict(), "host": host.to_dict(),
                                         "ratios": ratios, "command": " ".join(sys.argv),
                                         "load": [load_before, load_after],
                                         "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str))


if __name__ == "__main__":
    main()
