"""What the artifact-subspace estimate finds on every planted family, before any training (seconds on a CPU).

Per case and distilled layer (4 and 7): the subspace's rank, its writer blocks and their shares, the explained share,
the smallest captured share of a planted direction written at or before the layer (1.0 = the direction lies in the
subspace), the largest excess of a direction left outside it (the margin of the choice, in the estimate's units:
EXCESS_LIMIT 10, WRITTEN_LIMIT 2 at a writer), and the cosine of the counterfactual target to the clean twin on the
artifact tokens (mean and 1st percentile) - the best a refinement trained on it could reach.

    python benchmarks/planted_estimates.py [--cases 8c,2c,...] [--max-rank 8] [--select-k K] [--trained STEPS]
"""

from __future__ import annotations

import argparse

import torch
from compare_planted import ALL_CASES, CASES, _images

from singer_deploy.method.artifact_subspace import estimate_artifact_subspaces
from singer_deploy.method.metrics import token_cosines
from singer_deploy.models.planted_training import planted_teacher


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--max-rank", type=int, default=8)
    parser.add_argument("--select-k", type=float, default=None, help="the fixed norm rule (default: from the data)")
    parser.add_argument("--trained", type=int, default=0, metavar="STEPS",
                        help="teachers trained on the shapes task for STEPS steps (cached; compare_planted.py's flag)")
    args = parser.parse_args()
    print("| case | layer | rank | writers (share) | explained share | min captured | next excess | target cos clean "
          "| p1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in args.cases.split(","):
        case = ALL_CASES[key].trained(args.trained)
        planted = planted_teacher(case.planted())
        teacher, p = planted.backbone, planted.backbone.num_prefix_tokens
        train = _images(planted, 256, case.share, 0)
        found = estimate_artifact_subspaces(teacher, train.split(32), case.layers, args.select_k,
                                             max_rank=args.max_rank)
        held_out = _images(planted, 128, case.share, 1)
        truth = planted.artifact_mask(held_out)
        raw = teacher.forward_taps(held_out, list(range(max(case.layers) + 1)))
        clean = planted.clean.forward_taps(held_out, case.layers)
        for layer in case.layers:
            subspace = found[layer]
            written = [w for w in planted.writers if w.block <= layer]
            directions = [w.direction for w in written] + [v for w in written if w.varying is not None
                                                            for v in w.varying]
            captured = min(float((subspace.basis.double() @ d.double()).square().sum()) for d in directions)
            selected = subspace.select(raw[layer][:, p:])
            target = subspace.counterfactual(raw, layer, selected, teacher.run_block_rows, p)
            cos = token_cosines(target[:, p:], clean[layer][:, p:])[truth]
            writers = ", ".join(f"{b} ({s:.0%})" for b, s in sorted(subspace.writers.items()))
            print(f"| {case.label} | {layer} | {subspace.rank} | {writers} | {subspace.explained_share:.4f} | "
                  f"{captured:.4f} | {subspace.next_excess:.1f} | {cos.mean():.4f} | {cos.quantile(0.01):.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
