"""`singer-deploy scan`: where a teacher's artifacts are, before any training (docs/usage.md, "Scan a teacher").

One pass of the raw teacher over the evaluation images, every block tapped:
- per block, the patch-token norms over their image's median norm, as counts in fixed log10 bins (HIST_EDGES);
- per block, the data-driven artifact selection (method/selection.py) from a SubspaceEstimator that treats every
  block as a distilled layer: the share of tokens it selects, their strength (median norm over the image median),
  the threshold, the subspace's rank and writer blocks;
- per block, the share of tokens above HIGH_NORM x the image median that the selection did NOT pick: a high-norm
  mode the selection leaves untreated is reported next to the verdict instead of "no artifacts" (issue 30, item 4);
- per-patch norm maps of the first images, for the page's picture.

From these: the suggested distilled layers and adapter rank (`suggest`). Plain numbers and arrays only leave this
module (`ScanResult.to_dict`), so the page (reporting/scan_page.py) never sees a tensor or an estimator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from singer_deploy.method.artifact_subspace import (ArtifactSubspace, SubspaceEstimator, describe_subspace,
                                                    incomplete_note)
from singer_deploy.method.metrics import DEFAULT_K, token_norms
from singer_deploy.models.backbone import Backbone

# Fixed bins of log10(norm / image median): 0.1x to 100x in steps of 10^0.05; tokens outside go to the end bins.
HIST_EDGES = np.round(np.arange(-1.0, 2.0 + 1e-9, 0.05), 2)
# A token this many times its image's median norm is high-norm (HNR_4, the cut the artifact literature reports).
HIGH_NORM = DEFAULT_K
# High-norm tokens kept per block to check whether the selection picks them (the count itself uses every token).
MAX_HIGH_NORM_KEPT = 4096
# Patch tokens per image the artifact-subspace estimate reads, a random sample of positions per image (the
# histograms, high-norm counts and norm maps read every token). The estimate's (D, D) sums run for every pair of
# blocks (block <= layer), so their cost grows with depth squared: for ViT-L/14 at 224 px (256 tokens) they cost
# twice the teacher's forward; half the tokens keeps the scan of 64 images within 5 minutes on 2 cores
# (docs/results.md, "Scan"). Shares stay unbiased (every token is equally likely to be read); the estimate rests on
# half the artifact tokens.
ESTIMATE_TOKENS = 128
# Images whose norm maps the page shows.
SHOWN_IMAGES = 4
# Reference placement of the intermediate distilled layer: block 17 of a 24-block ViT-L (docs/method.md,
# "Distilled layers and the layer mapping"), i.e. round(0.75 x depth) - 1; 12 blocks -> 8, 32 -> 23.
REFERENCE_POSITION = 0.75
# singer.rank is suggested in steps of this (matmul-friendly widths; a direction just under the estimate's limit
# on these images may pass it on others, so the step is also headroom).
RANK_STEP = 8


@dataclass
class BlockScan:
    """One block's figures (scan.json's `blocks` entries). artifact_share / artifact_ratio are 0 when the selection
    picks nothing there; threshold (a component ratio, or select_k under the fixed rule) is None when the
    data-driven selection has nothing to select with (no candidate token, or no artifact direction)."""

    block: int
    artifact_share: float
    artifact_ratio: float
    threshold: float | None
    threshold_rule: str
    rank: int
    left_out: int
    writers: dict[int, float]
    high_norm_share: float
    untreated_high_norm_share: float
    histogram: list[int]
    subspace: str
    incomplete: str | None = None      # why the estimate misses part of the artifact (None: it does not)

    def to_dict(self) -> dict:
        return {"block": self.block, "artifact_share": round(self.artifact_share, 5),
                "artifact_ratio": round(self.artifact_ratio, 3),
                "threshold": None if self.threshold is None else round(self.threshold, 4),
                "threshold_rule": self.threshold_rule, "rank": self.rank, "left_out": self.left_out,
                "writers": {str(b): round(s, 4) for b, s in sorted(self.writers.items())},
                "high_norm_share": round(self.high_norm_share, 5),
                "untreated_high_norm_share": round(self.untreated_high_norm_share, 5),
                "histogram": self.histogram, "subspace": self.subspace, "incomplete": self.incomplete}


@dataclass
class ScanResult:
    teacher: str
    images: int
    depth: int
    blocks: list[BlockScan]
    layers: list[int]                  # suggested `layers` (the config value: the last block is always added)
    distilled: list[int]               # what those layers distil: `layers` plus the last block
    rank: int | None                   # suggested singer.rank (None: no artifact, keep the configured rank)
    reasons: list[str]                 # why these suggestions, one line each
    verdict: str
    notes: list[str]                   # untreated high-norm modes and incomplete estimates, one line each
    seconds: float = 0.0
    norm_maps: dict[int, np.ndarray] = field(default_factory=dict)    # block -> (SHOWN_IMAGES, gh, gw)
    files: dict[str, Path] = field(default_factory=dict)              # what pipeline.api.scan wrote

    def shown_blocks(self) -> list[int]:
        """The blocks the page's norm-map picture shows: the first with artifacts and the suggested distilled ones."""
        found = artifact_blocks(self.blocks)
        return sorted({*self.distilled, *([found[0].block] if found else [])})

    def to_dict(self) -> dict:
        """scan.json: JSON-safe, no arrays but the histogram counts."""
        return {"teacher": self.teacher, "images": self.images, "depth": self.depth, "verdict": self.verdict,
                "notes": self.notes, "suggested": {"layers": self.layers, "distilled_layers": self.distilled,
                                                   "singer.rank": self.rank, "why": self.reasons},
                "histogram_edges_log10": HIST_EDGES.tolist(), "seconds": round(self.seconds, 1),
                "blocks": [block.to_dict() for block in self.blocks]}


