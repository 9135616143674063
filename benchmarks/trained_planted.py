"""What a trained planted teacher knows, and how strong its artifacts are (docs/planted_teacher.md, "Trained teachers").

For each planted family of compare_planted.py (--cases), the teacher trained by PlantedTraining(steps, flat_share =
the case's share) is built (trained once per machine, then read from the cache) and measured on held-out
SyntheticShapes images (seeds no training or calibration image uses):
  probes    ridge linear probes on the last block: image class from CLS and from the mean patch token, per-patch
            class (background / 1 + shape class) mIoU; fit on 75% of the held-out images, scored on the other 25%
            (evaluation.probes.evaluate_features); the untrained teacher of the same config for reference
  strength  at each writer block, the register neurons' write along their direction, per token, in units of the
            median normal-token norm at that block, on trigger tokens / smooth background / textured (shape) tokens:
            median and 90th percentile
  norms     median norm of the ground-truth artifact tokens / the others', at layers 4 and 7

    python benchmarks/trained_planted.py [--cases 8c,2c,...] [--steps 1000] [--images 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import torch

from compare_planted import CASES, LAYERS
from singer_deploy.config import PlantedTraining
from singer_deploy.evaluation.analysis import planted_mask
from singer_deploy.evaluation.probes import evaluate_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import PlantedTeacher, build_planted_teacher
from singer_deploy.models.planted_training import planted_cache_dir, recipe_key, trained_planted_teacher

HELD_OUT_SEED = 7_000_000
PROBE_KEYS = ("linear_cls_acc", "linear_pooled_acc", "knn_cls_acc", "dense_class_miou")


def probe_row(planted: PlantedTeacher, held_out: SyntheticShapes) -> dict[str, float]:
    scores = evaluate_backbone(planted.backbone, held_out, layer=planted.config.depth - 1, dense=("class",))
    return {key: scores[key] for key in PROBE_KEYS}


@torch.no_grad()
def strength_rows(planted: PlantedTeacher, held_out: SyntheticShapes) -> list[dict]:
    """The writers' update along their direction per token group (module docstring)."""
    items = [held_out[i] for i in range(len(held_out))]
    images = stack_images(items)
    p = planted.config.patch_size
    fg = torch.nn.functional.avg_pool2d(torch.stack([i["fg_mask"] for i in items]).float()[:, None], p).flatten(1)
    masks, backbone = planted.cluster_masks(images), planted.backbone
    any_trigger = torch.stack(list(masks.values())).any(0)
    rows = []
    for writer in planted.writers:
        hidden = {}
        fc2 = backbone.model.blocks[writer.block].mlp.fc2
        handle = fc2.register_forward_pre_hook(lambda _m, args: hidden.setdefault("h", args[0]))
        tokens = backbone.split(backbone.forward_taps(images, [writer.block])[writer.block])[1]
        handle.remove()
        neurons = list(writer.neurons[:2])
        write = hidden["h"][:, backbone.num_prefix_tokens:, neurons] @ (fc2.weight[:, neurons].T @ writer.direction)
        unit = tokens.norm(dim=-1)[~any_trigger].median()
        groups = {"trigger": masks[writer.cluster], "smooth background": (fg == 0) & ~any_trigger,
                  "textured": (fg > 0.5) & ~any_trigger}
        row = {"writer": f"{writer.cluster} @ block {writer.block}", "scale": writer.scale}
        for name, group in groups.items():
            values = write[group] / unit
            row[f"{name} median"] = values.median().item()
            row[f"{name} p90"] = values.quantile(0.9).item()
        rows.append(row)
    return rows


@torch.no_grad()
def norm_ratios(planted: PlantedTeacher, held_out: SyntheticShapes) -> dict[str, float]:
    images = stack_images(held_out)
    backbone, mask = planted.backbone, planted_mask(planted)
    taps = backbone.forward_taps(images, list(LAYERS))
    out = {}
    for layer in LAYERS:
        patches = backbone.split(taps[layer])[1]
        norms, truth = patches.norm(dim=-1), mask(images, layer, patches)
        out[f"norm ratio L{layer}"] = (norms[truth].median() / norms[~truth].median()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=PlantedTraining.images)
    parser.add_argument("--batch-size", type=int, default=PlantedTraining.batch_size)
    parser.add_argument("--lr", type=float, default=PlantedTraining.lr)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the recipe's timing is on 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")   # the training's progress lines
    training = PlantedTraining(steps=args.steps, images=args.images, batch_size=args.batch_size, lr=args.lr)
    print(f"cache: {planted_cache_dir()}, recipe {training}")
    probe_rows, strengths = [], []
    for key in args.cases.split(","):
        case = CASES[key]
        config = replace(case, training=training).planted()   # flat_share = the case's share
        started, started_cpu = time.perf_counter(), time.process_time()
        planted = trained_planted_teacher(config)
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu   # cpu: all threads summed
        held_out = SyntheticShapes(args.held_out, config.img_size, config.patch_size, flat_share=case.share,
                                   seed=HELD_OUT_SEED)
        untrained = build_planted_teacher(case.planted())
        probe_rows.append({"case": case.label, "teacher": "untrained", **probe_row(untrained, held_out),
                           **norm_ratios(untrained, held_out)})
        probe_rows.append({"case": case.label, "teacher": f"trained ({seconds:.0f} s wall, {cpu:.0f} s cpu, key {recipe_key(config)[:8]})",
                           **probe_row(planted, held_out), **norm_ratios(planted, held_out)})
        strengths += [{"case": case.label, **row} for row in strength_rows(planted, held_out)]
        print(f"  done: {case.label} ({seconds:.0f} s to train or load); the tables so far:\n", flush=True)
        _print_table(probe_rows)
        print()
        _print_table(strengths)


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |",
              flush=True)


if __name__ == "__main__":
    main()
