"""SiNGER losses: L_kd (student vs refined target), L_out (shrink high-norm patches), L_info (keep what the teacher
computes). Each term is averaged over the distilled layers D; total = w_kd L_kd + w_out L_out + w_info L_info.

Gradient paths follow the reference code (docs/method.md, "Gradient paths"): the refined target is not detached in
L_kd by default, L_info back-propagates through the frozen next teacher block into the adapter, and the refined
intermediate layer stays attached in the reference-variant Gram term.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from singer_deploy.config import SingerConfig
from singer_deploy.errors import ModelError
from singer_deploy.method.alignment import TokenAligner
from singer_deploy.method.artifact_subspace import ArtifactSubspace, subspace_loss
from singer_deploy.method.metrics import DEFAULT_K, cosine_gram, high_norm_mask

# Token share above k x median used by the quantile-trap detector (the artifact definition of metrics.HNR_4).
TRAP_K = DEFAULT_K


def kd_loss(student: Tensor, target: Tensor, *, detach_target: bool = False) -> Tensor:
    """MSE over all compared tokens (CLS included) between aligned projected student tokens and the refined target."""
    if student.shape != target.shape:
        raise ModelError("Student and target tokens do not line up for L_kd", expected=str(tuple(target.shape)),
                         found=str(tuple(student.shape)), fix="project and align student tokens with Projectors")
    return F.mse_loss(student, target.detach() if detach_target else target)


def outlier_loss(patches: Tensor, *, alpha: float = 0.97) -> Tensor:
    """Published L_out: pooled mean of (norm - t)^2 over refined patch tokens above t = the alpha-quantile of the
    image's refined patch norms. t is detached and computed in fp32 (torch.quantile rejects half precision). Zero,
    with a graph, when no token is above t. (The faithful target is method.artifact_subspace.subspace_loss.)
    """
    with torch.autocast(device_type=patches.device.type, enabled=False):
        norms = patches.float().norm(dim=-1)                                   # (B, N)
        with torch.no_grad():
            threshold = torch.quantile(norms, alpha, dim=1, keepdim=True)
        mask = norms > threshold
        # Masked sum / count instead of boolean indexing: no host sync, and 0 (not NaN) when nothing is selected.
        return ((norms - threshold).square() * mask).sum() / mask.sum().clamp_min(1)


@dataclass(frozen=True)
class QuantileTrapCheck:
    """share: fraction of patch tokens above TRAP_K x the per-image median; limit: 1 - alpha; fired: share > limit."""

    share: float
    limit: float
    fired: bool


def check_quantile_trap(patches: Tensor, alpha: float, *, k: float = TRAP_K, label: str = "layer",
                        warn: bool = True) -> QuantileTrapCheck:
    """Warn when artifacts are more than (1 - alpha) of the patches: the alpha-quantile then lies INSIDE the artifact
    cluster. Two outcomes were measured on the planted teacher (docs/method.md): at some layers L_out barely shrinks
    the artifacts; at others it does shrink them, but by pulling every token above the quantile, at the cost of the
    normal tokens (normal-token cosine 0.93, and the student below FitNet). The message names the layer, the share,
    both outcomes and the setting that avoids them (the default "faithful" preset).

    Run it on the raw teacher patches of the first batches; the share is pooled over the batch.
    """
    with torch.no_grad():
        share = high_norm_mask(patches, k).float().mean().item()
    limit = 1.0 - alpha
    fired = share > limit
    if fired and warn:
        warnings.warn(
            f"L_out quantile trap at {label}: {share:.1%} of its patch tokens are above {k:g}x the median norm, more "
            f"than 1 - alpha = {limit:.1%}, so the alpha = {alpha:g} quantile target sits inside the artifact "
            f"cluster. Expect one of two failures at {label}: the artifacts barely shrink (HNR stays), or they "
            "shrink only by pulling every token above the quantile, which damages normal tokens (normal-token "
            "cosine to the raw teacher falls, e.g. 0.93). Fix: leave out `preset: published` (the default preset "
            "'faithful' selects the artifact tokens from the data on the raw teacher and removes their component "
            "in the artifact subspace, estimated from the blocks that write it; docs/method.md); an alpha "
            f"below {1.0 - share:.2f} only moves the target below the cluster.", stacklevel=2)
    return QuantileTrapCheck(share=share, limit=limit, fired=fired)


def next_block_info_loss(refined: Tensor, raw: Tensor, next_block: Callable[[Tensor], Tensor],
                         keep: Tensor | None = None, raw_out: Tensor | None = None) -> Tensor:
    """MSE(Block_{l+1}(F_hat), Block_{l+1}(F)); the raw path runs without grad, the refined path keeps it.

    `keep` (B, T) bool limits it to those tokens (info_tokens "normal"): the block's residual path copies an
    artifact token's own content to its output, so over all tokens this term pulls every removed artifact back.
    `raw_out`: Block_{l+1}(F) where the caller has it already (the raw teacher's tap of block l+1, or the block on
    the target from recorded projections), not run again.
    """
    with torch.no_grad():
        target = next_block(raw) if raw_out is None else raw_out
    if keep is None:
        return F.mse_loss(next_block(refined), target)
    return _masked_mse(next_block(refined), target, keep)


def carry_selection(groups: Mapping[int, tuple[Tensor, Tensor]]) -> dict[int, tuple[Tensor, Tensor]]:
    """(selected, band) per distilled layer -> the same with every token selected at a shallower layer selected at the
    deeper ones too (and out of their band). Under stream "refined" the shallower adapter took its artifact out of
    the stream, so a deeper layer's own selection (thresholds estimated on the raw teacher) sees only what later
    blocks wrote and misses the rest, while the deeper target is still the teacher without any of it
    (docs/method.md, "Refined stream")."""
    carried, before = {}, None
    for layer in sorted(groups):
        selected, band = groups[layer]
        if before is not None:
            selected = selected | before
            band = band & ~selected
        carried[layer], before = (selected, band), selected
    return carried


def gram_info_loss(patches: Tensor, reference: Tensor, keep: Tensor | None = None) -> Tensor:
    """MSE between the cosine Gram matrices (B, N, N) of two patch-token sets of the same teacher; with `keep`
    (B, N) bool, only over pairs of kept tokens."""
    if keep is None:
        return F.mse_loss(cosine_gram(patches), cosine_gram(reference))
    pairs = keep.unsqueeze(2) & keep.unsqueeze(1)
    return _masked_mse(cosine_gram(patches), cosine_gram(reference), pairs)


def _masked_mse(a: Tensor, b: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error over the kept positions (the leading dims of `keep`); 0 with a graph when none."""
    error = (a - b).square()
    keep = keep.to(error.dtype)
    while keep.ndim < error.ndim:
        keep = keep.unsqueeze(-1)
    width = error.numel() // max(keep.numel(), 1)
    return (error * keep).sum() / (keep.sum() * width).clamp_min(1)


