"""Disk use of a run, computed from tensor shapes only (no weights, no run): what each file of a run directory
holds for a config, as bytes per artifact and for the goldens. Usage:

    python benchmarks/disk_estimate.py examples/dinov2_vitl14_to_vits14.yaml

Models are built on PyTorch's meta device (no memory, no weights); the planted teacher is described by its
PlantedConfig. Files are counted as their tensors' raw bytes; format overheads (ONNX / OpenVINO graph text,
safetensors headers, TensorRT kernels and tactics) are a few MB at most except for TensorRT engines, whose kernel
payload depends on the GPU and is not counted; nor are the files NOT_COUNTED names. Compressed golden arrays
(np.savez_compressed) of float32 features of real images shrink little, so they are counted uncompressed (an upper
bound). tests/test_disk_estimate.py checks the rows against the files a demo-size run writes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import timm
import torch

from singer_deploy.config import PLANTED, RunConfig, is_auto_precision
from singer_deploy.method.alignment import resolve_teacher_layers
from singer_deploy.pipeline.runconfig import load_run_config, read_config_file

FP32, FP16 = 4, 2
MB = 1e6
# Files of a run no row counts: their size does not follow the models' shapes (report.html embeds its figures as
# PNGs) or stays at kilobytes (manifests, goldens' and TensorRT sidecars, model card, the run marker).
NOT_COUNTED = ("report.html", "*.json", "student/README.md")


@dataclass(frozen=True)
class Row:
    label: str
    files: tuple[str, ...]   # paths inside the run directory this row counts (empty: not one fixed file)
    bytes: float


def _meta_model(name: str, kwargs: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _teacher_width_depth(config: RunConfig) -> tuple[int, int]:
    if config.teacher.name == PLANTED:
        planted = config.teacher.planted_config()
        return planted.embed_dim, planted.depth
    teacher = _meta_model(config.teacher.name, config.teacher.kwargs)
    return teacher.embed_dim, len(teacher.blocks)


def estimate(config_path: str) -> tuple[list[Row], float]:
    """The rows of a run of the config, and what per-artifact goldens of every parity image would take."""
    raw = read_config_file(config_path)
    raw["data"] = {**raw.get("data", {}), "source": "synthetic"}   # the images are not needed, only their count
    config = load_run_config(raw)
    if is_auto_precision(config.export.precision):
        raise SystemExit("disk_estimate: export.precision auto builds and measures several candidates; name one "
                         "precision (fp32, fp16, int8) to estimate its files")
    d_t, depth_t = _teacher_width_depth(config)
    student = _meta_model(config.student.name, config.student.kwargs)
    d_s, tokens = student.embed_dim, student.patch_embed.num_patches
    layers = resolve_teacher_layers(config.layers, depth_t)
    student_params = sum(p.numel() for p in student.parameters())
    projector = d_s * d_t + d_t
    singer = config.train.method == "singer"
    rank = config.singer.rank
    rows = [Row("student/model.safetensors (fp32)", ("student/model.safetensors",), student_params * FP32),
            Row(f"projectors.safetensors ({len(layers)} x Linear {d_s}->{d_t})", ("projectors.safetensors",),
                len(layers) * projector * FP32)]
    trained = student_params + len(layers) * projector
    if singer:
        rows += [Row(f"refiner.safetensors (rank {rank} factors, {len(layers)} layers)", ("refiner.safetensors",),
                     len(layers) * 2 * d_t * rank * FP32),
                 Row(f"refined_teacher.safetensors ({len(layers)} x merged {d_t}x{d_t})",
                     ("refined_teacher.safetensors",), len(layers) * d_t * d_t * FP32)]
        trained += len(layers) * 2 * d_t * rank
    moments = 2 if config.train.optimizer == "adamw" else 1
    frozen_bases = len(layers) * d_t * d_t if singer else 0
    rows.append(Row(f"checkpoint.pt (weights + {moments} optimizer moment(s), refiner identity bases)",
                    ("checkpoint.pt",), (trained * (1 + moments) + frozen_bases) * FP32))
    rows += _export_rows(config, student_params + projector)
    img_size = config.student.kwargs.get("img_size", 224)
    per_image = (3 * img_size ** 2 + d_s + tokens * d_s + tokens * d_t) * FP32
    golden = min(config.export.golden_size, config.data.eval_n)
    if config.export.formats:
        rows.append(Row(f"export/goldens/reference (shared: {golden} images + outputs)",
                        ("export/goldens/reference/golden.npz",), golden * per_image))
        if config.export.polygraphy_goldens:
            rows.append(Row("export/goldens/reference polygraphy JSON (base64)", (), golden * per_image * 4 / 3))
    records = config.train.steps // config.train.log_every
    rows.append(Row(f"metrics.jsonl ({records} records, ~1 kB each)", ("metrics.jsonl",), records * 1000))
    return rows, len(_artifacts(config)) * config.data.eval_n * per_image


def _artifacts(config: RunConfig) -> list[str]:
    precision, formats = config.export.precision, set(config.export.formats)
    artifacts = [f"onnx/{precision}"] if "onnx" in formats else []
    if "openvino" in formats:
        artifacts += ["openvino/fp32", "openvino/fp16"] + (["openvino/int8"] if precision == "int8" else [])
    return artifacts + ([f"tensorrt/{precision}"] if "tensorrt" in formats else [])


def _export_rows(config: RunConfig, exported: int) -> list[Row]:
    """The exported graphs: student + last-layer projector weights at each artifact's precision."""
    precision, formats = config.export.precision, set(config.export.formats)
    low = {"fp32": FP32, "fp16": FP16, "bf16": FP16, "int8": 1}[precision]
    rows = []
    if formats & {"onnx", "openvino", "tensorrt"}:
        rows.append(Row("export/student.onnx (fp32, the graph every backend starts from)", ("export/student.onnx",),
                        exported * FP32))
    if precision != "fp32" and formats & {"onnx", "tensorrt"}:
        rows.append(Row(f"export/student_{precision}.onnx", (f"export/student_{precision}.onnx",), exported * low))
    if "openvino" in formats:
        for name, size in [("fp32", FP32), ("fp16", FP16)] + ([("int8", 1)] if precision == "int8" else []):
            rows.append(Row(f"export/student_{name}.xml+.bin",
                            (f"export/student_{name}.xml", f"export/student_{name}.bin"), exported * size))
    if "tensorrt" in formats:
        rows.append(Row(f"export/student_{precision}.engine (weights only)", (f"export/student_{precision}.engine",),
                        exported * low))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    args = parser.parse_args(argv)
    rows, per_artifact_goldens = estimate(args.config)
    print("| file | MB |\n|---|---|")
    for row in rows:
        print(f"| {row.label} | {row.bytes / MB:,.1f} |")
    print(f"| **total** | **{sum(row.bytes for row in rows) / MB:,.0f}** |")
    print(f"\nNot counted: {', '.join(NOT_COUNTED)}.")
    print(f"Goldens stored per artifact with every parity image (the layout before the shared reference set) "
          f"would take {per_artifact_goldens / MB:,.0f} MB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
