"""SiNGER vs FitNet: the same student (same initial weights), data, steps and seed, distilled both ways, then judged
side by side with the raw teacher (and its clean twin, when there is one) as reference rows.

Columns (report.py renders the first six by name; the rest follow); every figure comes from
evaluation.analysis.artifact_rows, i.e. method.metrics.ArtifactStats (see there for the definitions):
  method, hnr_4, e_out      artifacts of the DEPLOYED features: a student's last block, a teacher's deepest
                            distilled layer (raw block outputs, patch tokens, k = 4 x the per-image median norm)
  knn_acc, linear_acc       image probes on the CLS token of the same block; miou: dense per-class probe
  <key>@L (teacher rows)    the raw teacher / clean twin at distilled layer L
  student_<key>@L           the student's own block mapped to L; proj_<key>@L: its projection into teacher space
                            (what L_kd compared; the projector is discarded later)
  target_<key>@L (SiNGER)   the refined target
  keys (LAYER_KEYS)         hnr_2/hnr_4/e_out; artifact_ratio: artifact tokens (ground truth or the raw teacher's
                            high-norm ones) over the normal-token median norm, a residual no threshold hides;
                            normal_cos(_p1): cosine to the raw teacher on normal tokens; next_cos: after the teacher
                            block that reads L; artifact_cos_clean: artifact tokens vs the clean twin's
Metrics are threshold-relative, never the loss's own top-(1 - alpha) set (docs/method.md).

Runner agreement (`runner_probe_agreement`, a second section of comparison.md): the SiNGER student is exported
(ONNX, OpenVINO FP32 + FP16 IR), its features are read through each artifact's runner and the eager PyTorch runner,
and the same probes run on each; one row per runner with its scores and their differences from PyTorch's.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from singer_deploy.models.backbone import Backbone
from singer_deploy.config import SingerConfig
from singer_deploy.config import TrainConfig
from singer_deploy.train.loop import DistillResult, distill
from singer_deploy.errors import ConfigError
from singer_deploy.export.golden import artifact_sha256, open_runner
from singer_deploy.export.pipeline import export_student
from singer_deploy.export.runner import TorchRunner
from singer_deploy.export.student import ExportableStudent
from singer_deploy.evaluation.features import FeatureSet, PatchDtype, as_image_data, extract_features
from singer_deploy.hashing import module_sha256
from singer_deploy.method.refine import RefinedTeacher
from singer_deploy.io import atomic_write_json, atomic_write_text
from singer_deploy.evaluation.analysis import (CLEAN, PROJECTED, RAW, REFINED, STUDENT, ArtifactMask,
                                               artifact_rows)
from singer_deploy.evaluation.probes import DenseTarget, evaluate_backbone, evaluate_features

METHODS = ("fitnet", "singer")
MARKDOWN, JSON = "comparison.md", "comparison.json"
MAIN_COLUMNS = ("method", "hnr_4", "e_out", "knn_acc", "linear_acc", "miou")
# evaluate_features keys behind the headline columns; the other probe scores are kept as extras.
_PROBE_COLUMNS = {"knn_cls_acc": "knn_acc", "linear_cls_acc": "linear_acc", "dense_class_miou": "miou",
                  "knn_pooled_acc": "knn_pooled_acc", "linear_pooled_acc": "linear_pooled_acc",
                  "dense_fg_miou": "dense_fg_miou"}

# Formats whose runner needs an optional runtime: compare_methods checks them by default where it is installed.
EXPORT_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}
REFERENCE_RUNNER = "pytorch/fp32"
# Identical predictions give bit-identical scores (same probe code, same order of sums); one flipped prediction
# moves an accuracy by 1/n_test. So any tolerance far below 1/n_test means "the same predictions".
SCORE_TOLERANCE = 1e-6
RUNNER_COLUMNS = ("runner", "knn_acc", "linear_acc", "miou", "diff_knn_acc", "diff_linear_acc",
                  "diff_miou", "max_score_diff", "feature_max_abs_diff", "scores_match", "parity_passed")



@dataclass
class ComparisonResult:
    rows: list[dict[str, Any]]
    notes: list[str]
    runs: dict[str, DistillResult]
    files: dict[str, Path] = field(default_factory=dict)
    runner_rows: list[dict[str, Any]] = field(default_factory=list)  # runner_probe_agreement of the SiNGER student
    layer_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # method -> analysis.artifact_rows

    def row(self, method: str) -> dict[str, Any]:
        return next(row for row in self.rows if row["method"] == method)


def compare_methods(teacher: Backbone, make_student: Callable[[], Backbone], train_data: Dataset, eval_data: Dataset,
                    out_dir: str | Path, *, layers: Sequence[int] = (), singer: SingerConfig | None = None,
                    train: TrainConfig | None = None, clean_teacher: Backbone | None = None,
                    methods: Sequence[str] = METHODS, batch_size: int = 64,
                    export_formats: Sequence[str] | None = None, progress: bool = False,
                    artifact_mask: ArtifactMask | None = None) -> ComparisonResult:
    """Distil `make_student()` with each method into out_dir/<method>, evaluate everything on `eval_data` (items
    with "image", "label" and optionally "fg_mask" for the dense probe) and write comparison.md / comparison.json.

    `make_student` is called once per method right after `torch.manual_seed(train.seed)` and must then build the
    same weights (checked). Finished runs in out_dir are reused, killed ones resumed (see `distill`).

    `export_formats`: the SiNGER student is exported to these formats into out_dir/singer_export and probed through
    each artifact's runner (`runner_probe_agreement`); None = every format in EXPORT_RUNTIMES whose runtime is
    installed, () = none. `artifact_mask`: ground-truth artifact tokens (analysis.planted_mask), None = the raw
    teacher's high-norm tokens per layer.
    """
    singer, train = singer or SingerConfig(), train or TrainConfig()
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError("Unknown comparison methods", expected=f"a non-empty subset of {list(METHODS)}",
                          found=str(list(methods)), fix="pass methods=('fitnet', 'singer')")
    out_dir = Path(out_dir)
    runs = _distil_each(methods, teacher, make_student, train_data, out_dir, layers, singer, train, progress)
    first = next(iter(runs.values()))
    data = as_image_data(eval_data)  # rendered once, shared by the metrics and every probe
    images = torch.from_numpy(data.images)
    if clean_teacher is not None:
        clean_teacher = clean_teacher.to(_device(teacher))
    layer_rows = {method: artifact_rows(teacher, run, images, clean=clean_teacher,
                                        refined=None if run.refiner is None else RefinedTeacher.from_refiner(
                                            teacher, run.refiner),
                                        artifact_mask=artifact_mask, batch_size=batch_size)
                  for method, run in runs.items()}
    rows = _probed_rows(runs, layer_rows, teacher, clean_teacher, data, batch_size, train.seed)

    formats = installed_export_formats() if export_formats is None else tuple(export_formats)
    runner_rows = []
    if formats and "singer" in runs:
        run = runs["singer"]
        # With the projector, as api.export ships it, so the artifact checked here is the deployable one.
        runner_rows = runner_probe_agreement(run.student, data, out_dir / "singer_export", projector=run.projectors.last,
                                             formats=formats, batch_size=batch_size, seed=train.seed)

    notes = _notes(rows, data.labels, first) + _runner_notes(runner_rows)
    settings = {"methods": list(methods), "teacher_layers": first.teacher_layers,
                "student_layers": first.student_layers, "eval_images": len(data.labels), "singer": asdict(singer),
                "train": asdict(train), "export_formats": list(formats) if "singer" in runs else []}
    result = ComparisonResult(rows, notes, runs, runner_rows=runner_rows, layer_rows=layer_rows)
    document = {"rows": rows, "notes": notes, "settings": settings, "runner_agreement": runner_rows}
    result.files = {"json": atomic_write_json(out_dir / JSON, document),
                    "markdown": atomic_write_text(out_dir / MARKDOWN, to_markdown(rows, notes, runner_rows))}
    return result


def _probed_rows(runs: dict, layer_rows: dict, teacher: Backbone, clean_teacher: Backbone | None, data,
                 batch_size: int, seed: int) -> list[dict]:
    """One row per method (its student's last block) and per reference teacher (its last distilled layer), each
    with its artifact columns and probe scores."""
    first = next(iter(runs.values()))
    scored = [(_method_row(method, layer_rows[method], run), run.student, -1) for method, run in runs.items()]
    references = [("teacher (raw)", RAW, teacher)]
    if clean_teacher is not None:
        references.append(("teacher (clean twin)", CLEAN, clean_teacher))
    scored += [(_reference_row(name, source, layer_rows[next(iter(runs))], first.teacher_layers), backbone,
                first.teacher_layers[-1]) for name, source, backbone in references]
    for row, source, layer in scored:
        row.update(probe_columns(evaluate_backbone(source, data, layer=layer, batch_size=batch_size, seed=seed)))
    return [_ordered(row) for row, _, _ in scored]


def probe_columns(scores: Mapping[str, float], dense_target: DenseTarget = "class") -> dict[str, Any]:
    """evaluate_features scores under this module's column names (_PROBE_COLUMNS); "miou" is the dense probe on
    `dense_target` ("class": the image's class on its foreground; "mask": a folder's own mask classes)."""
    row = {name: scores.get(key) for key, name in _PROBE_COLUMNS.items()}
    row["miou"] = scores.get(f"dense_{dense_target}_miou")
    return {**row, "n_test": int(scores["n_test"])}


def _distil_each(methods: Sequence[str], teacher: Backbone, make_student: Callable[[], Backbone],
                 train_data: Dataset, out_dir: Path, layers: Sequence[int], singer: SingerConfig,
                 train: TrainConfig, progress: bool) -> dict[str, DistillResult]:
    """One distillation per method, each from the same initial student weights (checked by their hash)."""
    runs, init_hash = {}, None
    for method in methods:
        torch.manual_seed(train.seed)
        student = make_student()
        digest = module_sha256(student.model)
        if init_hash is not None and digest != init_hash:
            raise ConfigError("make_student built different initial weights for the two methods",
                              expected="the same weights after torch.manual_seed(train.seed)",
                              found="different weight hashes", fix="build the student from the global torch RNG "
                              "only (e.g. timm.create_model), or load fixed initial weights inside the factory")
        init_hash = digest
        runs[method] = distill(teacher, student, train_data, out_dir / method, layers=layers, singer=singer,
                               train=replace(train, method=method), progress=progress)
    return runs


def installed_export_formats() -> tuple[str, ...]:
    """The formats of EXPORT_RUNTIMES whose runtime is importable here (checked without importing it)."""
    return tuple(fmt for fmt, module in EXPORT_RUNTIMES.items() if importlib.util.find_spec(module) is not None)


def runner_probe_agreement(student: nn.Module, dataset: Any, out_dir: str | Path | None = None, *,
                           projector: nn.Module | None = None, formats: Sequence[str] = ("onnx", "openvino"),
                           artifacts: Mapping[str, str | Path] | None = None, batch_size: int = 64, seed: int = 0,
                           patch_dtype: PatchDtype = "float32", tolerance: float = SCORE_TOLERANCE,
                           cache_dir: str | Path | None = None,
                           dense_target: DenseTarget = "class") -> list[dict[str, Any]]:
    """Probe scores of the exported student, read through each artifact's runner, next to eager PyTorch's.

    Exports `student` (+ `projector`, as deployed) to `formats` into `out_dir` with `export_student`, or opens the
    given `artifacts` ({label: path}) instead. Every runner, the eager `TorchRunner` first, is a feature source for
    `extract_features`; `evaluate_features` runs the same probes on the same split. One row per runner: its
    scores, `diff_<score>` = |score - PyTorch's|, `max_score_diff`, `feature_max_abs_diff` (CLS and patch tokens
    vs PyTorch's), `scores_match` (max_score_diff <= tolerance) and `parity_passed` (export gate; None for given
    artifacts and PyTorch). `patch_dtype` defaults to float32 so that only the runtime, not float16 storage of the
    patch tokens, can move the dense scores. `dense_target`: what the "miou" column probes (see `probe_columns`).
    """
    data = as_image_data(dataset)
    # export_student and TorchRunner move the module to the CPU in place; the caller's student stays where it is.
    wrapper = ExportableStudent(copy.deepcopy(student), copy.deepcopy(projector)).cpu().eval()
    parity: dict[str, bool | None] = {}
    if artifacts is None:
        if out_dir is None:
            raise ConfigError("Nowhere to export the student", expected="out_dir, or artifacts={label: path}",
                              found="neither", fix="pass out_dir=... (or the paths of existing artifacts)")
        exported = export_student(wrapper, out_dir, formats, img_size=wrapper.img_size,
                                  parity_images=data.images[:16], write_goldens=False)
        artifacts = exported.paths
        parity = {key: report.passed for key, report in exported.reports.items()}
    runners = {REFERENCE_RUNNER: TorchRunner(wrapper), **{label: open_runner(path) for label, path in
                                                         artifacts.items()}}
    source_ids = {REFERENCE_RUNNER: f"torch:{module_sha256(wrapper)}",
                  **{label: f"{label}:{artifact_sha256(path)}" for label, path in artifacts.items()}}
    return probe_runners(runners, data, batch_size=batch_size, seed=seed, patch_dtype=patch_dtype,
                         tolerance=tolerance, cache_dir=cache_dir, source_ids=source_ids,
                         dense_target=dense_target, parity=parity)


def probe_runners(runners: Mapping[str, Any], dataset: Any, *, batch_size: int = 64, seed: int = 0,
                  patch_dtype: PatchDtype = "float32", tolerance: float = SCORE_TOLERANCE,
                  cache_dir: str | Path | None = None, source_ids: Mapping[str, str] | None = None,
                  dense_target: DenseTarget = "class",
                  parity: Mapping[str, bool | None] | None = None) -> list[dict[str, Any]]:
    """The rows of `runner_probe_agreement` for runners already open ({label: runner}, the eager reference first,
    e.g. an ExportResult's `reference` and `runners`, opened with parity's settings). `source_ids` name them for
    `cache_dir`; `parity` gives each row's `parity_passed`."""
    data = as_image_data(dataset)
    scored = []
    for label, runner in runners.items():
        features = extract_features(runner, data, batch_size=batch_size, patch_dtype=patch_dtype,
                                    cache_dir=cache_dir, source_id=(source_ids or {}).get(label))
        scores = evaluate_features(features, seed=seed, dense=tuple(dict.fromkeys(("fg", dense_target))))
        scored.append(({"runner": label, **probe_columns(scores, dense_target)}, features))
    reference_row, reference = scored[0]
    return [_with_differences(row, features, reference_row, reference, tolerance, (parity or {}).get(row["runner"]))
            for row, features in scored]


