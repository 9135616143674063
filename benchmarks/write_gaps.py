"""How wide are the gaps in a block's write scores, by how many tokens sit above them? The data for the candidate rule
(method/selection.py, write_cut; docs/results.md, "The refined teacher on trained teachers").

write_cut calls a block's tokens above a gap writes when the gap is at least GAP_RATIO times its lower edge, whatever
the number of tokens above it. This measures, over the planted families (compare_planted's twelve cases, untrained)
and the trained teachers in --trained (cached; each is trained once per machine), raw teacher and clean twin, blocks
1-7, batches of 32 held-out images (seed 5):
  content gaps   the widest gap (over its lower edge, the edge taken as 1 at least) with no planted artifact token
                 above it (on a clean twin: any gap), among the top MAX_WRITTEN_SHARE, for gaps with at least a
                 given share of the batch's tokens above them
  writer gaps    per case and writer block (a planted cluster's first..last block), the widest gap with only that
                 cluster's tokens above it, at least 40% of them, in the batch where it is narrowest (0: a batch without
                 one); the weakest --show of them

    python benchmarks/write_gaps.py [--trained 2c,2g,2two,2p,2v,8c,8two,8g] [--steps 3000] [--images 128]
"""

from __future__ import annotations

import argparse
import torch
from compare_planted import CASES, _images

from singer_deploy.method.selection import MAX_WRITTEN_SHARE, block_write_scores
from singer_deploy.models.planted_training import planted_teacher

SHARES_ABOVE = (0.0, 0.002, 0.005, 0.01, 0.02)
BATCH, IMAGE_SEED, WRITTEN_SHARE = 32, 5, 0.4


def batch_gaps(scores: torch.Tensor, planted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores, planted: (B, N). Per gap among the top MAX_WRITTEN_SHARE of the sorted scores: its width over its lower
    edge, the tokens above it, and the planted tokens among them."""
    order = scores.flatten().argsort(descending=True)
    ranked, is_planted = scores.flatten()[order], planted.flatten()[order]
    top = int(MAX_WRITTEN_SHARE * len(ranked)) + 1
    ratios = (ranked[:top - 1] - ranked[1:top]) / ranked[1:top].clamp_min(1.0)
    return ratios, torch.arange(1, top), is_planted[:top - 1].cumsum(0)


def measure(case, images: int, content: dict, writers: dict) -> None:
    planted = planted_teacher(case.planted())
    p = planted.backbone.num_prefix_tokens
    for teacher, model in (("raw", planted.backbone.eval()), ("twin", planted.clean.eval())):
        for batch in _images(planted, images, case.share, IMAGE_SEED).split(BATCH):
            with torch.no_grad():
                taps = model.forward_taps(batch, list(range(planted.config.depth)))
            clusters = planted.cluster_masks(batch)
            mask = torch.stack(list(clusters.values())).any(0)
            for block in range(1, planted.config.depth):
                scores = block_write_scores(taps[block][:, p:] - taps[block - 1][:, p:])
                ratios, above, planted_above = batch_gaps(scores, mask)
                where = f"{case.label}{' trained' if case.training else ''}, {teacher}, block {block}"
                only_content = torch.ones_like(ratios, dtype=torch.bool) if teacher == "twin" else planted_above == 0
                for share in SHARES_ABOVE:
                    keep = only_content & (above >= share * mask.numel())
                    if keep.any() and float(ratios[keep].max()) > content.get(share, (0.0, ""))[0]:
                        i = int(ratios.masked_fill(~keep, -1).argmax())
                        content[share] = (float(ratios[i]), f"{where}, {int(above[i])} tokens above")
                for cluster in planted.clusters if teacher == "raw" else ():
                    if not cluster.first_block <= block <= cluster.last_block:
                        continue
                    ratios, above, written_above = batch_gaps(scores, clusters[cluster.name])
                    keep = (written_above == above) & (above >= WRITTEN_SHARE * int(clusters[cluster.name].sum()))
                    i = int(ratios.masked_fill(~keep, -1).argmax())
                    found = (float(ratios[i]), int(above[i])) if keep.any() else (0.0, 0)
                    key = f"{where}, {cluster.name}"
                    writers[key] = min(writers.get(key, found), found)     # the batch it stands out least in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", default="2c,2g,2two,2p,2v,8c,8two,8g")
    parser.add_argument("--steps", type=int, default=3000, help="PlantedTraining steps of the trained teachers")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--show", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = list(CASES.values()) + [CASES[key].trained(args.steps) for key in args.trained.split(",") if key]
    content, writers = {}, {}
    for case in cases:
        measure(case, args.images, content, writers)
        print(f"  done: {case.label}{' trained' if case.training else ''}", flush=True)
    print("\n| tokens above the gap | widest content gap / lower edge | where |\n|---|---|---|")
    for share, (ratio, where) in sorted(content.items()):
        print(f"| >= {share:.1%} | {ratio:.3f} | {where} |")
    print(f"\n| writer (weakest {args.show}) | widest gap with only planted tokens above / lower edge | tokens above |"
          "\n|---|---|---|")
    for where, (ratio, above) in sorted(writers.items(), key=lambda item: item[1])[:args.show]:
        print(f"| {where} | {ratio:.3f} | {above} |")


if __name__ == "__main__":
    main()