class _BlockNorms:
    """Running per-block norm figures: histogram counts, high-norm count, kept high-norm tokens, first norm maps."""

    def __init__(self, depth: int):
        self.counts = np.zeros((depth, len(HIST_EDGES) - 1), dtype=np.int64)
        self.high = np.zeros(depth, dtype=np.int64)
        self.kept: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(depth)]   # (tokens, image medians)
        self.maps: list[list[np.ndarray]] = [[] for _ in range(depth)]
        self.tokens = 0

    def add(self, block: int, patches: Tensor, grid: tuple[int, int]) -> None:
        norms = token_norms(patches)
        medians = norms.median(dim=1, keepdim=True).values.clamp_min(torch.finfo(norms.dtype).tiny)
        ratio = (norms / medians).cpu().numpy()
        log_ratio = np.clip(np.log10(np.maximum(ratio, 1e-30)), HIST_EDGES[0], HIST_EDGES[-1])
        self.counts[block] += np.histogram(log_ratio, HIST_EDGES)[0]
        high = norms > HIGH_NORM * medians
        self.high[block] += int(high.sum())
        room = MAX_HIGH_NORM_KEPT - sum(len(t) for t, _ in self.kept[block])
        if room > 0 and high.any():
            self.kept[block].append((patches[high][:room].float().cpu(),
                                     medians.expand_as(norms)[high][:room].float().cpu()))
        shown = SHOWN_IMAGES - sum(len(m) for m in self.maps[block])
        if shown > 0:
            self.maps[block].append(norms[:shown].reshape(-1, *grid).float().cpu().numpy())

    def untreated(self, block: int, found: ArtifactSubspace | None) -> float:
        """Share of all tokens that are high-norm and not selected at `block` (exact up to MAX_HIGH_NORM_KEPT
        high-norm tokens, beyond that estimated on the first ones kept)."""
        if not self.high[block]:
            return 0.0
        tokens = torch.cat([t for t, _ in self.kept[block]])
        medians = torch.cat([m for _, m in self.kept[block]])
        if found is None:
            missed = 1.0
        else:   # ArtifactSubspace.select reads whole images; the kept tokens carry their own images' medians
            picked = found.select(tokens, medians)
            missed = float((~picked).double().mean())
        return missed * float(self.high[block]) / self.tokens


