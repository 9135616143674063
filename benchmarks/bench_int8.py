"""OpenVINO INT8 (NNCF, the SDK's ViT policy) vs FP32 on this CPU: batch-1 latency and parity on real photos.

    python benchmarks/bench_int8.py [--threads 2] [--calib-per-photo 16] [--budget-s 5] [--json out.json]
    quick check: --model vit_tiny_patch16_224 --img-size 64 --calib-per-photo 2 --eval-per-photo 2 --budget-s 0.3

Model: randomly initialised timm vit_small_patch16_224 (no weights are downloaded), 224 px. Calibration and parity
images are crops of the colour photos scikit-image ships (astronaut, chelsea, coffee, rocket, ...), calibration and
evaluation crops drawn with different seeds (held out: no evaluation crop is a calibration crop, checked by hash).
INT8 is encoded for this host (`--target` names another CPU class; see calibration/int8_scheme.py). Every runner is
timed by `singer_deploy.export.bench.benchmark_runners` (a time budget per runner, interleaved rounds so load from
other processes hits all runners alike); OpenVINO runs at INFERENCE_PRECISION_HINT=f32 (INT8 vs FP32) and again at
the plugin's deployment default; eager PyTorch on the same CPU is the baseline. Each row carries its parity result
and the precision the runtime reports it executed. Target on VNNI / AMX hosts: >= 1.7x at cosine >= 0.99 (ratio of
batch-1 p50 latencies); on hosts without VNNI INT8 is often slower than FP32 (the script says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch

from singer_deploy.calibration.auto_precision import slower_int8_warnings
from singer_deploy.calibration.holdout import image_hashes
from singer_deploy.calibration.policy import DEFAULT_POLICY
from singer_deploy.calibration.quantize import reduce_precision
from singer_deploy.calibration.selection import CalibrationSet
from singer_deploy.config import TARGET_NAMES
from singer_deploy.export.bench import add_ratios, benchmark_runners, markdown_table, with_deployment_defaults
from singer_deploy.export.hardware import host_capabilities, resolve_target
from singer_deploy.export.onnx import OnnxRuntimeRunner, export_onnx
from singer_deploy.export.openvino import OpenVINORunner, export_openvino
from singer_deploy.export.parity import compare_outputs
from singer_deploy.export.runner import TorchRunner
from singer_deploy.models.data import bundled_photos, normalise

LATENCY_COLUMNS = ["runner", "realised_precision", "parity", "p50_ms", "p90_ms", "min_ms", "iters",
                   "speedup_vs_pytorch/fp32", "throughput_ips"]


def photo_batch(crops_per_photo: int, seed: int, size: int = 224) -> np.ndarray:
    pixels = bundled_photos(size, crops_per_photo=crops_per_photo, seed=seed)
    return torch.stack([normalise(p) for p in pixels]).numpy()


def _backend_rows(results: dict, latency: dict, report: dict) -> list[dict]:
    """One row per backend: FP32 vs INT8 latency and the INT8 artifact's parity; details go into `report`."""
    rows = []
    for backend, fp32_key, int8_key in (("openvino", "openvino/fp32", "openvino/int8"),
                                        ("onnx", "onnx/fp32", "onnx/int8")):
        result = results[backend]
        tokens = result.parity.outputs["patch_tokens"].metrics
        cls = result.parity.outputs["cls"].metrics
        rows.append({"backend": backend, "fp32_p50_ms": latency[fp32_key]["p50_ms"],
                     "int8_p50_ms": latency[int8_key]["p50_ms"],
                     "speedup": latency[fp32_key]["p50_ms"] / latency[int8_key]["p50_ms"],
                     "token_cos_mean": tokens["token_cos_mean"], "token_cos_min": tokens["token_cos_min"],
                     "cls_cos_min": cls["token_cos_min"], "knn_overlap": tokens["knn_overlap"],
                     "int8_gate": result.parity.passed, "int8_realised": latency[int8_key]["realised_precision"],
                     "quantize_s": result.seconds})
        report[backend] = {"parity": result.parity.to_dict(), "realised": result.realised.to_dict(),
                           "int8_scheme": result.int8_scheme.to_dict()}
    return rows


