"""Which tokens are artifacts, decided from the data at each distilled layer (docs/method.md, "Token selection").

A token's norm alone cannot tell a weak artifact from content: on the planted teachers a 2.5x artifact sits inside the
norms of textured patches (up to 4x the image median), and a trained teacher writes its artifact at a range of
strengths. What does tell them apart is how the artifact arrives and where it points. Per layer:

1. Candidates for the subspace estimate (`write_outliers`): tokens that some block 1..layer updates far more than it
   updates the other tokens of the image. A writer adds a vector as large as the token in one step, so the write
   stands out at its block (the log of the update's norm over the image's median update norm, more than CANDIDATE_Z
   robust standard deviations of that log-ratio, measured on the batch) whatever the token's norm at the layer. Block
   0 is left out: its "update" is the patch embedding, whose norm is the patch's content.
2. Selection (`component_ratios`, `selection_threshold`): once the layer's artifact subspace S is estimated from the
   candidates (method/artifact_subspace.py), a token is an artifact when its component in S (its distance to the
   normal tokens' mean, projected on S) is above SELECT_FACTOR times the normal tokens' median component, and above
   MIN_COMPONENT; both in units of the image's median token norm, so one threshold holds for every image.
   Direction, not norm: content projects weakly on S, an artifact of any strength strongly.
3. The band (`in_band`): tokens whose component is above BAND_SHARE of the threshold but not above it are neither
   artifacts nor normal tokens. The adapter is linear and shared by every token, so taking S out of the artifacts
   takes each token's component out too; held to its raw value, a token with a component several times the normal
   bulk's fights that removal. The losses leave the band out of both L_out groups and of L_info.

`select_k` (SingerConfig) overrides 1 and 2 with the fixed rule, tokens above select_k x the image median norm, and has
no band.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# A block update is a candidate write when its log norm ratio (to the image's typical update at that block) is this
# many robust standard deviations above it. Measured on the planted families at 2.5x-10x (docs/results.md, "Token
# selection"): artifact writes stand 45-117 deviations out, other tokens' updates at most 10.4 (5-8.3 but where the
# blocks after a writer answer the artifact); a content token past the cut only joins the estimate's candidates.
CANDIDATE_Z = 8.0
# The typical update of an image: its lower quartile, and the median distance below it in standard deviations (for a
# Gaussian the median distance below the 25th percentile is 0.476 sigma).
LOW_QUANTILE = 0.25
LOW_SPREAD = 1.0 / 0.476
# Selection: a token's component in the artifact subspace above this many times the normal tokens' median component,
# and above MIN_COMPONENT of the image's median token norm. Measured on the planted families: normal tokens' median
# component 0.037 of the median norm, their largest 0.27 (7x); artifacts at 2.5x from 2.0 (50x).
SELECT_FACTOR = 10.0
MIN_COMPONENT = 0.1
# The band below the threshold whose tokens the losses neither hold nor push (docs/method.md, "Token selection"):
# above this share of the threshold, i.e. 5x the normal tokens' median component, where they thin out (on the grown
# planted teachers their 99.9th percentile is 4.1-4.4x, the 99.99th 4.7-5.7x).
BAND_SHARE = 0.5


@torch.no_grad()
def write_scores(updates: Sequence[Tensor]) -> Tensor:
    """updates: the patch tokens' updates (B, N, D) of blocks 0..layer in order. Returns (B, N): each token's largest
    write z-score over blocks 1..layer, how far its update's log norm stands above its image's typical update in
    robust standard deviations."""
    best = torch.full(updates[0].shape[:2], -torch.inf, device=updates[0].device)
    for update in updates[1:]:
        log_norm = update.float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny).log()
        # Writes only raise an update's norm, so the typical update is read off the lower part of each image's
        # updates: centred at the image's LOW_QUANTILE, scaled by the distances below it (LOW_SPREAD makes them a
        # standard deviation for Gaussian log-norms). Content sets both whatever share of the tokens is written,
        # up to 1 - LOW_QUANTILE; a median would sit among the written tokens once they are half of an image.
        ratio = log_norm - log_norm.quantile(LOW_QUANTILE, dim=1, keepdim=True)
        spread = LOW_SPREAD * (-ratio[ratio < 0]).median().clamp_min(1e-6)
        best = torch.maximum(best, ratio / spread)
    return best


def write_outliers(updates: Sequence[Tensor], z: float = CANDIDATE_Z) -> Tensor:
    """(B, N) bool: the tokens whose update at some block >= 1 stands out by more than `z` (write_scores)."""
    return write_scores(updates) > z


def component_ratios(tokens: Tensor, mean: Tensor, basis: Tensor, medians: Tensor | None = None) -> Tensor:
    """Each token's component in the subspace `basis` (k, D) around `mean` (D,), over its image's median token norm.
    tokens: patch tokens of whole images (B, N, D), or any tokens (..., D) with their images' `medians` (...)."""
    tokens = tokens.float()
    if medians is None:
        medians = tokens.norm(dim=-1).median(dim=-1, keepdim=True).values
    tiny = torch.finfo(torch.float32).tiny
    return ((tokens - mean.to(tokens)) @ basis.to(tokens).T).norm(dim=-1) / medians.float().clamp_min(tiny)


def selection_threshold(normal_ratios: Tensor) -> float:
    """The component ratio above which a token is an artifact, from the normal tokens' ratios (component_ratios)."""
    typical = float(normal_ratios.median()) if normal_ratios.numel() else 0.0
    return max(SELECT_FACTOR * typical, MIN_COMPONENT)


def in_band(ratios: Tensor, threshold: float) -> Tensor:
    """The tokens whose component ratio (component_ratios) lies in the band (BAND_SHARE x threshold, threshold]: not
    artifacts, and too far along the subspace to be held to their raw value."""
    return (ratios > BAND_SHARE * threshold) & (ratios <= threshold)