@torch.inference_mode()
def scan_teacher(teacher: Backbone, batches: Iterable[Tensor], *, name: str, select_k: float | None = None,
                 max_rank: int | None = None) -> ScanResult:
    """Scan `teacher` on `batches` (normalised image tensors on the teacher's device); see the module docstring.
    `select_k` / `max_rank`: the config's singer.select_k (None: data-driven) and a cap on the subspace rank (None:
    every direction, so the suggested rank can count them)."""
    clock = time.perf_counter()
    depth, prefix = teacher.depth, teacher.num_prefix_tokens
    estimator = SubspaceEstimator(range(depth), select_k, prefix, max_rank=max_rank)
    norms = _BlockNorms(depth)
    images = 0
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        taps = teacher.forward_taps(batch, estimator.blocks_needed)
        estimator.add(_token_sample(taps, prefix, ESTIMATE_TOKENS, generator))
        for block in range(depth):
            norms.add(block, taps[block][:, prefix:], teacher.grid_size)
        images += len(batch)
        norms.tokens += len(batch) * teacher.num_patches
    found = estimator.result()
    blocks = [_block_scan(block, found[block], norms, select_k) for block in range(depth)]
    layers, distilled, rank, reasons = suggest(blocks, depth, teacher.embed_dim)
    result = ScanResult(name, images, depth, blocks, layers, distilled, rank, reasons, verdict(blocks),
                        notes(blocks, distilled), norm_maps={b: np.concatenate(norms.maps[b]) for b in range(depth)})
    result.seconds = time.perf_counter() - clock
    return result


def _token_sample(taps: dict[int, Tensor], prefix: int, keep: int, generator: torch.Generator) -> dict[int, Tensor]:
    """The taps with each image's prefix tokens and `keep` of its patch tokens, at random positions drawn per image
    (the same positions at every block); all of them when the image has no more."""
    first = next(iter(taps.values()))
    images, patches = first.shape[0], first.shape[1] - prefix
    if patches <= keep:
        return taps
    chosen = torch.rand(images, patches, generator=generator).argsort(1)[:, :keep].sort(1).values + prefix
    index = torch.cat([torch.arange(prefix).expand(images, prefix), chosen], 1).to(first.device)
    return {block: tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
            for block, tokens in taps.items()}


def _block_scan(block: int, found: ArtifactSubspace | None, norms: _BlockNorms, select_k: float | None) -> BlockScan:
    selected = found is not None and found.rank > 0
    rule = "norm over the image median (select_k)" if select_k is not None else "subspace component"
    threshold = select_k if select_k is not None else (found.threshold if selected else None)
    return BlockScan(
        block=block,
        artifact_share=found.selected_share if selected else 0.0,
        artifact_ratio=found.strength if selected and found.selected_share > 0 else 0.0,
        threshold=threshold, threshold_rule=rule,
        rank=0 if found is None else found.rank, left_out=0 if found is None else found.left_out,
        writers={} if found is None else dict(found.writers),
        high_norm_share=float(norms.high[block]) / norms.tokens,
        untreated_high_norm_share=norms.untreated(block, found if selected else None),
        histogram=norms.counts[block].tolist(),
        subspace="no candidate artifact token" if found is None else describe_subspace(found.summary()),
        incomplete=incomplete_note(found.summary()) if selected and not found.complete else None)


def artifact_blocks(blocks: list[BlockScan]) -> list[BlockScan]:
    return [b for b in blocks if b.artifact_share > 0]