def runner_parity(runners: dict, reference_outputs: dict, images: np.ndarray) -> dict[str, bool]:
    """Every runner but eager against eager on the held-out crops, gated at the precision it really runs
    ("<format>/<precision>" labels; a deployment-default row that realises bf16 gets the bf16 gate)."""
    passed = {}
    for label, runner in runners.items():
        if label.startswith("pytorch/"):
            continue
        outputs = runner.load().run(images)
        precision = label.split("/")[1].split("@")[0]
        if runner.info.get("realised_precision", "").startswith("bf16"):
            precision = "bf16"
        passed[label] = compare_outputs(reference_outputs, outputs, precision, candidate_name=label).passed
    return passed


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    host, target = host_capabilities(), resolve_target(args.target)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size).eval()
    calib = photo_batch(args.calib_per_photo, seed=0, size=args.img_size)
    evals = photo_batch(args.eval_per_photo, seed=1, size=args.img_size)
    overlap = len(set(image_hashes(calib)) & set(image_hashes(evals)))
    calibration = CalibrationSet(calib, np.arange(len(calib)), "given", 0, len(calib))
    reference = TorchRunner(model)
    report: dict = {"model": f"{args.model} (random init)", "img_size": args.img_size, "threads": args.threads,
                    "calibration_images": len(calib), "eval_images": len(evals), "calibration_eval_overlap": overlap,
                    "host": host.to_dict(), "target": target.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        onnx_path = export_onnx(model, out / "student_fp32.onnx").path
        fp32_xml = export_openvino(onnx_path, out, fp16=False).fp32_xml
        results = {}
        for backend, source in (("openvino", fp32_xml), ("onnx", onnx_path)):
            results[backend] = reduce_precision(source, precision="int8", backend=backend, output_dir=out,
                                                calibration=calibration, policy=DEFAULT_POLICY, eval_images=evals,
                                                reference=reference, strict=False, target=target)
        runners = with_deployment_defaults({
            "pytorch/fp32": TorchRunner(model, device="cpu"),
            "openvino/fp32": OpenVINORunner(fp32_xml, inference_precision="f32", num_threads=args.threads),
            "openvino/int8": OpenVINORunner(results["openvino"].artifact, inference_precision="f32",
                                            num_threads=args.threads),
            "onnx/fp32": OnnxRuntimeRunner(onnx_path, providers=["CPUExecutionProvider"], num_threads=args.threads),
            "onnx/int8": OnnxRuntimeRunner(results["onnx"].artifact, providers=["CPUExecutionProvider"],
                                           num_threads=args.threads),
        })
        parity = runner_parity(runners, reference.load().run(evals), evals)
        # Batch-1 latency on evals[:1]; throughput on a batch of 8 eval images.
        timed = add_ratios(benchmark_runners(runners, evals, warmup=5, budget_s=args.budget_s, rounds=args.rounds,
                                             parity=parity), "pytorch/fp32")
        latency = {row["runner"]: row for row in timed}
    rows = _backend_rows(results, latency, report)
    default_hint = latency["openvino/fp32@default"]["p50_ms"] / latency["openvino/int8@default"]["p50_ms"]
    warnings = slower_int8_warnings(timed)
    report.update(rows=rows, latency=latency, openvino_speedup_default_hint=default_hint, warnings=warnings,
                  loadavg_before=load_before, loadavg_after=os.getloadavg())
    print(f"# host: {host.summary()}; INT8 encoded for {target.isa if target.name == 'host' else target.name} "
          f"({results['openvino'].int8_scheme.reason})")
    print(f"# {len(calib)} calibration crops, {len(evals)} held-out evaluation crops ({overlap} shared)\n")
    print(markdown_table([{k: (f"{v:.5f}" if "cos" in k or k == "knn_overlap" else v) for k, v in r.items()}
                          for r in rows]))
    print()
    print(markdown_table(timed, LATENCY_COLUMNS))
    print(f"\nOpenVINO INT8 vs FP32 at the plugin's deployment default hint "
          f"({latency['openvino/fp32@default']['realised_precision']} for FP32 here): {default_hint:.2f}x")
    for warning in warnings:
        print(f"WARNING: {warning}")
    print(f"load average before {load_before[0]:.2f}, after {report['loadavg_after'][0]:.2f} "
          f"({os.cpu_count()} CPUs; other processes may share them)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (random init)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--calib-per-photo", type=int, default=16, help="calibration crops per bundled photo")
    parser.add_argument("--eval-per-photo", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=5.0, help="seconds of timed batch-1 calls per runner")
    parser.add_argument("--target", default="host", choices=TARGET_NAMES, help="CPU the INT8 IRs are encoded for")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
