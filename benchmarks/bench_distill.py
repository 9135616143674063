"""Distillation throughput against its bound, measured in one run.

bound = bare teacher forward (no_grad, up to the deepest distilled block) + bare student forward+backward (up to the
deepest mapped block), the work any feature-distillation step must do. A distillation step adds the projectors, the
refinement adapters, the losses (L_info runs the teacher's next block with grad), gradient clipping and the AdamW
step. ratio = distill img/s / bound img/s (1.0 = no overhead beyond the bound).

    python benchmarks/bench_distill.py                     # ViT-L/16 -> ViT-S/16, 224 px, batch 128 (a GPU run)
    python benchmarks/bench_distill.py --tiny              # CPU smoke run on tiny random ViTs

bf16 autocast on CUDA, fp32 on CPU (as `TrainConfig(precision="auto")`). Random weights: throughput does not depend
on them. Each configuration is timed with and without torch.compile unless --compile says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from singer_deploy.models.backbone import Backbone, load_backbone
from singer_deploy.config import SingerConfig
from singer_deploy.devices import autocast_for, compute_dtype
from singer_deploy.config import TrainConfig
from singer_deploy.train.loop import DistillStep, make_optimizer, train_step
from singer_deploy.method.alignment import map_layers, resolve_teacher_layers

TINY_TEACHER = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
TINY_STUDENT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@dataclass
class Timing:
    step_ms: float
    teacher_ms: float
    student_ms: float
    peak_gb: float | None


def main() -> None:
    args = _parse()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    teacher_kwargs, student_kwargs = (TINY_TEACHER, TINY_STUDENT) if args.tiny else ({}, {})
    img_size = TINY_TEACHER["img_size"] if args.tiny else args.img_size
    if not args.tiny:
        teacher_kwargs = student_kwargs = dict(img_size=img_size)
    # Stays on the CPU in fp32: each DistillStep takes its own truncated copy to the device (as distill() does).
    teacher = load_backbone(args.teacher, **teacher_kwargs).requires_grad_(False).eval()
    images = torch.randn(args.batch, 3, img_size, img_size, device=device)
    compile_modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    print(f"device {_device_name(device)}, torch {torch.__version__}, precision {precision}, teacher {args.teacher} "
          f"(depth {teacher.depth}, D {teacher.embed_dim}), student {args.student}, {img_size} px, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps")
    rows = []
    for layer_set in args.layers:
        user, with_last = _layer_set(layer_set)
        teacher_layers = resolve_teacher_layers(user, teacher.depth, append_last=with_last)
        for method in args.methods:
            for compiled in compile_modes:
                torch.manual_seed(0)
                student = load_backbone(args.student, **student_kwargs)
                student_layers = map_layers(teacher_layers, teacher.depth, student.depth, force_last=True)
                singer = SingerConfig(rank=min(args.rank, teacher.embed_dim), preset="published")
                timing = _measure(teacher, student, teacher_layers, student_layers, singer, method, images,
                                  precision, compiled, args.steps, args.warmup)
                bound_ms = timing.teacher_ms + timing.student_ms
                rows.append({"method": method, "layers": str(teacher_layers), "student": str(student_layers),
                             "compile": "yes" if compiled else "no",
                             "img/s": args.batch / timing.step_ms * 1e3, "bound img/s": args.batch / bound_ms * 1e3,
                             "ratio": bound_ms / timing.step_ms, "step ms": timing.step_ms,
                             "teacher fwd ms": timing.teacher_ms, "student f+b ms": timing.student_ms,
                             "peak GB": timing.peak_gb})
                print(_line(rows[-1]), flush=True)
                del student
    print()
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": _device_name(device), "torch": torch.__version__,
                                               "precision": precision, "teacher": args.teacher,
                                               "student": args.student, "img_size": img_size, "batch": args.batch,
                                               "rows": rows}, indent=2))


def _measure(teacher: Backbone, student: Backbone, teacher_layers: list[int], student_layers: list[int],
             singer: SingerConfig, method: str, images: torch.Tensor, precision: str, compiled: bool, steps: int,
             warmup: int) -> Timing:
    """Our full step is `train_step` of singer_deploy.train.loop (what `distill()` runs) on the same DistillStep;
    the bound runs the step's own frozen teacher copy (bf16 weights under bf16, truncated) and the same student."""
    device = images.device
    module, distill_step = distill_step_call(teacher, student, teacher_layers, student_layers, singer, method, images,
                                             precision, compiled)
    autocast = autocast_for(precision, device)
    frozen = module.teacher
    teacher_forward = torch.compile(frozen.forward_taps) if compiled else frozen.forward_taps
    student_forward = torch.compile(student.forward_taps) if compiled else student.forward_taps

    def teacher_step():
        with torch.no_grad(), autocast:
            teacher_forward(images, teacher_layers)

    def student_step():
        with autocast:
            taps = student_forward(images, student_layers)
            loss = sum(tap.float().square().mean() for tap in taps.values())
        loss.backward()
        student.model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms, teacher_ms, student_ms = _time_interleaved([distill_step, teacher_step, student_step], steps, warmup,
                                                        device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return Timing(step_ms, teacher_ms, student_ms, peak)


def distill_step_call(teacher: Backbone, student: Backbone, teacher_layers: list[int], student_layers: list[int],
                      singer: SingerConfig, method: str, images: torch.Tensor, precision: str,
                      compiled: bool = False):
    """(the DistillStep, a call running one `train_step` of it on `images`): what distill() runs per step, with
    AdamW at lr 1e-4 over every trained parameter (benchmarks/bench_method_scale.py times the same call)."""
    device = images.device
    train = TrainConfig(precision=precision, device=device.type, lr=1e-4, compile=compiled)
    module = DistillStep(teacher, student, teacher_layers, student_layers, singer, method,
                         teacher_dtype=compute_dtype(precision, device)).to(device)
    module.student.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(train, [{"params": params}], device)
    autocast = autocast_for(precision, device)
    runner = torch.compile(module) if compiled else module
    return module, lambda: train_step(runner, images, optimizer, None, module.clip_groups(), train.grad_clip,
                                      autocast)


def _time_interleaved(calls, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Median milliseconds per call. The calls take turns, so load from other processes on a shared machine hits
    the distillation step and its bound alike; the median shrugs off a stray slow step."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(steps):
        for call, spent in zip(calls, times):
            _sync(device)
            began = time.perf_counter()
            call()
            _sync(device)
            spent.append((time.perf_counter() - began) * 1e3)
    return [statistics.median(spent) for spent in times]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_set(text: str) -> tuple[list[int], bool]:
    """"17" -> ([17], no last block added); "17,last" -> ([17], last block added)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    with_last = "last" in parts
    return [int(part) for part in parts if part != "last"], with_last


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _line(row: dict) -> str:
    return ", ".join(f"{key} {_fmt(value)}" for key, value in row.items())


def _print_table(rows: list[dict]) -> None:
    keys = [key for key in rows[0] if key != "peak GB" or any(row[key] is not None for row in rows)]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(_fmt(row[key]) for key in keys) + " |")


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="vit_large_patch16_224")
    parser.add_argument("--student", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--layers", nargs="+", default=["17", "17,last"],
                        help='teacher layer sets; "last" adds the last block (e.g. 17 and 17,last)')
    parser.add_argument("--methods", nargs="+", default=["singer", "fitnet"], choices=["singer", "fitnet"])
    parser.add_argument("--rank", type=int, default=64, help="adapter rank (published 64)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", default="both", choices=["both", "on", "off"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file (benchmarks/gpu_check.py reads it)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random ViTs (32 px, teacher 4 blocks, student 2), layers 2 and 2,last, batch 8, "
                             "10 steps: a CPU smoke run")
    args = parser.parse_args()
    if args.tiny:
        args.teacher = args.student = "vit_tiny_patch16_224"
        args.batch, args.steps, args.warmup = min(args.batch, 8), min(args.steps, 10), min(args.warmup, 3)
        if args.layers == parser.get_default("layers"):
            args.layers = ["2", "2,last"]
    return args


if __name__ == "__main__":
    main()
