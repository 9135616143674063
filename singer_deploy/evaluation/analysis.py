"""Artifact analysis of a finished run: raw teacher, clean twin, refined teacher, student and projected student, at
EVERY distilled layer, side by side.

Produces the rows (one per source and layer, every `ArtifactStats` figure), one line per layer saying whether
artifacts remain (separate from export parity), and the arrays the report draws (patch-norm maps, norm histograms,
tokens for PCA maps). Formulas live in singer_deploy.method.metrics; this module only decides which tokens go in:

- artifact tokens: the planted teacher's ground truth (at and after its artifact layer, none before), else the raw
  teacher's high-norm tokens (k = 4 x median) at that layer: one fixed set for every source, so a source that only
  shrank its artifacts still shows them in `artifact_ratio`;
- next-block cosine: the teacher block that reads the layer (the next one; the layer's own block for the teacher's
  last block, as in method.nullspace.surrogate_block) run on the raw prefix tokens + the source's patch tokens, vs
  the same block on the raw tokens, over normal tokens.

Device rule (singer_deploy.devices): everything runs on the device of the trained student (the training device),
in batches, wherever the images live; every figure and array of the result is on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from singer_deploy.devices import module_device
from singer_deploy.method.artifact_subspace import estimate_artifact_subspaces
from singer_deploy.method.metrics import REMAIN_RATIO, ArtifactStats, artifacts_remain, high_norm_mask, token_norms
from singer_deploy.method.nullspace import surrogate_block
from singer_deploy.models.backbone import Backbone

if TYPE_CHECKING:
    from singer_deploy.method.refine import RefinedTeacher
    from singer_deploy.models.planted import PlantedTeacher
    from singer_deploy.train.loop import DistillResult

RAW, CLEAN, REFINED, STUDENT, PROJECTED = ("raw teacher", "clean twin", "refined teacher", "student",
                                           "student (projected)")
# Sources judged by the "artifacts remain" line: what a user trains on and deploys (raw and clean are references).
JUDGED = (REFINED, STUDENT, PROJECTED)
# Evaluation images a run without its own estimate (FitNet) estimates the artifact selection on (selection_mask).
ESTIMATE_IMAGES = 256
# Per-layer figures kept in the run summary (the rows keep all of them).
SUMMARY_KEYS = ("hnr_2", "hnr_4", "artifact_ratio", "normal_cos", "normal_cos_p1", "next_cos", "artifact_cos_clean")

# (images, layer, the raw teacher's patch tokens there) -> (B, N) bool, or None to use the raw teacher's 4x tokens
ArtifactMask = Callable[[Tensor, int, Tensor], Tensor | None]


@dataclass
class ArtifactAnalysis:
    rows: list[dict]                                            # one per (source, layer)
    headline: dict                                              # layer -> source -> SUMMARY_KEYS
    remain: dict = field(default_factory=dict)                  # layer -> one line: do artifacts remain?
    norm_maps: dict[str, np.ndarray] = field(default_factory=dict)   # source -> (B, gh, gw)
    norms: dict[str, np.ndarray] = field(default_factory=dict)       # source -> flat patch norms
    tokens: dict[str, np.ndarray] = field(default_factory=dict)      # source -> (B, N, D) for PCA maps
    limit: float = REMAIN_RATIO                                      # the artifact/normal ratio `remain` judges by
    # Sentences for the run's verdict (reporting/verdict.py): anything the analysis finds that a user must read.
    warnings: list[str] = field(default_factory=list)


def planted_mask(planted: PlantedTeacher) -> ArtifactMask:
    """Ground truth of a planted teacher: at each layer, the tokens of every cluster written at or before it."""
    def mask(images: Tensor, layer: int, raw_patches: Tensor) -> Tensor:
        masks = planted.cluster_masks(images)
        written = [masks[c.name] for c in planted.clusters if c.first_block <= layer]
        return torch.stack(written).any(0) if written else torch.zeros_like(planted.artifact_mask(images))
    return mask


def selection_mask(teacher: Backbone, result: DistillResult, images: Tensor, batch_size: int) -> ArtifactMask:
    """Without ground truth, the artifact tokens the metrics judge are the ones the run's data-driven selection picks
    (ArtifactSubspace.select): a weak artifact below 4x the median is measured, not missed. A run without an
    estimate (FitNet, the published target) estimates one on the evaluation images, so both methods are judged on
    the same kind of token set."""
    device = module_device(teacher)
    subspaces = result.subspaces or estimate_artifact_subspaces(
        teacher, (batch.to(device) for batch in images[:ESTIMATE_IMAGES].split(batch_size)), result.teacher_layers,
        None)

    def mask(images: Tensor, layer: int, raw_patches: Tensor) -> Tensor | None:
        found = subspaces.get(layer)
        return None if found is None else found.select(raw_patches)
    return mask


@torch.inference_mode()
def artifact_rows(teacher: Backbone, result: DistillResult, images: Tensor | np.ndarray, *,
                  refined: RefinedTeacher | None = None, clean: Backbone | None = None,
                  artifact_mask: ArtifactMask | None = None, batch_size: int = 32) -> list[dict]:
    """One row per (source, distilled teacher layer) with every `ArtifactStats` figure, in batches.

    `refined`: the run's refined teacher (RefinedTeacher), None for FitNet; `clean`: the planted
    clean twin; `artifact_mask`: the artifact tokens (ground truth: `planted_mask`; the run's selection:
    `selection_mask`; a mask of None at a layer, or no mask: the raw teacher's tokens above 4x the median).
    """
    layers, p_t = result.teacher_layers, teacher.num_prefix_tokens
    student, projectors = result.student.eval(), result.projectors
    stats: dict[tuple[str, int], ArtifactStats] = {}
    device = module_device(teacher)
    for batch in torch.as_tensor(images).split(batch_size):
        batch = batch.to(device)
        raw = teacher.forward_taps(batch, layers)
        refined_taps = refined.taps_from(batch, raw) if refined is not None else {}
        clean_taps = clean.forward_taps(batch, layers) if clean is not None else {}
        taps = student.forward_taps(batch, result.student_layers)
        for layer, s_layer in zip(layers, result.student_layers):
            raw_patches = raw[layer][:, p_t:]
            truth = artifact_mask(batch, layer, raw_patches) if artifact_mask is not None else None
            mask = (truth if truth is not None else high_norm_mask(raw_patches)).to(raw_patches.device)
            block = surrogate_block(layer, teacher.depth)

            def next_out(patches: Tensor, raw_tokens: Tensor = raw[layer]) -> Tensor:
                tokens = torch.cat([raw_tokens[:, :p_t], patches.to(raw_tokens.dtype)], dim=1)
                return teacher.run_blocks(tokens, block, block + 1)[:, p_t:]

            raw_next = next_out(raw_patches)
            clean_patches = clean_taps[layer][:, p_t:] if layer in clean_taps else None
            sources = {RAW: raw_patches}
            if clean_patches is not None:
                sources[CLEAN] = clean_patches
            if refined is not None:
                sources[REFINED] = refined_taps[layer][:, p_t:]
            sources[PROJECTED] = projectors.patches(layer, taps[s_layer])
            for name, patches in sources.items():
                stats.setdefault((name, layer), ArtifactStats()).add(
                    patches, mask, raw=raw_patches, next_out=next_out(patches), raw_next_out=raw_next,
                    clean=clean_patches)
            own = student.split(taps[s_layer])[1]
            stats.setdefault((STUDENT, layer), ArtifactStats()).add(
                own, mask if own.shape[1] == mask.shape[1] else None)
    order = [RAW, CLEAN, REFINED, STUDENT, PROJECTED]
    blocks = dict(zip(layers, result.student_layers))
    return [{"method": name, "layer": layer, **({"student_block": blocks[layer]} if name == STUDENT else {}),
             **_json_safe(stats[(name, layer)].result())}
            for name in order for layer in layers if (name, layer) in stats]


def _json_safe(values: dict) -> dict:
    """NaN (nothing to measure, e.g. no artifact tokens before the artifact layer) -> None: manifest.json stays
    standard JSON."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in values.items()}


def remain_lines(rows: Sequence[dict], limit: float = REMAIN_RATIO) -> dict[str, str]:
    """One line per layer: the judged sources' artifact-to-normal norm ratios and whether artifacts remain."""
    lines = {}
    for layer in sorted({row["layer"] for row in rows}):
        judged = [row for row in rows if row["layer"] == layer and row["method"] in JUDGED]
        verdicts = {row["method"]: artifacts_remain(row, limit) for row in judged}
        left = [name for name, remain in verdicts.items() if remain]
        parts = ", ".join(f"{row['method']} {_ratio(row)}" for row in judged)
        state = (f"artifacts REMAIN in {', '.join(left)}" if left else "no artifacts remain")
        lines[str(layer)] = f"{state} ({parts}; limit {limit:g}x the normal-token median norm)"
    return lines


def _ratio(row: dict) -> str:
    ratio = row.get("artifact_ratio")
    return f"{ratio:.2f}x" if ratio is not None else f"HNR_4 {row['hnr_4']:.3f}"


@torch.inference_mode()
def analyse_artifacts(teacher: Backbone, refined: RefinedTeacher | None, result: DistillResult,
                      images: Tensor | np.ndarray, planted: PlantedTeacher | None = None, *,
                      remain_limit: float = REMAIN_RATIO, batch_size: int = 32) -> ArtifactAnalysis:
    """`refined`: RefinedTeacher or None (FitNet); `result`: DistillResult; `planted`: PlantedTeacher or None.

    Moves the teacher, refined teacher, clean twin and projectors to the trained student's device (module docstring).
    """
    clean = planted.clean if planted is not None else None
    device = module_device(result.student)
    for module in (teacher, refined, clean, result.projectors):
        if module is not None:
            module.to(device)
    images = torch.as_tensor(images)
    mask = planted_mask(planted) if planted is not None else selection_mask(teacher, result, images, batch_size)
    rows = artifact_rows(teacher, result, images, refined=refined, clean=clean, artifact_mask=mask,
                         batch_size=batch_size)
    headline = {str(layer): {row["method"]: {key: _rounded(row[key]) for key in SUMMARY_KEYS if key in row}
                             for row in rows if row["layer"] == layer} for layer in result.teacher_layers}
    analysis = ArtifactAnalysis(rows, headline, remain_lines(rows, remain_limit), limit=remain_limit)
    _add_maps(analysis, teacher, refined, result, images, clean, batch_size)
    return analysis


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def _add_maps(analysis: ArtifactAnalysis, teacher: Backbone, refined: RefinedTeacher | None, result: DistillResult,
              images: Tensor, clean: Backbone | None, batch_size: int) -> None:
    """Norm maps, histograms and PCA tokens at the last distilled layer (the student's own block for the student)."""
    last, p_t = result.teacher_layers[-1], teacher.num_prefix_tokens
    device = module_device(result.student)

    def patches_of(model, layer: int, prefix: int) -> Tensor:
        return torch.cat([model.forward_taps(batch.to(device), [layer])[layer][:, prefix:].cpu()
                          for batch in images.split(batch_size)])

    sources = {RAW: patches_of(teacher, last, p_t)}
    if clean is not None:
        sources[CLEAN] = patches_of(clean, last, p_t)
    if refined is not None:
        sources[REFINED] = patches_of(refined, last, p_t)
    sources[STUDENT] = patches_of(result.student, result.student_layers[-1], result.student.num_prefix_tokens)
    grid = teacher.grid_size
    for name, patches in sources.items():
        norms = token_norms(patches)
        side = int(round(patches.shape[1] ** 0.5))
        shape = grid if patches.shape[1] == grid[0] * grid[1] else (side, side)
        analysis.norm_maps[name] = norms.reshape(-1, *shape).numpy()
        analysis.norms[name] = norms.flatten().numpy()
        analysis.tokens[name] = patches.float().numpy()
