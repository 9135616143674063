"""Do a planted teacher's writers write on its class token too? (docs/results.md, "The refined teacher on trained
teachers").

The counterfactual L_out target cleans the selected patch tokens only (ArtifactSubspace.counterfactual); the adapters
pass prefix tokens unchanged. Where a writer also writes on the class token, the class token the other tokens read is
not the clean twin's. Per case (compare_planted's cases; --trained STEPS for the trained teachers, cached), on 32
held-out images, per block: the class token's mean cosine to the clean twin's, and its norm over the image's median
patch-token norm (median over images).

    python benchmarks/prefix_artifacts.py [--cases 2c,2g,8c,8g,8two] [--trained 3000]
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F
from compare_planted import CASES, _images

from singer_deploy.models.planted_training import planted_teacher


@torch.no_grad()
def class_token_rows(case, images: int = 32) -> tuple[list[float], list[float]]:
    planted = planted_teacher(case.planted())
    blocks, p = list(range(planted.config.depth)), planted.backbone.num_prefix_tokens
    batch = _images(planted, images, case.share, 1)
    raw, twin = planted.backbone.eval().forward_taps(batch, blocks), planted.clean.eval().forward_taps(batch, blocks)
    cosines = [float(F.cosine_similarity(raw[b][:, 0], twin[b][:, 0], dim=-1).mean()) for b in blocks]
    norms = [float((raw[b][:, 0].norm(dim=-1) / raw[b][:, p:].norm(dim=-1).median(dim=1).values).median())
             for b in blocks]
    return cosines, norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="2c,2g,8c,8g,8two")
    parser.add_argument("--trained", type=int, default=3000, metavar="STEPS", help="0: the untrained teachers")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.cases.split(","):
        case = CASES[key].trained(args.trained)
        rows.append((case.label, *class_token_rows(case)))
    depth = len(rows[0][1])
    print("| case | " + " | ".join(f"block {b}" for b in range(depth)) + " |")
    print("|---|" + "---|" * depth)
    for label, cosines, norms in rows:
        print(f"| {label} | " + " | ".join(f"{c:.2f} ({n:.1f}x)" for c, n in zip(cosines, norms)) + " |")
    print("\ncells: the class token's cosine to the clean twin's (its norm over the median patch-token norm)")


if __name__ == "__main__":
    main()
