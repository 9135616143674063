"""Artifact and fidelity metrics on patch tokens (B, N, D) of raw block outputs.

Every metric is threshold-relative per image (k x the median patch norm), never the loss's own top-(1-alpha) set,
which flags 3% of tokens by construction before and after refinement (docs/method.md, "Metrics").
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

DEFAULT_K = 4.0


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


def normal_token_cosine(a: Tensor, b: Tensor, normal: Tensor | None = None) -> float:
    """Mean cosine between matching tokens of two feature sets, over the normal (non-artifact) tokens."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    if normal is None:
        return cos.mean().item()
    if not normal.any():
        return float("nan")
    return cos[normal].mean().item()


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