def _with_differences(row: dict[str, Any], features: FeatureSet, reference_row: dict[str, Any],
                      reference: FeatureSet, tolerance: float, parity_passed: bool | None) -> dict[str, Any]:
    diffs = {f"diff_{name}": abs(row[name] - reference_row[name]) for name in _PROBE_COLUMNS.values()
             if row[name] is not None and reference_row[name] is not None}
    gaps = [np.abs(features.cls - reference.cls).max()]
    if features.patches is not None and reference.patches is not None:
        gaps.append(np.abs(features.patches.astype(np.float32) - reference.patches.astype(np.float32)).max())
    max_diff = max(diffs.values(), default=0.0)
    return {**row, **diffs, "max_score_diff": max_diff, "feature_max_abs_diff": float(max(gaps)),
            "scores_match": bool(max_diff <= tolerance), "parity_passed": parity_passed}


def to_markdown(rows: Sequence[dict[str, Any]], notes: Sequence[str] = (),
                runner_rows: Sequence[dict[str, Any]] = ()) -> str:
    """The comparison table (headline columns first, then every other key in order of first appearance) and, when
    given, the runner-agreement table of the exported SiNGER student."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in _ordered(row) if key not in keys]
    keys = [key for key in MAIN_COLUMNS if key in keys] + [key for key in keys if key not in MAIN_COLUMNS]
    lines = ["# SiNGER vs FitNet", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", *_table(rows, keys)]
    if runner_rows:
        lines += ["", "## Exported SiNGER student: probe scores through each runner", "",
                  f"Scores and their absolute difference from {REFERENCE_RUNNER} (eager PyTorch on the exported "
                  "graph), same probes and split; feature_max_abs_diff: CLS and patch tokens.", "",
                  *_table(runner_rows, [key for key in RUNNER_COLUMNS if any(key in row for row in runner_rows)],
                          _fmt_difference)]
    return "\n".join(lines) + "\n"


def _table(rows: Sequence[dict[str, Any]], keys: Sequence[str],
           fmt: Callable[[str, Any], str] = lambda key, value: _fmt(value)) -> list[str]:
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(fmt(key, row.get(key)) for key in keys) + " |" for row in rows)]


# --------------------------------------------------------------------------- rows

# analysis.artifact_rows source -> column prefix of a method row; the teacher references get their own rows.
_PREFIX = {REFINED: "target_", PROJECTED: "proj_", STUDENT: "student_"}
# Figures per layer in a comparison row (analysis.artifact_rows has all of them).
LAYER_KEYS = ("hnr_2", "hnr_4", "e_out", "artifact_ratio", "normal_cos", "normal_cos_p1", "next_cos",
              "artifact_cos_clean")


def _method_row(method: str, rows: Sequence[dict[str, Any]], run: DistillResult) -> dict[str, Any]:
    """The deployed student's last block (headline hnr_4 / e_out), then per layer the student, its projection and
    (SiNGER) the refined target."""
    last = next(row for row in rows if row["method"] == STUDENT and row["layer"] == run.teacher_layers[-1])
    out: dict[str, Any] = {"method": method, "role": "student",
                           "measured_at": f"student block {run.student_layers[-1]}",
                           "hnr_4": last["hnr_4"], "e_out": last["e_out"]}
    for row in rows:
        if row["method"] in _PREFIX:
            out.update({f"{_PREFIX[row['method']]}{key}@{row['layer']}": row[key] for key in LAYER_KEYS
                        if key in row})
    return out


def _reference_row(name: str, source: str, rows: Sequence[dict[str, Any]], layers: Sequence[int]) -> dict[str, Any]:
    at = {row["layer"]: row for row in rows if row["method"] == source}
    out: dict[str, Any] = {"method": name, "role": "reference", "measured_at": f"teacher block {layers[-1]}",
                           "hnr_4": at[layers[-1]]["hnr_4"], "e_out": at[layers[-1]]["e_out"]}
    for layer in layers:
        out.update({f"{key}@{layer}": at[layer][key] for key in LAYER_KEYS if key in at[layer]})
    return out


# --------------------------------------------------------------------------- notes and helpers

def _notes(rows: list[dict[str, Any]], labels: np.ndarray, run: DistillResult) -> list[str]:
    notes = [f"Same student init, data, steps and seed for every method; distilled teacher layers "
             f"{run.teacher_layers} -> student blocks {run.student_layers}.",
             "hnr_4 / e_out: a student's OWN last block (what is deployed) or a teacher's deepest distilled layer; "
             "proj_* columns are the projector outputs L_kd saw (the projector is discarded after training)."]
    teacher = next(row for row in rows if row["method"] == "teacher (raw)")
    _, counts = np.unique(labels, return_counts=True)
    chance = counts.max() / counts.sum()
    n_test = max(teacher["n_test"], 1)
    margin = max(0.05, 2.0 * math.sqrt(chance * (1.0 - chance) / n_test))
    scores = [teacher.get("knn_acc"), teacher.get("linear_acc")]
    if all(score is not None and score <= chance + margin for score in scores):
        notes.append(f"The raw teacher's image probes are at chance (kNN {scores[0]:.3f}, linear {scores[1]:.3f}; "
                     f"chance = majority-class share {chance:.3f}, {n_test} test images, noise ~{margin:.3f}): its "
                     "features do not encode these labels (e.g. random or planted weights), so the probe columns "
                     "cannot rank the methods here. Judge them by the artifact and fidelity columns.")
    return notes


def _runner_notes(runner_rows: list[dict[str, Any]]) -> list[str]:
    if not runner_rows:
        return []
    artifacts = runner_rows[1:]
    same = [row["runner"] for row in artifacts if row["scores_match"]]
    moved = [f"{row['runner']} (max {row['max_score_diff']:.4f})" for row in artifacts if not row["scores_match"]]
    note = (f"Exported SiNGER student through its runners: probe scores equal {REFERENCE_RUNNER}'s for "
            f"{', '.join(same) or 'none'}")
    return [note + (f"; differ for {', '.join(moved)}." if moved else ".")]


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    """Headline columns, then per-layer columns grouped by layer, then the other probe scores."""
    def rank(key: str) -> tuple:
        if key in MAIN_COLUMNS:
            return (0, MAIN_COLUMNS.index(key))
        if "@" in key:
            base, layer = key.split("@")
            return (2, int(layer))
        return (1 if key in ("role", "measured_at") else 3, 0)
    return {key: row[key] for key in sorted(row, key=rank)}  # sorted() is stable: ties keep insertion order


def _device(backbone: Backbone) -> torch.device:
    return next(backbone.parameters()).device


def _fmt_difference(key: str, value: Any) -> str:
    """Differences in scientific notation: a float-rounding gap of 1e-7 must not print as a clean 0.0000."""
    if "diff" in key and isinstance(value, float) and value != 0.0:
        return f"{value:.1e}"
    return _fmt(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)
