"""The artifact direction of each distilled layer, estimated where the teacher writes it (outlier_target "direction";
docs/method.md, "Faithful refinement").

A norm target only says how long a refined artifact token may be. Where the artifact sits on ordinary content whose
own norm spreads around the median (position-bound artifacts), meeting it means shrinking that content too; and it
leaves the direction free, so part of the artifact survives. The "direction" target instead names the token it
wants: the raw token with its component along the artifact direction d brought to the normal tokens' level.

That needs d to within a small angle, because the artifact is ~10x a normal token: an error of 3 degrees leaves a
residual of half a normal token. The plain difference of means between artifact and normal tokens at layer l is
biased by whatever else sets the artifact tokens apart (flat patches, say, have content of their own). We take it
where the artifact is written instead: for every block b <= l, the difference of means of the block's update
x_b - x_{b-1} between the tokens selected at layer l and the others (block 0: of its output), and keep the block with
the largest one. Artifact tokens are written by a few neurons of one block (docs/method.md cites the register-
neuron findings); that block's update is the artifact plus a small content difference, not the content difference
accumulated over every block. On the planted teacher its cosine to the planted direction is 0.99997 or better on
flat-patch artifacts, where the layer's own difference of means reaches 0.9985.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from singer_deploy.method.metrics import high_norm_mask


@dataclass(frozen=True)
class ArtifactDirection:
    """direction: (D,) unit vector; level: the normal tokens' mean component along it at the layer; block: the block
    whose update gave it; block_share: how much of the layer's artifact-vs-normal mean gap that block's update
    explains (its projection on the gap over the gap's squared norm; well below 1 means the artifact is written over
    several blocks or moved after, and the single-block estimate misses that part); artifact_tokens / normal_tokens:
    how many tokens the estimate rests on."""

    direction: Tensor
    level: float
    block: int
    block_share: float
    artifact_tokens: int
    normal_tokens: int

    def describe(self) -> str:
        return (f"written by block {self.block} ({self.block_share:.0%} of the layer's artifact gap), estimated from "
                f"{self.artifact_tokens} artifact and {self.normal_tokens} normal tokens")


class DirectionEstimator:
    """Running sums over batches of raw taps; `result()` gives each layer's ArtifactDirection (None when no token of
    that layer was selected, e.g. a teacher without artifacts). Only (D,) sums are kept, never the tokens."""

    def __init__(self, layers: Sequence[int], select_k: float, num_prefix_tokens: int):
        self.layers, self.select_k, self.prefix = sorted(layers), float(select_k), int(num_prefix_tokens)
        self._sums: dict[tuple, Tensor] = {}
        self._counts = {(layer, kind): 0 for layer in self.layers for kind in ("artifact", "normal")}

    @property
    def blocks_needed(self) -> list[int]:
        """The taps `add` reads: every block up to the deepest layer."""
        return list(range(max(self.layers) + 1))

    @torch.no_grad()
    def add(self, taps: dict[int, Tensor]) -> None:
        """taps: block -> raw tokens (B, prefix + N, D) for every block in `blocks_needed`."""
        # float32 per batch, float64 across batches: a ViT-L's 24 taps stay under 1 GB for a batch of 32.
        patches = {b: taps[b][:, self.prefix:].float() for b in self.blocks_needed}
        for layer in self.layers:
            selected = high_norm_mask(patches[layer], self.select_k)
            for kind, mask in (("artifact", selected), ("normal", ~selected)):
                weight = mask.unsqueeze(-1).float()
                self._counts[layer, kind] += int(mask.sum())
                self._add((layer, kind, "level"), (patches[layer] * weight).sum((0, 1)).double())
                for block in range(layer + 1):
                    update = patches[block] if block == 0 else patches[block] - patches[block - 1]
                    self._add((layer, kind, block), (update * weight).sum((0, 1)).double())

    def _add(self, key: tuple, value: Tensor) -> None:
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def result(self) -> dict[int, ArtifactDirection | None]:
        return {layer: self._direction(layer) for layer in self.layers}

    def _direction(self, layer: int) -> ArtifactDirection | None:
        artifacts, normals = self._counts[layer, "artifact"], self._counts[layer, "normal"]
        if not artifacts or not normals:
            return None

        def mean(kind: str, key) -> Tensor:
            return self._sums[layer, kind, key] / self._counts[layer, kind]

        gaps = [mean("artifact", block) - mean("normal", block) for block in range(layer + 1)]
        block = max(range(layer + 1), key=lambda b: float(gaps[b].norm()))
        tiny = torch.finfo(gaps[block].dtype).tiny
        direction = gaps[block] / gaps[block].norm().clamp_min(tiny)
        total = sum(gaps)                      # the updates telescope: the layer's own difference of means
        share = float(gaps[block] @ total / total.square().sum().clamp_min(tiny))
        return ArtifactDirection(direction.float().cpu(), float(mean("normal", "level") @ direction), block, share,
                                 artifacts, normals)


@torch.no_grad()
def estimate_artifact_directions(teacher, batches, layers: Sequence[int],
                                 select_k: float) -> dict[int, ArtifactDirection | None]:
    """Each distilled layer's ArtifactDirection from raw teacher taps of `batches` (iterable of image tensors);
    `teacher` is a lead Backbone (forward_taps, num_prefix_tokens)."""
    estimator = DirectionEstimator(layers, select_k, teacher.num_prefix_tokens)
    for images in batches:
        estimator.add(teacher.forward_taps(images, estimator.blocks_needed))
    return estimator.result()


def direction_loss(patches: Tensor, raw: Tensor, selected: Tensor, artifact: ArtifactDirection | None) -> Tensor:
    """Mean over selected tokens of ||F_hat - T||^2 / ||T||^2, T = F - (F.d - level) d: the raw token with its
    component along the artifact direction set to the normal tokens' level, everything else kept.

    Relative, like the "normal" target, so no image or layer dominates by scale. Zero, with a graph, when nothing is
    selected or the layer has no direction."""
    if artifact is None:
        return patches.sum() * 0.0
    with torch.autocast(device_type=patches.device.type, enabled=False):
        d = artifact.direction.to(device=patches.device, dtype=torch.float32)
        raw = raw.float()
        target = raw - ((raw @ d) - artifact.level).unsqueeze(-1) * d
        error = (patches.float() - target).square().sum(-1) / target.square().sum(-1).clamp_min(
            torch.finfo(torch.float32).tiny)
        mask = selected.to(error.dtype)
        return (error * mask).sum() / mask.sum().clamp_min(1)
