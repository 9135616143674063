"""The faithful default at the paper's scale: what a SiNGER step costs next to a FitNet step, measured in one run.

Teacher: the planted ViT-L/14-depth teacher (PlantedConfig preset "vit_l14": 24 blocks, width 1024, 16 heads,
LayerScale, 224 px, 256 patch tokens; artifacts written at block 10, or over blocks 10-12 with --grown) on synthetic
images with 2% flat patches (where its artifacts land). Student: ViT-S/14 (timm vit_small_patch14_dinov2 at 224 px,
random weights). Distilled layers [17] + the last (23), batch 8, AdamW, what distill() runs per step (train_step):
  faithful   the default SiNGER step (preset "faithful": the counterfactual L_out target, L_info on normal tokens;
             with --no-last-block-info, without the last layer's hold of its kept tokens)
  fitnet     the raw-target step (method "fitnet") on the same teacher and student
The two take turns (bench_distill._time_interleaved), so load from other processes hits both alike; each figure is
the median of --steps steps after --warmup. Also timed: building the teacher, and the one-time subspace estimate
(4 batches of 8, what the faithful run does before its first step; distill() reads `singer.estimate_batches`), in
wall time and in this process's CPU time (on a shared CPU the wall time also holds other processes' turns).
Precision: bf16 autocast where the device runs bf16 natively (CUDA; a CPU with AVX512-BF16 or AMX), fp32 elsewhere.
Peak memory: the process's peak resident set (CPU) or torch's peak allocation (CUDA).
With --profile, one more step of each method runs under cProfile and the script prints where its time goes (STEP_PARTS:
the teacher and student forwards, SiNGER's L_info teacher block runs, the counterfactual targets, the adapters, the
backward pass, the optimizer), before the ratio line. On CUDA the parts are launch times, not device times.
With --flops, one more step of each method runs under torch's FlopCounterMode (matrix products and attention,
forward and backward) and the script prints their ratio: the step-time ratio a device would reach if the step's time
were all arithmetic, whatever the implementation of the same losses.

    python benchmarks/bench_method_scale.py [--steps 5] [--warmup 1] [--batch 8] [--grown] [--threads N] [--profile]
                                            [--flops] [--no-last-block-info]

The last line is `faithful/fitnet step time: R`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time

import torch
from torch.ops import aten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from bench_distill import _device_name, _sync, _time_interleaved, distill_step_call

from singer_deploy.config import SingerConfig, planted_preset
from singer_deploy.devices import autocast_for
from singer_deploy.method.alignment import map_layers, resolve_teacher_layers
from singer_deploy.method.artifact_subspace import estimate_artifact_subspaces
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import build_planted_teacher

STUDENT = "vit_small_patch14_dinov2"
LAYERS = [17]            # + the last block, as distill() always adds it
ESTIMATE_BATCHES = 4
FLAT_SHARE = 0.02
# --profile: (label, module path suffix, function) whose cumulative time cProfile reports per step.
STEP_PARTS = (("teacher + student forward", "models/backbone.py", "forward_taps"),
              ("L_info teacher block runs", "method/losses.py", "_block_info"),
              ("counterfactual L_out targets", "method/losses.py", "_target"),
              ("refinement adapters", "method/refine.py", "forward"),
              ("backward", "autograd/graph.py", "_engine_run_backward"),
              ("optimizer (AdamW)", "torch/optim/adam.py", "step"))


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = _precision(device)
    began = time.perf_counter()
    planted = build_planted_teacher(planted_preset("vit_l14", grow_blocks=3 if args.grown else 1))
    built_s = time.perf_counter() - began
    teacher = planted.backbone.requires_grad_(False).eval()
    del planted   # the clean twin is not needed here
    config = planted_preset("vit_l14")
    images = stack_images(SyntheticShapes(args.batch * (ESTIMATE_BATCHES + 1), config.img_size, config.patch_size,
                                          flat_share=FLAT_SHARE, seed=0)).to(device)
    teacher_layers = resolve_teacher_layers(LAYERS, teacher.depth)
    batch = images[:args.batch]
    steps, singer = {}, SingerConfig(last_block_info=not args.no_last_block_info)
    for method in ("singer", "fitnet"):
        torch.manual_seed(0)
        student = load_backbone(STUDENT, img_size=config.img_size)
        student_layers = map_layers(teacher_layers, teacher.depth, student.depth, force_last=True)
        steps[method] = distill_step_call(teacher, student, teacher_layers, student_layers, singer, method,
                                          batch, precision)
    module = steps["singer"][0]
    began, cpu_began = time.perf_counter(), time.process_time()
    with autocast_for(precision, device):
        subspaces = estimate_artifact_subspaces(module.teacher, images[args.batch:].split(args.batch),
                                                teacher_layers, module.singer_loss.config.select_k,
                                                max_rank=module.singer_loss.config.rank)
    _sync(device)
    estimate_s, estimate_cpu_s = time.perf_counter() - began, time.process_time() - cpu_began
    module.singer_loss.subspaces = subspaces
    variant = "; faithful without the last layer's hold of its kept tokens" if args.no_last_block_info else ""
    print(f"{_device_name(device)}, torch {torch.__version__}, precision {precision}; planted vit_l14"
          f"{' grown (blocks 10-12)' if args.grown else ' (block 10)'} -> {STUDENT}, 224 px, layers "
          f"{teacher_layers}, batch {args.batch}, {FLAT_SHARE:.0%} flat patches; median of {args.steps} steps each "
          f"after {args.warmup} warm-up{variant}", flush=True)
    for layer, found in subspaces.items():
        print(f"  subspace of layer {layer}: {found.describe() if found else 'none'}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    faithful_ms, fitnet_ms = _time_interleaved([steps["singer"][1], steps["fitnet"][1]], args.steps, args.warmup,
                                               device)
    print(f"teacher build            {built_s:8.1f} s")
    print(f"subspace estimate        {estimate_s:8.1f} s   ({ESTIMATE_BATCHES} batches of {args.batch}, layers "
          f"{teacher_layers}; {estimate_cpu_s:.1f} s of CPU time over all threads)")
    print(f"faithful SiNGER step     {faithful_ms / 1e3:8.2f} s")
    print(f"FitNet step              {fitnet_ms / 1e3:8.2f} s")
    kind = "torch allocation" if device.type == "cuda" else "resident set"
    print(f"peak memory              {_peak_gib(device):8.2f} GiB ({kind})")
    if args.profile:
        _print_step_parts({"faithful": steps["singer"][1], "fitnet": steps["fitnet"][1]}, device)
    if args.flops:
        faithful_flops, fitnet_flops = (_step_flops(steps[method][1]) for method in ("singer", "fitnet"))
        print(f"faithful SiNGER step     {faithful_flops / 1e12:8.2f} TFLOP (matrix products and attention)")
        print(f"FitNet step              {fitnet_flops / 1e12:8.2f} TFLOP")
        print(f"faithful/fitnet arithmetic: {faithful_flops / fitnet_flops:.2f}")
    print(f"faithful/fitnet step time: {faithful_ms / fitnet_ms:.2f}")


def _print_step_parts(calls: dict, device: torch.device) -> None:
    """One cProfile'd step per method: seconds per STEP_PARTS entry (cumulative, so nested parts overlap: the L_info
    runs and the targets are inside neither forward_taps nor each other)."""
    spent = {}
    for name, call in calls.items():
        profile = cProfile.Profile()
        began = time.perf_counter()
        profile.runcall(call)
        _sync(device)
        spent[name] = (time.perf_counter() - began, pstats.Stats(profile).stats)
    print(f"one profiled step        {'  '.join(f'{name:>9}' for name in spent)}")
    for label, path, function in STEP_PARTS:
        cells = [sum(row[3] for (file, _, func), row in stats.items() if file.endswith(path) and func == function)
                 for _, stats in spent.values()]
        print(f"  {label:<29}" + "  ".join(f"{cell:8.2f}s" for cell in cells))
    print(f"  {'whole step':<29}" + "  ".join(f"{wall:8.2f}s" for wall, _ in spent.values()))


def _step_flops(call) -> int:
    """Floating-point operations of one step as torch counts them (FlopCounterMode: matrix products, convolutions
    and attention; element-wise work is not counted). torch's table has no entry for the CPU's fused attention, so
    it is counted with the formulas of the CUDA kernels computing the same products."""
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda query, key, value, *_, **__: sdpa_flop_count(query, key, value),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad_out, query, key, value, *_, **__: sdpa_backward_flop_count(grad_out, query, key, value)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        call()
    return counter.get_total_flops()


def _precision(device: torch.device) -> str:
    """bf16 where the device runs it natively, else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from singer_deploy.export.hardware import host_capabilities

    return "bf16" if host_capabilities().bf16 else "fp32"


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grown", action="store_true", help="the grown variant (writers at blocks 10, 11, 12)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print where one step of each method goes")
    parser.add_argument("--no-last-block-info", action="store_true",
                        help="the faithful step without the last layer's hold of its kept tokens "
                             "(last_block_info off; docs/method.md, \"The last layer's L_info\")")
    parser.add_argument("--flops", action="store_true", help="also count one step's arithmetic per method")
    return parser.parse_args()


if __name__ == "__main__":
    main()
