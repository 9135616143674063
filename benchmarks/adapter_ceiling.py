"""How close can any map of one raw token get to the faithful target? The ceiling of a token-wise adapter
(docs/results.md, "The refined teacher on trained teachers").

The refinement adapter is a map of each raw token at its layer (method/refine.py). On trained planted teachers the
faithful L_out target (the counterfactual: the teacher re-run without the artifact) is reached at the writer's layer
and not at the last one. This asks whether a stronger token-wise map would reach it, or whether the raw token no
longer holds what the target needs. Per case (compare_planted's cases, teachers trained with --trained STEPS) and
--layers, on the raw taps of 512 training images and 128 held-out ones (compare_planted's images and estimate):
  linear     x + W x + b, W full rank (the merged adapter's family, at any rank)
  mlp        x + W2 gelu(W1 x + b1) + b2, 64 hidden units
  both fitted with the faithful L_out loss (artifact tokens to the target, the other tokens held; subspace_loss), and
  wide mlp   x + a 2 x 256 hidden-unit MLP fitted to the artifact tokens alone (the other tokens free): the most a
             token-wise map of this size can do for the artifact tokens
Each map: Adam, --steps steps of 32 images' tokens (wide mlp: 64 artifact tokens), lr 3e-3 (wide mlp 1e-3). Scored on
the held-out images: cosine to the clean twin on the planted artifact tokens, cosine to the raw tokens on the others,
and on the selected tokens the cosine to the target, in sample and held out (held out minus in sample near zero and
both low: the raw token does not hold the target; in sample high, held out low: the map memorises).

    python benchmarks/adapter_ceiling.py [--cases 2c,2two] [--layers 7] [--trained 3000] [--steps 1500] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import torch
import torch.nn.functional as F
from compare_planted import CASES, SETTINGS, _estimate, _images
from torch import Tensor, nn

from singer_deploy.method.artifact_subspace import subspace_loss
from singer_deploy.models.planted_training import planted_teacher

N_TRAIN, N_HELD_OUT, BATCH = 512, 128, 32


class Residual(nn.Module):
    """x + body(x), the body's last layer starting at zero (the identity, as the adapters start near it)."""

    def __init__(self, *body: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens + self.body(tokens)


def maps(dim: int) -> dict[str, Residual]:
    return {"linear": Residual(nn.Linear(dim, dim)),
            "mlp": Residual(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim)),
            "wide mlp": Residual(nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, dim))}


@torch.no_grad()
def token_pairs(planted, subspace, layer: int, images: Tensor) -> dict[str, Tensor]:
    """Raw patch tokens at `layer`, the faithful target, the selected (artifact) and held (other, outside the band)
    tokens, as SingerLoss has them."""
    teacher, p = planted.backbone, planted.backbone.num_prefix_tokens
    raw = teacher.forward_taps(images, sorted({layer, *subspace.taps_needed(layer)}))
    selected, band = subspace.token_groups(raw[layer][:, p:])
    target = subspace.counterfactual(raw, layer, selected, teacher.run_block_rows, p)[:, p:]
    return {"raw": raw[layer][:, p:], "target": target, "selected": selected, "held": ~(selected | band)}


def fit(name: str, model: Residual, train: dict[str, Tensor], steps: int, seed: int = 0) -> None:
    """Adam on L_out's loss (subspace_loss) over `train` (token_pairs); the wide MLP on the artifact tokens alone,
    2 x BATCH of them per step, with no token held."""
    torch.manual_seed(seed)
    batch, lr = BATCH, 3e-3
    if name == "wide mlp":
        chosen = train["selected"]
        train = {"raw": train["raw"][chosen], "target": train["target"][chosen],
                 "selected": torch.ones(int(chosen.sum()), dtype=torch.bool),
                 "held": torch.zeros(int(chosen.sum()), dtype=torch.bool)}
        batch, lr = 2 * BATCH, 1e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(len(train["raw"]), (batch,))
        loss = subspace_loss(model(train["raw"][index]), train["target"][index], train["selected"][index],
                             train["held"][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def scores(out: Tensor, pairs: dict[str, Tensor], twin: Tensor, planted_tokens: Tensor) -> dict[str, float]:
    selected = pairs["selected"]
    return {"art cos twin": F.cosine_similarity(out[planted_tokens], twin[planted_tokens], dim=-1).mean().item(),
            "normal cos raw": F.cosine_similarity(out[~planted_tokens], pairs["raw"][~planted_tokens],
                                                  dim=-1).mean().item(),
            "selected cos target": F.cosine_similarity(out[selected], pairs["target"][selected], dim=-1).mean().item()}


def run_case(case, layers: list[int], steps: int) -> list[dict]:
    planted = planted_teacher(case.planted())
    train_images, held_images = (_images(planted, N_TRAIN, case.share, 0),
                                 _images(planted, N_HELD_OUT, case.share, 1))
    subspaces = _estimate(planted.backbone, train_images, case.layers, SETTINGS["faithful"], BATCH)
    p = planted.backbone.num_prefix_tokens
    with torch.no_grad():
        twin = planted.clean.forward_taps(held_images, layers)
    planted_tokens = torch.stack(list(planted.cluster_masks(held_images).values())).any(0)
    rows = []
    for layer in layers:
        subspace = subspaces.get(layer)
        if subspace is None:
            print(f"{case.label}, layer {layer}: no subspace, nothing to map")
            continue
        train, held = (token_pairs(planted, subspace, layer, images) for images in (train_images, held_images))
        outputs = {"raw": held["raw"], "target": held["target"]}
        in_sample = {}
        for name, model in maps(held["raw"].shape[-1]).items():
            began = time.perf_counter()
            fit(name, model, train, steps)
            with torch.no_grad():
                outputs[name] = model(held["raw"])
                fitted = model(train["raw"])
            in_sample[name] = F.cosine_similarity(fitted[train["selected"]], train["target"][train["selected"]],
                                                  dim=-1).mean().item()
            print(f"  {case.key} layer {layer} {name}: {time.perf_counter() - began:.0f} s", flush=True)
        for name, out in outputs.items():
            rows.append({"case": case.label, "layer": layer, "map": name,
                         **scores(out, held, twin[layer][:, p:], planted_tokens), "in sample": in_sample.get(name)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="2c,2two")
    parser.add_argument("--layers", default="7")
    parser.add_argument("--trained", type=int, default=3000, metavar="STEPS",
                        help="teachers trained on the shapes task for STEPS steps (cached); 0: untrained")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.cases.split(","):
        case = CASES[key].trained(args.trained)
        rows += run_case(case, [int(layer) for layer in args.layers.split(",")], args.steps)
    print("| case | layer | map | art cos twin | normal cos raw | selected cos target (held out) | in sample |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        in_sample = "" if row["in sample"] is None else f"{row['in sample']:.3f}"
        print(f"| {row['case']} | {row['layer']} | {row['map']} | {row['art cos twin']:.3f} | "
              f"{row['normal cos raw']:.4f} | {row['selected cos target']:.3f} | {in_sample} |")


if __name__ == "__main__":
    main()
