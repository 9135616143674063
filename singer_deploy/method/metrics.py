"""Artifact and fidelity metrics on patch tokens (B, N, D) of raw block outputs: the one home of their formulas.

Every metric is threshold-relative per image (k x the median patch norm), never the loss's own top-(1-alpha) set,
which flags 3% of tokens by construction before and after refinement (docs/method.md, "Metrics").

A threshold count alone hides a residual: HNR_4 reads 0.000 for artifact tokens shrunk from 10x to 3x the median
norm. So `ArtifactStats` also reports HNR at k = 2 and 3, and the artifact-to-normal norm ratio measured on a FIXED
token set (ground-truth artifact tokens, or the raw teacher's high-norm tokens), which moves continuously with the
residual and cannot be thresholded away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_K = 4.0
# HNR is reported at every k here: k = 4 is the literature's artifact cut, k = 2 and 3 show a residual it misses.
ARTIFACT_KS = (2.0, 3.0, 4.0)
# "Artifacts remain" at a layer when the artifact tokens' mean norm exceeds this many times the normal tokens'
# median norm (a clean planted twin sits at ~0.9; a real artifact at 6-12). Overridable where it is used.
REMAIN_RATIO = 1.5


def token_norms(patches: Tensor) -> Tensor:
    """L2 norm of every patch token: (B, N)."""
    return patches.float().norm(dim=-1)


def high_norm_mask(patches: Tensor, k: float = DEFAULT_K) -> Tensor:
    """Tokens whose norm exceeds k x the per-image median patch norm: (B, N) bool."""
    norms = token_norms(patches)
    median = norms.median(dim=1, keepdim=True).values
    return norms > k * median


def artifact_metrics(patches: Tensor, k: float = DEFAULT_K) -> dict[str, float]:
    """Per-image HNR_k, R_max and E_out averaged over the batch.

    hnr: share of tokens above k x median; r_max: max norm / median; e_out: share of sum(norm^2) held by the
    high-norm tokens, i.e. how much of an MSE target the artifacts own.
    """
    norms = token_norms(patches)
    median = norms.median(dim=1, keepdim=True).values.clamp_min(1e-12)
    mask = norms > k * median
    energy = norms.square()
    e_out = (energy * mask).sum(1) / energy.sum(1).clamp_min(1e-12)
    return {
        "hnr": mask.float().mean().item(),
        "r_max": (norms.max(dim=1).values / median.squeeze(1)).mean().item(),
        "e_out": e_out.mean().item(),
    }




def cosine_gram(patches: Tensor) -> Tensor:
    """Cosine-similarity Gram matrix of patch tokens per image: (B, N, N)."""
    unit = F.normalize(patches.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def mask_precision_recall(predicted: Tensor, truth: Tensor) -> tuple[float, float]:
    """Precision and recall of a predicted token mask against a ground-truth mask (both (B, N) bool)."""
    tp = (predicted & truth).sum().item()
    precision = tp / max(predicted.sum().item(), 1)
    recall = tp / max(truth.sum().item(), 1)
    return precision, recall


def token_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosine between matching tokens of two feature sets: (..., N)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def cosine_summary(cos: Tensor) -> dict[str, float]:
    """Mean, 1st percentile and minimum of a set of token cosines (NaN when empty): the mean hides the tail."""
    cos = cos.flatten().double()
    if not cos.numel():
        return {"mean": math.nan, "p1": math.nan, "min": math.nan}
    return {"mean": cos.mean().item(), "p1": torch.quantile(cos, 0.01).item(), "min": cos.min().item()}


def artifact_norm_ratios(patches: Tensor, artifacts: Tensor, normal: Tensor | None = None) -> Tensor:
    """Norm of every artifact token over the median norm of its image's NORMAL tokens: a flat 1-D tensor.

    `artifacts` is a fixed (B, N) token set (ground truth, or the raw teacher's high-norm tokens), so a source that
    shrinks its artifacts 3x reads 3.0 here even when no token is above any k x median threshold any more. `normal`
    defaults to every other token (one cluster of several is judged against the tokens of none).
    """
    norms = token_norms(patches)
    others = ~artifacts if normal is None else normal
    normal = norms.masked_fill(~others, float("nan")).nanmedian(dim=1, keepdim=True).values
    return (norms / normal.clamp_min(1e-12))[artifacts]


@dataclass
class ArtifactStats:
    """One source (raw / refined / clean twin / student / projected student) at one layer, accumulated per batch.

    `add` takes the source's patch tokens and, where they exist: the fixed artifact token set, the raw teacher's
    patch tokens at the same layer (normal-token cosine), the next teacher block's output on the source's and on the
    raw patches (next-block cosine), the clean twin's patch tokens (cosine of the artifact tokens to their clean
    counterparts, the only honest restoration score), and the normal token set when it is not every other token (one
    cluster of several). `result()` gives:

    hnr_2 / hnr_3 / hnr_4   share of tokens above k x the per-image median norm (mean over images)
    r_max                   max norm / median norm (mean over images); e_out: energy share of the k = 4 tokens
    artifact_ratio          mean of `artifact_norm_ratios` (p90 and max too); NaN without artifact tokens
    normal_cos / _p1        cosine to the raw teacher on normal tokens (mean, 1st percentile)
    next_cos / _p1          cosine of the next block's outputs (source vs raw input) on normal tokens
    artifact_cos_clean      cosine of the artifact tokens to the clean twin's (mean, 1st percentile)
    normal_cos_clean        cosine of the normal tokens to the clean twin's: where a teacher's other tokens read the
                            artifact, its clean twin's differ from the raw ones, and this, not normal_cos, says
                            whether they were kept
    """

    ks: tuple[float, ...] = ARTIFACT_KS
    _per_image: dict[str, list[Tensor]] = field(default_factory=dict)
    _per_token: dict[str, list[Tensor]] = field(default_factory=dict)

    def add(self, patches: Tensor, artifacts: Tensor | None = None, *, raw: Tensor | None = None,
            next_out: Tensor | None = None, raw_next_out: Tensor | None = None,
            clean: Tensor | None = None, normal: Tensor | None = None) -> None:
        norms = token_norms(patches)
        median = norms.median(dim=1, keepdim=True).values.clamp_min(1e-12)
        for k in self.ks:
            self._keep(self._per_image, f"hnr_{k:g}", (norms > k * median).float().mean(1))
        energy = norms.square()
        self._keep(self._per_image, "e_out", (energy * (norms > DEFAULT_K * median)).sum(1) /
                   energy.sum(1).clamp_min(1e-12))
        self._keep(self._per_image, "r_max", norms.max(dim=1).values / median.squeeze(1))
        if artifacts is None:
            return
        normal = ~artifacts if normal is None else normal
        self._keep(self._per_token, "artifact_ratio", artifact_norm_ratios(patches, artifacts, normal))
        if raw is not None:
            self._keep(self._per_token, "normal_cos", token_cosines(patches, raw)[normal])
        if next_out is not None and raw_next_out is not None:
            self._keep(self._per_token, "next_cos", token_cosines(next_out, raw_next_out)[normal])
        if clean is not None:
            cos = token_cosines(patches, clean)
            self._keep(self._per_token, "artifact_cos_clean", cos[artifacts])
            self._keep(self._per_token, "normal_cos_clean", cos[normal])

    @staticmethod
    def _keep(store: dict[str, list[Tensor]], key: str, values: Tensor) -> None:
        store.setdefault(key, []).append(values.detach().float().cpu().flatten())

    def result(self) -> dict[str, float]:
        out = {key: torch.cat(values).mean().item() for key, values in self._per_image.items()}
        tokens = {key: torch.cat(values) for key, values in self._per_token.items()}
        if "artifact_ratio" in tokens:
            ratios = tokens.pop("artifact_ratio").double()
            out["artifact_tokens"] = int(ratios.numel())
            out["artifact_ratio"] = ratios.mean().item() if ratios.numel() else math.nan
            out["artifact_ratio_p90"] = torch.quantile(ratios, 0.9).item() if ratios.numel() else math.nan
        for key, cos in tokens.items():
            summary = cosine_summary(cos)
            out[key], out[f"{key}_p1"] = summary["mean"], summary["p1"]
        return out


def artifacts_remain(stats: dict[str, float], limit: float = REMAIN_RATIO) -> bool | None:
    """Whether a source still carries artifacts at a layer: artifact tokens above `limit` x the normal median norm.

    Without a known artifact token set (no artifact tokens: NaN ratio) falls back to HNR_4 > 0; None when neither
    is measured."""
    ratio = stats.get("artifact_ratio")
    if ratio is not None and not math.isnan(ratio):
        return ratio > limit
    hnr = stats.get(f"hnr_{DEFAULT_K:g}")
    return None if hnr is None else hnr > 0.0
