"""Export benchmark: PyTorch eager vs ONNX Runtime vs OpenVINO (FP32 f32-hint, FP16 IR, default hint) on one CPU.

    python benchmarks/bench_export.py [--model vit_small_patch16_224] [--threads 2] [--json out.json]

Random-init timm model at 224 px, batch-1 latency on the same inputs for every runner (timed calls interleaved
across runners, so load from other processes falls on all alike), ratios against eager measured in this one run, and parity of every artifact against eager on synthetic-shape images. Reference ratios were
measured on this kind of machine for a plain timm export (eager 51.9 ms; ORT 2.0x, OV FP32 2.4x, OV default 3.3x).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

from singer_deploy.models.data import SyntheticShapes, image_array
from singer_deploy.export.bench import add_ratios, benchmark_runners, markdown_table
from singer_deploy.export.onnx import OnnxRuntimeRunner, export_onnx
from singer_deploy.export.openvino import OpenVINORunner, export_openvino
from singer_deploy.export.parity import compare_outputs
from singer_deploy.export.runner import TorchRunner

REFERENCE_SPEEDUP = {"onnxruntime": 2.0, "openvino_fp32_f32hint": 2.4, "openvino_default_hint": 3.3}


def _images(n: int, size: int, patch: int) -> np.ndarray:
    data = SyntheticShapes(n=n, img_size=size, patch_size=patch, seed=0)
    return image_array(data)


def _print_report(args, rows: list[dict], parity: list[dict], load: tuple, onnx_export, work: Path) -> None:
    """Latency table, speed-ups vs the reference figures and vs a plain timm export, and the parity table."""
    load_before, load_after = load
    print(f"# {args.model} @ {args.img_size}px, batch 1, {args.threads} threads, {args.iters} timed runs")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min; > {args.threads} means "
          f"other processes shared the CPU)\n")
    print(markdown_table(rows, ["runner", "p50_ms", "p90_ms", "p99_ms", "min_ms", "speedup_vs_torch",
                                "throughput_ips",
                                "size_mb", "build_s", "peak_rss_mb"]))
    print("\nspeed-up vs the reference figures (target: within 10%):")
    for row in rows:
        target = REFERENCE_SPEEDUP.get(row["runner"])
        if target:
            print(f"  {row['runner']}: {row['speedup_vs_torch']:.2f}x vs {target:.1f}x "
                  f"({(row['speedup_vs_torch'] / target - 1) * 100:+.0f}%)")
    p50 = {row["runner"]: row["p50_ms"] for row in rows}
    print("\nour export vs a plain timm export, same run (p50; > 1 means ours is slower):")
    print(f"  onnxruntime: {p50['onnxruntime'] / p50['plain_timm_onnxruntime']:.2f}x; "
          f"openvino f32: {p50['openvino_fp32_f32hint'] / p50['plain_timm_openvino_f32hint']:.2f}x")
    print("\nparity vs eager on synthetic-shape images:")
    print(markdown_table(parity, ["candidate", "precision", "output", "max_abs_rel", "rel_err_p99",
                                  "token_cos_min", "image_cos_min", "knn_overlap", "norm_corr", "passed"]))
    print(f"\nexporter: {onnx_export.exporter} (opset {onnx_export.opset}); artifacts in {work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--parity-images", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size).eval()
    patch = model.patch_embed.patch_size[0]
    images = _images(args.parity_images, args.img_size, patch)
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    onnx_export = export_onnx(model, work / "student.onnx")
    ir = export_openvino(onnx_export.path, work, stem="student")

    # The yardstick for "our exports lose none of the runtimes' speed": a plain torch.onnx export of the bare timm
    # model (its own forward, no named outputs), timed in the same run by the same runners.
    plain = work / "plain_timm.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, args.img_size, args.img_size),), str(plain), dynamo=True,
                      opset_version=18, dynamic_shapes=({0: torch.export.Dim("batch")},))
    plain_ir = export_openvino(plain, work, stem="plain_timm", fp16=False)
    cases = [  # (label, runner, artifact, build seconds, parity precision)
        ("torch", TorchRunner(model), None, None, None),
        ("onnxruntime", OnnxRuntimeRunner(onnx_export.path, num_threads=args.threads), onnx_export.path,
         onnx_export.seconds, "fp32"),
        ("openvino_fp32_f32hint", OpenVINORunner(ir.fp32_xml, num_threads=args.threads), ir.fp32_xml, ir.seconds,
         "fp32"),
        ("openvino_fp16ir_f32hint", OpenVINORunner(ir.fp16_xml, num_threads=args.threads), ir.fp16_xml,
         ir.seconds, "fp16"),
        ("openvino_default_hint", OpenVINORunner(ir.fp32_xml, inference_precision=None, num_threads=args.threads),
         ir.fp32_xml, ir.seconds, "bf16"),
        ("plain_timm_onnxruntime", OnnxRuntimeRunner(plain, num_threads=args.threads), plain, None, None),
        ("plain_timm_openvino_f32hint", OpenVINORunner(plain_ir.fp32_xml, num_threads=args.threads),
         plain_ir.fp32_xml, None, None),
    ]
    reference = cases[0][1].run(images)
    rows = benchmark_runners({label: runner for label, runner, *_ in cases}, images, iters=args.iters,
                             artifacts={label: path for label, _, path, *_ in cases if path is not None},
                             build_seconds={label: build for label, _, _, build, _ in cases if build is not None})
    parity = []
    for label, runner, _, _, precision in cases:
        if precision is not None:
            report = compare_outputs(reference, runner.run(images), precision, candidate_name=label)
            parity += report.table_rows()
    rows = add_ratios(rows, baseline="torch")
    load_after = os.getloadavg()

    _print_report(args, rows, parity, (load_before, load_after), onnx_export, work)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "parity": parity, "load": [load_before, load_after],
                                         "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str))


if __name__ == "__main__":
    main()
