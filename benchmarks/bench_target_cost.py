"""What the counterfactual L_out target costs per distillation step, measured in one run on the demo's setting.

The faithful preset's target re-runs the selected tokens through the teacher blocks between the first artifact writer
and each distilled layer every step (without gradients; docs/method.md, "Artifact subspace"). The single-direction
target it replaced ran no extra block. Timed side by side, taking turns (so load from other processes hits all
alike), on the demo's planted teacher (8 blocks, artifacts written at block 4, distilled layers 4 and 7), its tiny
student and batch:
  faithful         the default: counterfactual target (the selected tokens re-run through blocks 5-7 for layer 7)
  layer-local      the same subspaces, the target computed at the layer itself (no block run again): the cost of
                   the single-direction target of the previous release
  published        the published losses (quantile L_out), for reference
  fixed 4x         the default with the previous release's token selection (select_k 4: a norm cut each step
                   instead of the projection on the subspace; docs/method.md, "Token selection")
ratio = layer-local ms / faithful ms (1.0 = as fast; the target is >= 0.9); selection ratio = faithful ms / fixed 4x
ms (the data-driven selection's cost per step; the target is <= 1.05).

    python benchmarks/bench_target_cost.py [--steps 30] [--warmup 5] [--batch 32]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from bench_distill import _time_interleaved

from singer_deploy.config import PlantedConfig, SingerConfig, TrainConfig
from singer_deploy.devices import autocast_for
from singer_deploy.method.alignment import map_layers
from singer_deploy.method.artifact_subspace import estimate_artifact_subspaces
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import build_planted_teacher
from singer_deploy.train.loop import DistillStep, make_optimizer, train_step

LAYERS = [4, 7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    teacher = build_planted_teacher(PlantedConfig()).backbone
    images = stack_images(SyntheticShapes(args.batch * 8, 64, 8, flat_share=0.08, seed=0))
    singer = SingerConfig(rank=8)
    subspaces = estimate_artifact_subspaces(teacher, images.split(args.batch), LAYERS, singer.select_k,
                                            max_rank=singer.rank)
    # Writers moved to the layer itself: the counterfactual then runs no block, the previous release's cost.
    local = {layer: replace(s, writers={layer: 1.0}) for layer, s in subspaces.items()}
    fixed = SingerConfig(rank=8, select_k=4.0)
    fixed_subspaces = estimate_artifact_subspaces(teacher, images.split(args.batch), LAYERS, fixed.select_k,
                                                  max_rank=fixed.rank)
    batch = images[:args.batch]
    steps = {"faithful": _step(teacher, singer, subspaces, batch), "layer-local": _step(teacher, singer, local, batch),
             "published": _step(teacher, SingerConfig(preset="published", rank=8), None, batch),
             "fixed 4x": _step(teacher, fixed, fixed_subspaces, batch)}
    times = dict(zip(steps, _time_interleaved(list(steps.values()), args.steps, args.warmup, torch.device("cpu"))))
    print(f"cpu, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.steps} steps each")
    for name, ms in times.items():
        print(f"  {name:12s} {ms:8.1f} ms/step   {args.batch / ms * 1e3:7.1f} img/s")
    print(f"ratio layer-local / faithful = {times['layer-local'] / times['faithful']:.3f} "
          f"(faithful steps/s relative to the previous target's)")
    print(f"selection ratio faithful / fixed 4x = {times['faithful'] / times['fixed 4x']:.3f} "
          f"(the data-driven selection's step time relative to the fixed norm cut)")


def _step(teacher, singer: SingerConfig, subspaces, images: torch.Tensor):
    torch.manual_seed(0)
    student = load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)
    module = DistillStep(teacher, student, LAYERS, map_layers(LAYERS, teacher.depth, student.depth, force_last=True),
                         singer, "singer")
    if subspaces is not None:
        module.singer_loss.subspaces = subspaces
    train = TrainConfig()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(train, [{"params": params}], images.device)
    autocast = autocast_for("fp32", images.device)
    return lambda: train_step(module, images, optimizer, None, module.clip_groups(), train.grad_clip, autocast)


if __name__ == "__main__":
    main()
