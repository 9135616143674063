"""Which tokens are artifacts, decided from the data at each distilled layer (docs/method.md, "Token selection").

A token's norm alone cannot tell a weak artifact from content: on the planted teachers a 2.5x artifact sits inside the
norms of textured patches (up to 4x the image median), and a trained teacher writes its artifact at a range of
strengths. What does tell them apart is how the artifact arrives and where it points. Per layer:

1. Candidates for the subspace estimate (`write_outliers`): tokens that some block 1..layer updates far more than it
   updates the other tokens of the image. A writer adds a vector as large as the token in one step, so its write
   stands apart at its block: the log of each update's norm over the image's typical update, in robust standard
   deviations (`block_write_scores`), sorted over the batch, shows a gap below the written tokens at least
   GAP_RATIO times as wide as the distance from the typical update to the gap's lower edge (`write_cut`). A gap,
   not a fixed score: a trained teacher's early blocks update some content tokens by 20 deviations in a continuous
   tail, while its artifact writes stand only 3-6 deviations out, but alone, above a bulk that ends near 1-2. Block 0
   is left out: its "update" is the patch embedding, whose norm is the patch's content. An update of more than
   WRITE_SIZE times both the image's median token norm and its median update is a write too, gap or not.
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

# A block's writes are the tokens above the lowest gap in its sorted write scores (over the batch, within the top
# MAX_WRITTEN_SHARE) that is at least GAP_RATIO times the gap's lower edge (that edge taken as 1 deviation at least).
# Measured per batch of 32 images (benchmarks/planted_selection.py, docs/results.md "Token selection"): below a trained
# teacher's writer cluster the gap is 1.04-2.7 times its lower edge (untrained teachers: 4-12); with only content
# above it at most 0.71 (a heavy tail's top one or two tokens). A content token let in only joins the candidates.
GAP_RATIO = 0.85
# A write also when a block's update alone is more than this many times its image's median token norm at the block's
# input, and as many times its image's median update, gap or not: a trained teacher's blocks update every token more,
# which can close the gap below a strong write (trained 8% two mechanisms: the position write at block 6, gap
# 0.26-0.42 of its edge). Measured (docs/method.md, "Token selection"): planted writers at their first block 3.7-12.4x
# the median token norm (trained, rho 10: 7.4-12.4x) and 10.7x the median update or more; content updates on the
# untrained teachers at most 0.23x the median token norm, on the trained ones and their clean twins at most 4.8x.
# Weak artifacts (2.5x) write 2-2.6x: the gap rule catches those. The median update keeps a block that updates every
# token by a lot (a patch embedding far smaller than the blocks' updates) from writing them all.
WRITE_SIZE = 6.0
# The typical update of an image: its lower quartile, and the median distance below it in standard deviations (for a
# Gaussian the median distance below the 25th percentile is 0.476 sigma). A block may write up to the rest.
LOW_QUANTILE = 0.25
LOW_SPREAD = 1.0 / 0.476
MAX_WRITTEN_SHARE = 1.0 - LOW_QUANTILE
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
def block_write_scores(update: Tensor) -> Tensor:
    """update: one block's patch-token updates (B, N, D). Returns (B, N): how far each update's log norm stands above
    its image's typical update, in robust standard deviations of the batch."""
    log_norm = update.float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny).log()
    # Writes only raise an update's norm, so the typical update is read off the lower part of each image's updates:
    # centred at the image's LOW_QUANTILE, scaled by the distances below it (LOW_SPREAD makes them a standard
    # deviation for Gaussian log-norms). Content sets both whatever share of the tokens is written, up to
    # 1 - LOW_QUANTILE; a median would sit among the written tokens once they are half of an image.
    ratio = log_norm - log_norm.quantile(LOW_QUANTILE, dim=1, keepdim=True)
    spread = LOW_SPREAD * (-ratio[ratio < 0]).median().clamp_min(1e-6)
    return ratio / spread


def write_cut(scores: Tensor) -> float:
    """The score above which a block's tokens are writes (block_write_scores of the whole batch): the middle of the
    lowest gap among the top MAX_WRITTEN_SHARE of the sorted scores at least GAP_RATIO times its lower edge; inf
    when there is none (the block writes nothing)."""
    ranked = scores.flatten().sort(descending=True).values
    top = ranked[:max(1, int(MAX_WRITTEN_SHARE * len(ranked))) + 1]
    wide = (top[:-1] - top[1:]) >= GAP_RATIO * top[1:].clamp_min(1.0)
    if not wide.any():
        return torch.inf
    lowest = int(wide.nonzero().max())
    return float(top[lowest] + top[lowest + 1]) / 2


@torch.no_grad()
def write_outliers(updates: Sequence[Tensor], stream: Sequence[Tensor] | None = None) -> Tensor:
    """(B, N) bool: the tokens some block >= 1 writes: above that block's write_cut, or, with `stream` (every block's
    output tokens (B, N, D), block b's input being stream[b - 1]), an update of more than WRITE_SIZE times its
    image's median input token norm and its image's median update norm."""
    written = torch.zeros(updates[0].shape[:2], dtype=torch.bool, device=updates[0].device)
    for block, update in enumerate(updates[1:], start=1):
        scores = block_write_scores(update)
        written |= scores > write_cut(scores)
        if stream is not None:
            norm = update.float().norm(dim=-1)
            token = stream[block - 1].float().norm(dim=-1).median(dim=1, keepdim=True).values
            typical = norm.median(dim=1, keepdim=True).values
            written |= (norm > WRITE_SIZE * token) & (norm > WRITE_SIZE * typical)
    return written


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
