"""Does the data-driven token selection find the planted artifact tokens, at every strength, and nothing on a clean
teacher? (docs/method.md, "Token selection"; docs/results.md, "Token selection".)

For each planted family (benchmarks/compare_planted.py CASES) at each strength rho (the artifact tokens' median norm
over the others' at the writer), the faithful estimate (method/artifact_subspace.py, select_k unset) runs on
--estimate-images images; its `select` is then scored on --eval-images held-out images against the ground truth:
precision and recall per distilled layer (4 and 7), with the share and strength the estimate reports and the
threshold it chose. The same is run on each family's clean twin (its selected share must be ~0). It also prints, per
case, the candidate step's margin: the smallest write z-score of an artifact token at its writer and the largest of
any other token (selection.write_outliers); the truth at a layer is every cluster written at or before it.

    python benchmarks/planted_selection.py [--cases 8c,2c,...] [--rhos 2.5,3,5,10] [--estimate-images 256]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from compare_planted import ALL_CASES, CASES, LAYERS, RANK
from singer_deploy.evaluation.analysis import planted_mask
from singer_deploy.method.artifact_subspace import estimate_artifact_subspaces
from singer_deploy.method.metrics import mask_precision_recall
from singer_deploy.method.selection import write_scores
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import build_planted_teacher


def token_write_scores(backbone, images: torch.Tensor, layer: int) -> torch.Tensor:
    """selection.write_scores of the raw teacher's patch tokens over blocks 1..layer (B, N)."""
    taps = backbone.forward_taps(images, list(range(layer + 1)))
    p = backbone.num_prefix_tokens
    patches = [taps[b][:, p:].float() for b in range(layer + 1)]
    return write_scores([patches[0]] + [patches[b] - patches[b - 1] for b in range(1, layer + 1)])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rhos", default="2.5,3,5,10")
    parser.add_argument("--estimate-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=256)
    args = parser.parse_args()
    print("| case | rho | layer | precision | recall | share (true) | strength | threshold | writers | clean twin share"
          " | write z: artifacts min / others max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in args.cases.split(","):
        case = ALL_CASES[key]
        for rho in (float(r) for r in args.rhos.split(",")):
            planted = build_planted_teacher(replace(case.planted(), rho=rho))
            train = stack_images(SyntheticShapes(args.estimate_images, 64, 8, flat_share=case.share, seed=0))
            held = stack_images(SyntheticShapes(args.eval_images, 64, 8, flat_share=case.share, seed=1))
            truth_at = planted_mask(planted)
            found = estimate_artifact_subspaces(planted.backbone, train.split(32), LAYERS, None, max_rank=RANK)
            clean = estimate_artifact_subspaces(planted.clean, train.split(32), LAYERS, None, max_rank=RANK)
            raw = planted.backbone.forward_taps(held, list(LAYERS))
            twin = planted.clean.forward_taps(held, list(LAYERS))
            for layer in LAYERS:
                subspace, p = found[layer], planted.backbone.num_prefix_tokens
                truth = truth_at(held, layer, raw[layer])
                picked = subspace.select(raw[layer][:, p:]) if subspace else torch.zeros_like(truth)
                precision, recall = mask_precision_recall(picked, truth)
                twin_share = (float(clean[layer].select(twin[layer][:, p:]).float().mean())
                              if clean[layer] else 0.0)
                z = token_write_scores(planted.backbone, held, layer)
                z_art = f"{z[truth].min():.1f}" if truth.any() else "-"
                facts = subspace.summary() if subspace else None
                sel = facts["selection"] if facts else {}
                print(f"| {case.label} | {rho:g} | {layer} | {precision:.3f} | {recall:.3f} | "
                      f"{sel.get('share', 0):.3f} ({float(truth.float().mean()):.3f}) | {sel.get('strength', 0):.2f} | "
                      f"{sel.get('threshold', '-')} | {','.join(facts['writers']) if facts else '-'} | "
                      f"{twin_share:.4f} | {z_art} / {z[~truth].max():.1f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
