"""Artifact analysis of a finished run: raw teacher, refined teacher, clean twin and student, side by side.

Produces the numbers (rows and a headline) and the arrays the report draws (patch-norm maps, norm histograms,
tokens for PCA maps). Metrics come from singer_deploy.method.metrics; nothing here is recomputed differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from singer_deploy.devices import module_device
from singer_deploy.models.backbone import Backbone
from singer_deploy.method.metrics import artifact_metrics, high_norm_mask, normal_token_cosine, token_norms

if TYPE_CHECKING:
    from singer_deploy.train.loop import DistillResult
    from singer_deploy.models.planted import PlantedTeacher
    from singer_deploy.method.refine import RefinedTeacher


@dataclass
class ArtifactAnalysis:
    rows: list[dict]                                            # one per (source, layer)
    headline: dict                                              # short summary numbers
    norm_maps: dict[str, np.ndarray] = field(default_factory=dict)   # source -> (B, gh, gw)
    norms: dict[str, np.ndarray] = field(default_factory=dict)       # source -> flat patch norms
    tokens: dict[str, np.ndarray] = field(default_factory=dict)      # source -> (B, N, D) for PCA maps


@torch.inference_mode()
def analyse_artifacts(teacher: Backbone, refined: RefinedTeacher | None, result: DistillResult,
                      images: Tensor | np.ndarray, planted: PlantedTeacher | None = None, *,
                      batch_size: int = 32) -> ArtifactAnalysis:
    """`refined`: RefinedTeacher or None (FitNet); `result`: DistillResult; `planted`: PlantedTeacher or None.

    Device rule (singer_deploy.devices): runs on the device of the trained student (the training device), moving
    the teacher, refined teacher and clean twin there, in batches of `batch_size` images wherever `images` live;
    every array of the result is on the CPU.
    """
    device = module_device(result.student)
    for module in (teacher, refined, planted.clean if planted is not None else None, result.projectors):
        if module is not None:
            module.to(device)
    images = torch.as_tensor(images)
    layers = result.teacher_layers
    p_t = teacher.num_prefix_tokens

    def tokens_of(model, wanted: list[int], prefix: int) -> dict[int, Tensor]:
        chunks = [model.forward_taps(images[i:i + batch_size].to(device), wanted)
                  for i in range(0, len(images), batch_size)]
        return {l: torch.cat([chunk[l] for chunk in chunks])[:, prefix:] for l in wanted}

    raw = tokens_of(teacher, layers, p_t)
    # Normal tokens: not high-norm in the raw teacher (or the planted ground truth when there is one).
    normal = ~planted.artifact_mask(images).to(device) if planted is not None else ~high_norm_mask(raw[layers[-1]])
    sources: dict[str, dict[int, Tensor]] = {"raw teacher": raw}
    if planted is not None:
        sources["clean twin"] = tokens_of(planted.clean, layers, p_t)
    if refined is not None:
        sources["refined teacher"] = tokens_of(refined, layers, p_t)
    student = result.student.eval()
    taps = tokens_of(student, result.student_layers, 0)     # with prefix tokens: the projectors align them
    p_s = student.num_prefix_tokens
    sources["student"] = {t: taps[s][:, p_s:] for t, s in zip(layers, result.student_layers)}
    sources["student (projected)"] = {t: result.projectors.patches(t, taps[s])
                                      for t, s in zip(layers, result.student_layers)}
    rows = []
    for name, feats in sources.items():
        for layer in layers:
            m = artifact_metrics(feats[layer])
            row = {"method": name, "layer": layer, "hnr_4": m["hnr"], "e_out": m["e_out"], "r_max": m["r_max"]}
            if feats[layer].shape[-1] == raw[layer].shape[-1]:
                row["normal_cos_to_raw"] = normal_token_cosine(feats[layer], raw[layer], normal)
            rows.append(row)
    last = layers[-1]
    grid = teacher.grid_size
    analysis = ArtifactAnalysis(rows, _headline(rows, last))
    for name in [n for n in sources if n != "student (projected)"]:
        patches = sources[name][last]
        norms = token_norms(patches)
        side = int(round(patches.shape[1] ** 0.5))
        shape = grid if patches.shape[1] == grid[0] * grid[1] else (side, side)
        analysis.norm_maps[name] = norms.reshape(-1, *shape).cpu().numpy()
        analysis.norms[name] = norms.flatten().cpu().numpy()
        analysis.tokens[name] = patches.float().cpu().numpy()
    return analysis


def _headline(rows: list[dict], layer: int) -> dict:
    """HNR_4 and E_out per source at the teacher's last distilled layer (the student's matched last block)."""
    at = {r["method"]: r for r in rows if r["layer"] == layer}
    return {"layer": layer,
            "hnr_4": {name: round(row["hnr_4"], 4) for name, row in at.items()},
            "e_out": {name: round(row["e_out"], 4) for name, row in at.items()}}
