"""Does the data-driven token selection find the planted artifact tokens, at every strength, and nothing on a clean
teacher? (docs/method.md, "Token selection"; docs/results.md, "Token selection".)

For each planted family (benchmarks/compare_planted.py CASES) at each strength rho (the artifact tokens' median norm
over the others' at the writer), the faithful estimate (method/artifact_subspace.py, select_k unset) runs on
--estimate-images images; its `select` is then scored on --eval-images held-out images against the ground truth:
precision and recall per distilled layer (4 and 7), with the share and strength the estimate reports and the
threshold it chose. The same is run on each family's clean twin (its selected share must be ~0). It also prints, per
case, the candidate step's margin (selection.write_cut): over blocks 1..layer, the widest gap in the sorted write
scores that has artifact tokens only above it, and the widest with content only above it, each over its lower edge
(a block writes the tokens above a gap of at least GAP_RATIO); the truth at a layer is every cluster written at or
before it. --trained STEPS runs the teachers trained on the shapes task (cached; docs/planted_teacher.md).

    python benchmarks/planted_selection.py [--cases 8c,2c,...] [--rhos 2.5,3,5,10] [--estimate-images 256]
                                           [--trained STEPS] [--share S] [--img-size PX]

--share S gives every case S of the patches (flat patches per image, or the position share) instead of its own 8% or
2%: the selection is asked to hold from 0.5% to 10%. At 64 px (64 patches) one flat patch an image is 1.6%;
--img-size 128 builds the untrained teachers at 128 px (256 patches), where one is 0.4%.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from compare_planted import ALL_CASES, CASES, LAYERS, RANK
from singer_deploy.evaluation.analysis import planted_mask
from singer_deploy.method.artifact_subspace import estimate_artifact_subspaces
from singer_deploy.method.metrics import mask_precision_recall
from singer_deploy.method.selection import MAX_WRITTEN_SHARE, block_write_scores
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted_training import planted_teacher


def gap_margins(backbone, images: torch.Tensor, layer: int, truth: torch.Tensor) -> tuple[float, float]:
    """(artifact, content): over blocks 1..layer of the raw teacher on one batch, the widest gap in a block's sorted
    write scores (selection.block_write_scores, top MAX_WRITTEN_SHARE) with only artifact tokens (`truth`, (B, N))
    above it, and the widest with only content above it, each over its lower edge (at least 1) as write_cut
    measures it."""
    taps = backbone.forward_taps(images, list(range(layer + 1)))
    p = backbone.num_prefix_tokens
    widest = {True: 0.0, False: 0.0}
    for block in range(1, layer + 1):
        scores = block_write_scores(taps[block][:, p:] - taps[block - 1][:, p:])
        ranked, order = scores.flatten().sort(descending=True)
        top = ranked[:max(1, int(MAX_WRITTEN_SHARE * len(ranked))) + 1]
        ratios = (top[:-1] - top[1:]) / top[1:].clamp_min(1.0)
        artifact = truth.flatten()[order][:len(ratios)]
        for kind in (True, False):
            only = (artifact == kind).cumprod(0).bool()     # gaps with only this kind above them
            if only.any():
                widest[kind] = max(widest[kind], float(ratios[only].max()))
    return widest[True], widest[False]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rhos", default=None,
                        help="strengths (default 2.5,3,5,10; with --trained the family's own: training is per teacher)")
    parser.add_argument("--estimate-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--trained", type=int, default=0, metavar="STEPS",
                        help="teachers trained on the shapes task for STEPS steps (cached); 0 = untrained")
    parser.add_argument("--share", type=float, default=None, help="the artifact share of every case (module doc)")
    parser.add_argument("--img-size", type=int, default=None, help="untrained teachers' image size (module doc)")
    args = parser.parse_args()
    if args.img_size and args.trained:
        parser.error("--img-size builds untrained teachers; the trained ones are trained at 64 px")
    rhos = [float(r) for r in (args.rhos or ("" if args.trained else "2.5,3,5,10")).split(",") if r] or [None]
    print("| case | rho | layer | precision | recall | share (true) | strength | threshold | writers | clean twin share"
          " | write gap: artifacts / content |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in args.cases.split(","):
        case = ALL_CASES[key].trained(args.trained)
        if args.share is not None:      # a family's label follows its share; a named combination's gets it added
            named = case.name and f"{case.name}, {args.share * 100:g}% of the patches"
            case = replace(case, share=args.share, name=named)
        for rho in rhos:
            config = case.planted() if rho is None else replace(case.planted(), rho=rho)
            config = config if args.img_size is None else replace(config, img_size=args.img_size)
            planted = planted_teacher(config)
            rho = config.rho
            train, held = (stack_images(SyntheticShapes(n, config.img_size, config.patch_size, flat_share=case.share,
                                                        seed=seed))
                           for n, seed in ((args.estimate_images, 0), (args.eval_images, 1)))
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
                # Per estimation-sized batch, as the estimate cuts: the narrowest artifact gap, the widest content one.
                margins = [gap_margins(planted.backbone, images, layer, mask)
                           for images, mask in zip(held.split(32), truth.split(32))]
                artifact_gap, content_gap = min(m[0] for m in margins), max(m[1] for m in margins)
                facts = subspace.summary() if subspace else None
                sel = facts["selection"] if facts else {}
                print(f"| {case.label} | {rho:g} | {layer} | {precision:.3f} | {recall:.3f} | "
                      f"{sel.get('share', 0):.3f} ({float(truth.float().mean()):.3f}) | {sel.get('strength', 0):.2f} | "
                      f"{sel.get('threshold', '-')} | {','.join(facts['writers']) if facts else '-'} | "
                      f"{twin_share:.4f} | {artifact_gap:.2f} / {content_gap:.2f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
