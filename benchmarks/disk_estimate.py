"""Disk use of a run, computed from tensor shapes only (no weights, no run): what each file of a run directory
holds for a config, as bytes per artifact and for the goldens. Usage:

    python benchmarks/disk_estimate.py examples/dinov2_vitl14_to_vits14.yaml

Models are built on PyTorch's meta device (no memory, no weights). Files are counted as their tensors' raw bytes;
format overheads (ONNX / OpenVINO graph text, safetensors headers, TensorRT kernels and tactics) are a few MB at
most except for TensorRT engines, whose kernel payload depends on the GPU and is not counted. Compressed golden
arrays (np.savez_compressed) of float32 features shrink little, so they are counted uncompressed.
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

from singer_deploy.method.alignment import resolve_teacher_layers
from singer_deploy.pipeline.runconfig import load_run_config, read_config_file

FP32, FP16 = 4, 2
MB = 1e6


def _meta_model(name: str, kwargs: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def estimate(config_path: str) -> tuple[list[tuple[str, float]], float]:
    """(file, bytes) rows of a run of the config, and what per-artifact goldens of every parity image would take."""
    raw = read_config_file(config_path)
    raw["data"] = {**raw.get("data", {}), "source": "synthetic"}   # the images are not needed, only their count
    config = load_run_config(raw)
    teacher = _meta_model(config.teacher.name, config.teacher.kwargs)
    student = _meta_model(config.student.name, config.student.kwargs)
    d_t, d_s, depth_t = teacher.embed_dim, student.embed_dim, len(teacher.blocks)
    tokens = student.patch_embed.num_patches
    layers = resolve_teacher_layers(config.layers, depth_t)
    student_params = sum(p.numel() for p in student.parameters())
    projector = d_s * d_t + d_t
    singer = config.train.method == "singer"
    rank = config.singer.rank
    rows = [("student/model.safetensors (fp32)", student_params * FP32),
            (f"projectors.safetensors ({len(layers)} x Linear {d_s}->{d_t})", len(layers) * projector * FP32)]
    trained = student_params + len(layers) * projector
    if singer:
        rows += [(f"refiner.safetensors (rank {rank} factors, {len(layers)} layers)", len(layers) * 2 * d_t * rank * FP32),
                 (f"refined_teacher.safetensors ({len(layers)} x merged {d_t}x{d_t})", len(layers) * d_t * d_t * FP32)]
        trained += len(layers) * 2 * d_t * rank
    moments = 2 if config.train.optimizer == "adamw" else 1
    frozen_bases = len(layers) * d_t * d_t if singer else 0
    rows.append((f"checkpoint.pt (weights + {moments} optimizer moment(s), refiner identity bases)",
                 (trained * (1 + moments) + frozen_bases) * FP32))
    exported = student_params + projector
    precision = config.export.precision
    low = {"fp32": FP32, "fp16": FP16, "bf16": FP16, "int8": 1}[precision]
    artifacts = []
    formats = set(config.export.formats)
    if formats & {"onnx", "openvino", "tensorrt"}:
        rows.append(("export/student.onnx (fp32, the graph every backend starts from)", exported * FP32))
    if precision != "fp32" and formats & {"onnx", "tensorrt"}:
        rows.append((f"export/student_{precision}.onnx", exported * low))
    if "onnx" in formats:
        artifacts.append(f"onnx/{precision}")
    if "openvino" in formats:
        rows += [("export/student_fp32.xml+.bin", exported * FP32), ("export/student_fp16.xml+.bin", exported * FP16)]
        artifacts += ["openvino/fp32", "openvino/fp16"]
        if precision == "int8":
            rows.append(("export/student_int8.xml+.bin", exported * 1))
            artifacts.append("openvino/int8")
    if "tensorrt" in formats:
        rows.append((f"export/student_{precision}.engine (weights only)", exported * low))
        artifacts.append(f"tensorrt/{precision}")
    per_image = (3 * config.student.kwargs.get("img_size", 224) ** 2 + d_s + tokens * d_s + tokens * d_t) * FP32
    golden = min(config.export.golden_size, config.data.eval_n)
    rows.append((f"export/goldens/reference (shared: {golden} images + outputs)", golden * per_image))
    if config.export.polygraphy_goldens:
        rows.append(("export/goldens/reference polygraphy JSON (base64)", golden * per_image * 4 / 3))
    rows.append((f"metrics.jsonl ({config.train.steps // config.train.log_every} records, ~1 kB each)",
                 config.train.steps // config.train.log_every * 1000))
    return rows, len(artifacts) * config.data.eval_n * per_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    args = parser.parse_args(argv)
    rows, per_artifact_goldens = estimate(args.config)
    print("| file | MB |\n|---|---|")
    for name, size in rows:
        print(f"| {name} | {size / MB:,.1f} |")
    print(f"| **total** | **{sum(s for _, s in rows) / MB:,.0f}** |")
    print(f"\nGoldens stored per artifact with every parity image (the layout before the shared reference set) "
          f"would take {per_artifact_goldens / MB:,.0f} MB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