class SingerLoss:
    """Combines the three terms over the distilled layers D (ascending; the last entry is the "final" layer).

    `backbone` is the frozen teacher (lead `Backbone`: run_blocks, num_prefix_tokens, depth when `last_block_info`
    is on, run_block_rows for the "subspace" target); it is used, not owned, so this is a plain callable and never
    adds teacher parameters anywhere. `aligner` selects the L_kd tokens of the teacher (CLS when both models have
    one, never registers). With outlier_target "quantile" the raw teacher
    patches of the first `trap_check_batches` calls are checked for the quantile trap; results in `trap_checks`.
    outlier_target "subspace" needs `subspaces` (method.artifact_subspace.estimate_artifact_subspaces), given
    here or set before the first call.
    """

    def __init__(self, config: SingerConfig, layers: Sequence[int], backbone, aligner: TokenAligner, *,
                 trap_check_batches: int = 2,
                 subspaces: Mapping[int, ArtifactSubspace | None] | None = None):
        self.config, self.layers, self.subspaces = config, list(layers), dict(subspaces or {})
        self.backbone, self.aligner = backbone, aligner
        self.prefix = int(backbone.num_prefix_tokens)
        self.trap_checks: dict[int, QuantileTrapCheck] = {}
        self._checks_left = trap_check_batches if config.outlier_target == "quantile" else 0

    def __call__(self, student: Mapping[int, Tensor], refined: Mapping[int, Tensor],
                 raw: Mapping[int, Tensor], qkv: Mapping[int, Tensor] | None = None) -> dict[str, Tensor]:
        """student[l]: aligned projected student tokens (Projectors output); refined[l] / raw[l]: teacher tokens
        (B, prefix + N, D), raw[l] being what the adapter reads (under stream "refined", computed from the refined
        layer before: Refiner.stream_edits); qkv: that forward's query, key and value projections of the blocks in
        `qkv_blocks` (Backbone.record_qkv; optional, it saves the counterfactual most of its work).
        Returns total, kd, out, info and per-layer terms ("kd@17", ...), all tensors."""
        cfg, p, qkv = self.config, self.prefix, qkv or {}
        if self._checks_left > 0:
            self._checks_left -= 1
            for layer in self.layers:
                fired_before = layer in self.trap_checks and self.trap_checks[layer].fired
                check = check_quantile_trap(raw[layer][:, p:], cfg.alpha, label=f"layer {layer}",
                                            warn=not fired_before)
                if not fired_before:
                    self.trap_checks[layer] = check
        terms: dict[str, Tensor] = {}
        final = self.layers[-1]
        with torch.no_grad():
            groups = {layer: self._token_groups(layer, raw[layer][:, p:]) for layer in self.layers}
            if cfg.stream == "refined":
                groups = carry_selection(groups)
        keep = {layer: self._normal_tokens(*groups[layer]) for layer in self.layers}
        for layer in self.layers:
            terms[f"kd@{layer}"] = kd_loss(student[layer], self.aligner.teacher(refined[layer]),
                                           detach_target=cfg.detach_target)
            target = self._target(layer, raw, groups[layer][0], qkv)
            terms[f"out@{layer}"] = self._outlier(refined[layer][:, p:], target, *groups[layer])
            if layer != final:
                terms[f"info@{layer}"] = self._block_info(layer, layer + 1, refined, raw, keep[layer], target,
                                                          groups[layer][0], qkv)
            else:
                reference_layer = self._gram_reference_layer()
                gram_keep = None if keep[layer] is None else keep[layer][:, p:] & keep[reference_layer][:, p:]
                terms[f"info@{layer}"] = gram_info_loss(refined[layer][:, p:],
                                                        self._gram_reference(refined, raw)[:, p:], gram_keep)
                if cfg.last_block_info:
                    reader = layer + 1 if layer + 1 < self.backbone.depth else None
                    terms[f"info@{layer}"] = terms[f"info@{layer}"] + self._block_info(
                        layer, reader, refined, raw, keep[layer], target, groups[layer][0], qkv)
        n = len(self.layers)
        out = {name: sum(terms[f"{name}@{layer}"] for layer in self.layers) / n for name in ("kd", "out", "info")}
        out["total"] = cfg.w_kd * out["kd"] + cfg.w_out * out["out"] + cfg.w_info * out["info"]
        return {**out, **terms}

    def taps_needed(self) -> list[int]:
        """Raw teacher taps a call needs: the distilled layers, and what the "subspace" target's counterfactual
        streams start from."""
        extra = [b for layer, subspace in self.subspaces.items() if subspace is not None
                 for b in subspace.taps_needed(layer)]
        return sorted({*self.layers, *extra})

    def qkv_blocks(self) -> list[int]:
        """Teacher blocks whose query, key and value projections a call reuses from the raw forward
        (Backbone.record_qkv): those the "subspace" target's counterfactual runs at the selected tokens (after each
        layer's first writer, up to the layer), and the block after each layer with a target, which L_info runs on
        that target."""
        blocks = set()
        for layer, subspace in self.subspaces.items():
            if subspace is None or subspace.first_block is None:
                continue
            blocks.update(range(subspace.first_block + 1, layer + 1))
            if layer + 1 < self.backbone.depth and (layer != self.layers[-1] or self.config.last_block_info):
                blocks.add(layer + 1)
        return sorted(blocks)

    def _target(self, layer: int, raw: Mapping[int, Tensor], selected: Tensor,
                qkv: Mapping[int, Tensor]) -> Tensor | None:
        """The layer's L_out target under outlier_target "subspace": the teacher's counterfactual (B, prefix + N, D;
        ArtifactSubspace.counterfactual) at the `selected` patch tokens, raw elsewhere; None under "quantile" and
        where the estimate found nothing. raw: every tap in `taps_needed`; qkv: as __call__."""
        if self.config.outlier_target == "quantile":
            return None
        if layer not in self.subspaces:
            raise ModelError("outlier_target 'subspace' needs the artifact subspace of every distilled layer",
                             expected=f"subspaces for layers {self.layers}", found=str(sorted(self.subspaces)),
                             fix="set SingerLoss.subspaces = estimate_artifact_subspaces(teacher, batches, layers, "
                                 "select_k) before the first step")
        subspace = self.subspaces[layer]
        if subspace is None:
            return None

        def run_block(tokens: Tensor, block: int, rows: Tensor) -> Tensor:
            return self.backbone.run_block_rows(tokens, block, rows, qkv.get(block))

        return subspace.counterfactual(raw, layer, selected, run_block, self.prefix)

    def _outlier(self, refined: Tensor, target: Tensor | None, selected: Tensor, band: Tensor) -> Tensor:
        """refined: the layer's refined patch tokens; target: `_target`'s; selected, band: the raw teacher's artifact
        patch tokens at the layer and the band below them (B, N, _token_groups)."""
        if self.config.outlier_target == "quantile":
            return outlier_loss(refined, alpha=self.config.alpha)
        if target is None:
            return refined.sum() * 0.0
        return subspace_loss(refined, target[:, self.prefix:], selected, ~(selected | band))

    def _token_groups(self, layer: int, patches: Tensor) -> tuple[Tensor, Tensor]:
        """The raw teacher's artifact patch tokens at `layer` (B, N) and the band below them that no term holds
        (ArtifactSubspace.token_groups; docs/method.md, "Token selection"); without an estimate (published target),
        the fixed rule at select_k, 4 when unset, and no band."""
        subspace = self.subspaces.get(layer)
        if subspace is not None:
            return subspace.token_groups(patches)
        none = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
        if self.config.outlier_target == "subspace":     # estimated, and no token was a candidate: none
            return none, none
        return high_norm_mask(patches, self.config.select_k or DEFAULT_K), none

    def _normal_tokens(self, selected: Tensor, band: Tensor) -> Tensor | None:
        """info_tokens "normal": (B, T) bool, False on the `selected` patch tokens (the raw teacher's artifact tokens,
        which the "subspace" L_out target acts on) and on the `band` (held by no term), True on prefix and normal
        tokens; None ("all", published)."""
        if self.config.info_tokens == "all":
            return None
        prefix = torch.zeros_like(selected[:, :self.prefix])
        return ~torch.cat([prefix, selected | band], dim=1)

    def _block_info(self, layer: int, block: int | None, refined: Mapping[int, Tensor], raw: Mapping[int, Tensor],
                    keep: Tensor | None, target: Tensor | None, selected: Tensor,
                    qkv: Mapping[int, Tensor]) -> Tensor:
        """The next block's reading of the kept tokens, held to what it computes from the L_out `target` where there
        is one, else from the raw layer: a teacher whose other tokens read the artifact reads it differently once it
        is gone, and holding that reading to the raw one pulls the artifact back (docs/method.md, "Faithful
        refinement"). `block` None: the layer is the teacher's last block, which no block reads, so the kept tokens
        themselves are held (what the student copies; docs/method.md, "The last layer's L_info"). selected, qkv: as
        `_target` and `__call__` take them."""
        def run(tokens: Tensor) -> Tensor:
            return tokens if block is None else self.backbone.run_blocks(tokens, block, block + 1)

        if target is not None:
            return next_block_info_loss(refined[layer], target, run, keep,
                                        self._next_block_on_target(block, target, selected, qkv))
        # The raw stream's output of `block` is a tap already where the counterfactual reads it (taps_needed).
        raw_out = raw.get(block) if block == layer + 1 else None
        return next_block_info_loss(refined[layer], raw[layer], run, keep, raw_out)

    @torch.no_grad()
    def _next_block_on_target(self, block: int | None, target: Tensor, selected: Tensor,
                              qkv: Mapping[int, Tensor]) -> Tensor | None:
        """Block `block` on the L_out `target`, computed from the raw forward's projections of that block where they
        were recorded: the target is the raw layer but at the `selected` patch tokens, so only theirs are computed
        (models/block_rows.py). None (run the block) where they were not, or under stream "refined", whose next
        block read the refined layer, not the raw one."""
        recorded = qkv.get(block) if block is not None and self.config.stream == "raw" else None
        if recorded is None:
            return None
        changed = torch.cat([selected.new_zeros(selected.shape[0], self.prefix), selected], dim=1)
        every = torch.ones_like(changed)
        return self.backbone.run_block_rows(target, block, every, recorded, changed).reshape(target.shape)

    def _gram_reference_layer(self) -> int:
        # Reference code: the refined deepest intermediate layer (attached). Paper, or a single layer: raw final layer.
        if self.config.info_variant == "reference" and len(self.layers) > 1:
            return self.layers[-2]
        return self.layers[-1]

    def _gram_reference(self, refined: Mapping[int, Tensor], raw: Mapping[int, Tensor]) -> Tensor:
        layer = self._gram_reference_layer()
        return refined[layer] if layer != self.layers[-1] else raw[layer]