def suggest(blocks: list[BlockScan], depth: int, width: int) -> tuple[list[int], list[int], int | None, list[str]]:
    """Suggested `layers` (the config value), the distilled layers they give, singer.rank, and why.

    Layers: as the project distils by default (the last block, always, plus one intermediate block at the
    reference position, REFERENCE_POSITION of the depth), except that the intermediate block moves to the first
    block with artifacts when that comes later: a layer before the first write has nothing to refine.
    Rank: the most directions (rank + left_out) the estimate needs at a distilled layer, rounded up to RANK_STEP."""
    last = depth - 1
    reference = max(round(REFERENCE_POSITION * depth) - 1, 0)
    found = artifact_blocks(blocks)
    reasons = []
    if not found:
        layers = [reference] if reference < last else []
        reasons.append(f"no artifacts found: the project's default placement (block {reference} of {depth}, as "
                       "block 17 of a 24-block ViT-L, plus the last block); SiNGER has nothing to remove here")
        return layers, sorted({*layers, last}), None, reasons
    first = found[0].block
    middle = max(reference, first)
    layers = [middle] if middle < last else []
    if middle > reference:
        reasons.append(f"layers: block {middle}, the first with artifacts (the reference position, block "
                       f"{reference}, comes before it), plus the last block {last}")
    else:
        reasons.append(f"layers: block {middle} (the reference position, at or after the first artifact block "
                       f"{first}), plus the last block {last}")
    distilled = sorted({*layers, last})
    needed = max(blocks[layer].rank + blocks[layer].left_out for layer in distilled)
    if not needed:
        reasons.append("singer.rank: no artifact direction at the distilled layers; keep the configured rank")
        return layers, distilled, None, reasons
    rank = min(max(RANK_STEP, math.ceil(needed / RANK_STEP) * RANK_STEP), width)
    reasons.append(f"singer.rank {rank}: the distilled layers need up to {needed} artifact "
                   f"direction{'s' * (needed != 1)} (rank + left out), rounded up to a multiple of {RANK_STEP} "
                   f"(at most the width {width})")
    return layers, distilled, rank, reasons


def _range_text(blocks: list[BlockScan], depth: int) -> str:
    first, last = blocks[0].block, blocks[-1].block
    contiguous = last - first + 1 == len(blocks)
    if contiguous and last == depth - 1:
        return f"from block {first} on"
    if contiguous:
        return f"at blocks {first}-{last}" if last > first else f"at block {first}"
    return "at blocks " + ", ".join(str(b.block) for b in blocks)


def verdict(blocks: list[BlockScan]) -> str:
    """One line: where the artifacts are, how many tokens at the deepest artifact block, how strong; or "no
    artifacts found" (with the untreated high-norm mode, if any, right after it: item 4 of issue 30)."""
    found = artifact_blocks(blocks)
    if not found:
        worst = max(blocks, key=lambda b: b.untreated_high_norm_share)
        if worst.untreated_high_norm_share > 0:
            return (f"no artifacts found by the selection, but block {worst.block} has "
                    f"{worst.untreated_high_norm_share:.1%} of tokens above {HIGH_NORM:g}x the median norm that it "
                    "did not pick")
        return "no artifacts found"
    deepest = found[-1]
    return (f"artifacts {_range_text(found, len(blocks))}, {deepest.artifact_share:.1%} of tokens, "
            f"~{_about(deepest.artifact_ratio)}x" + ("" if deepest.block == len(blocks) - 1 else
                                                  f" (at block {deepest.block})"))


def _about(ratio: float) -> str:
    """A strength to two significant digits (2.5, 9.9, 12), for "~3x" in the verdict."""
    return f"{ratio:.2g}" if ratio < 100 else f"{ratio:.0f}"


def _runs_text(blocks: list[BlockScan]) -> str:
    """Blocks with their untreated shares, consecutive ones as one range: "blocks 0-23 (up to 0.16%), 30 (1.2%)"."""
    runs: list[list[BlockScan]] = []
    for block in blocks:
        if runs and runs[-1][-1].block == block.block - 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    parts = [f"{run[0].block} ({run[0].untreated_high_norm_share:.2%})" if len(run) == 1 else
             f"{run[0].block}-{run[-1].block} (up to {max(b.untreated_high_norm_share for b in run):.2%})"
             for run in runs]
    return f"block{'s' * (len(blocks) != 1)} {', '.join(parts)}"


def notes(blocks: list[BlockScan], distilled: list[int]) -> list[str]:
    """Lines the verdict adds: blocks with high-norm tokens the selection did not pick, and distilled layers whose
    estimate misses part of the artifact."""
    lines = []
    untreated = [b for b in blocks if b.untreated_high_norm_share > 0]
    if untreated:
        lines.append(f"tokens above {HIGH_NORM:g}x the median norm the selection did not pick, at "
                     f"{_runs_text(untreated)}: a high-norm mode the data-driven selection leaves in place (natural "
                     f"high-norm content, or an artifact it misses: try singer.select_k={HIGH_NORM:g})")
    for layer in distilled:
        block = blocks[layer]
        if block.incomplete:
            lines.append(f"block {layer}: {block.incomplete}")
    return lines
