"""A run's probe table: what the raw teacher, the distilled student and each exported artifact know about the labels
of the held-out images.

Every row is scored by the same probes (evaluation/probes.py) on the same stratified split of the same images:
linear CLS, linear mean patch token, cosine kNN on CLS, and the dense per-patch probe when the images carry masks.
The teacher is read at its last block, the student at its own last block (the features a deployed backbone gives,
before the final norm), PyTorch first, then through each exported artifact's runner (study.probe_runners, the
rows of runner_probe_agreement), so a row that moves from the PyTorch student's shows what an export costs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from singer_deploy.evaluation.features import ImageData, extract_features
from singer_deploy.evaluation.probes import DenseTarget, evaluate_features
from singer_deploy.evaluation.study import REFERENCE_RUNNER, probe_columns, probe_runners
from singer_deploy.export.runner import Runner, TorchRunner
from singer_deploy.models.backbone import Backbone

# Row keys of the table, in order: the sources, then the scores (study's column names).
TABLE_KEYS = ("model", "features", "linear_acc", "linear_pooled_acc", "knn_acc", "miou", "max_score_diff")


def probe_table(teacher: Backbone, student: Backbone, data: ImageData, *, projector: nn.Module | None = None,
                reference: Runner | None = None, runners: Mapping[str, Runner] | None = None,
                dense_target: DenseTarget = "class", seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """The probes on the raw teacher's last block, the student's and every exported artifact's.

    The student is read through `reference` (an export's eager TorchRunner) or else a TorchRunner of `student` and
    `projector`; the artifacts through `runners` ({label: runner}, e.g. ExportResult.runners: opened once, reused).

    Returns {"rows", "classes", "chance", "n_train", "n_test", "dense"}: one row per source with TABLE_KEYS
    (`miou` None without masks; `max_score_diff`: the largest score difference from the PyTorch student, None for
    the teacher); chance = 1 / number of classes among the images; dense names the dense target, or None.
    """
    teacher_scores = evaluate_features(extract_features(teacher, data, batch_size=batch_size), seed=seed,
                                       dense=(dense_target,))
    rows = [{"model": "teacher (raw)", "features": f"teacher block {teacher.depth - 1} (last)",
             **probe_columns(teacher_scores, dense_target), "max_score_diff": None}]
    # A TorchRunner moves its module to the CPU in place: it gets a copy, so the caller's student stays put.
    eager = reference if reference is not None else TorchRunner(copy.deepcopy(student.model),
                                                                projector=copy.deepcopy(projector))
    for row in probe_runners({REFERENCE_RUNNER: eager, **(runners or {})}, data, batch_size=batch_size, seed=seed,
                             dense_target=dense_target):
        student_block = f"student block {student.depth - 1} (last)"
        own = row["runner"] == REFERENCE_RUNNER
        rows.append({**row, "model": f"student ({row['runner']})" if own else row["runner"],
                     "features": student_block if own else f"{student_block}, exported"})
    classes = len(np.unique(data.labels))
    has_dense = data.masks is not None
    return {"rows": [{key: row.get(key) for key in TABLE_KEYS if key != "miou" or has_dense} for row in rows],
            "classes": classes, "chance": 1.0 / classes, "n_train": int(teacher_scores["n_train"]),
            "n_test": int(teacher_scores["n_test"]), "dense": dense_target if has_dense else None}
