"""SiNGER vs FitNet: the same student (same initial weights), data, steps and seed, distilled both ways, then judged
side by side with the raw teacher (and its clean twin, when there is one) as reference rows.

Columns (report.py renders the first six by name; the rest follow):
  method, hnr_4, e_out      artifacts of the DEPLOYED features: a student's own last block, a teacher's deepest
                            distilled layer (raw block outputs, patch tokens, k = 4 x the per-image median norm)
  knn_acc, linear_acc       image probes on the CLS token of the same block; miou: dense per-class probe
  proj_*@L                  the trained projector's output for teacher layer L (what L_kd compared; discarded later)
  normal_cos_raw@L          cosine to the raw teacher on its normal (not high-norm) patch tokens at layer L
  normal_cos_clean@L        the same against the clean twin
  target_*@L (SiNGER)       the refined target: its artifacts, and its cosine to the raw teacher on normal tokens at
                            layer L and after the next teacher block (how little refinement disturbs the rest)
Metrics are threshold-relative, never the loss's own top-(1 - alpha) set (docs/method.md, "Traps").

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
import torch.nn.functional as F
from torch import Tensor, nn
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
from singer_deploy.io import atomic_write_json, atomic_write_text
from singer_deploy.method.metrics import DEFAULT_K, artifact_metrics, high_norm_mask
from singer_deploy.evaluation.probes import evaluate_backbone, evaluate_features

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

_LAYER_COLUMNS = ("hnr_4", "e_out", "proj_hnr_4", "proj_e_out", "normal_cos_raw", "normal_cos_clean", "target_hnr_4",
                  "target_e_out", "target_cos", "target_next_cos")


@dataclass
class ComparisonResult:
    rows: list[dict[str, Any]]
    notes: list[str]
    runs: dict[str, DistillResult]
    files: dict[str, Path] = field(default_factory=dict)
    runner_rows: list[dict[str, Any]] = field(default_factory=list)  # runner_probe_agreement of the SiNGER student

    def row(self, method: str) -> dict[str, Any]:
        return next(row for row in self.rows if row["method"] == method)


def compare_methods(teacher: Backbone, make_student: Callable[[], Backbone], train_data: Dataset, eval_data: Dataset,
                    out_dir: str | Path, *, layers: Sequence[int] = (), singer: SingerConfig | None = None,
                    train: TrainConfig | None = None, clean_teacher: Backbone | None = None,
                    methods: Sequence[str] = METHODS, batch_size: int = 64,
                    export_formats: Sequence[str] | None = None, progress: bool = False) -> ComparisonResult:
    """Distil `make_student()` with each method into out_dir/<method>, evaluate everything on `eval_data` (items
    with "image", "label" and optionally "fg_mask" for the dense probe) and write comparison.md / comparison.json.

    `make_student` is called once per method right after `torch.manual_seed(train.seed)` and must then build the
    same weights (checked). Finished runs in out_dir are reused, killed ones resumed (see `distill`).

    `export_formats`: the SiNGER student is exported to these formats into out_dir/singer_export and probed through
    each artifact's runner (`runner_probe_agreement`); None = every format in EXPORT_RUNTIMES whose runtime is
    installed, () = none.
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
    scored = [(_student_row(method, run, teacher, clean_teacher, images, batch_size), run.student, -1)
              for method, run in runs.items()]
    references = [("teacher (raw)", teacher)]
    if clean_teacher is not None:
        references.append(("teacher (clean twin)", clean_teacher))
    scored += [(_teacher_row(name, source, teacher, first.teacher_layers, images, batch_size), source,
                first.teacher_layers[-1]) for name, source in references]
    for row, source, layer in scored:
        scores = evaluate_backbone(source, data, layer=layer, batch_size=batch_size, seed=train.seed)
        row.update({name: scores.get(key) for key, name in _PROBE_COLUMNS.items()})
        row["n_test"] = int(scores["n_test"])
    rows = [_ordered(row) for row, _, _ in scored]

    formats = installed_export_formats() if export_formats is None else tuple(export_formats)
    runner_rows = []
    if formats and "singer" in runs:
        run = runs["singer"]
        # With the projector, as api.export ships it, so the artifact checked here is the deployable one.
        projector = run.projectors.last
        runner_rows = runner_probe_agreement(run.student, data, out_dir / "singer_export", projector=projector,
                                             formats=formats, batch_size=batch_size, seed=train.seed)

    notes = _notes(rows, data.labels, first) + _runner_notes(runner_rows)
    settings = {"methods": list(methods), "teacher_layers": first.teacher_layers,
                "student_layers": first.student_layers, "eval_images": len(data.labels), "singer": asdict(singer),
                "train": asdict(train), "export_formats": list(formats) if "singer" in runs else []}
    result = ComparisonResult(rows, notes, runs, runner_rows=runner_rows)
    document = {"rows": rows, "notes": notes, "settings": settings, "runner_agreement": runner_rows}
    result.files = {"json": atomic_write_json(out_dir / JSON, document),
                    "markdown": atomic_write_text(out_dir / MARKDOWN, to_markdown(rows, notes, runner_rows))}
    return result


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
                           cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Probe scores of the exported student, read through each artifact's runner, next to eager PyTorch's.

    Exports `student` (+ `projector`, as deployed) to `formats` into `out_dir` with `export_student`, or opens the
    given `artifacts` ({label: path}) instead. Every runner, the eager `TorchRunner` first, is a feature source for
    `extract_features`; `evaluate_features` runs the same probes on the same split. One row per runner: its
    scores, `diff_<score>` = |score - PyTorch's|, `max_score_diff`, `feature_max_abs_diff` (CLS and patch tokens
    vs PyTorch's), `scores_match` (max_score_diff <= tolerance) and `parity_passed` (export gate; None for given
    artifacts and PyTorch). `patch_dtype` defaults to float32 so that only the runtime, not float16 storage of the
    patch tokens, can move the dense scores.
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
    runners = {REFERENCE_RUNNER: (TorchRunner(wrapper), f"torch:{module_sha256(wrapper)}")}
    runners.update({label: (open_runner(path), f"{label}:{artifact_sha256(path)}") for label, path in
                    artifacts.items()})
    scored = []
    for label, (runner, source_id) in runners.items():
        features = extract_features(runner, data, batch_size=batch_size, patch_dtype=patch_dtype,
                                    cache_dir=cache_dir, source_id=source_id)
        scores = evaluate_features(features, seed=seed)
        row = {"runner": label, **{name: scores.get(key) for key, name in _PROBE_COLUMNS.items()},
               "n_test": int(scores["n_test"])}
        scored.append((row, features))
    reference_row, reference = scored[0]
    return [_with_differences(row, features, reference_row, reference, tolerance, parity.get(row["runner"]))
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

@torch.no_grad()
def _student_row(method: str, run: DistillResult, teacher: Backbone, clean: Backbone | None, images: Tensor,
                 batch_size: int) -> dict[str, Any]:
    student, projectors, refiner = run.student, run.projectors, run.refiner
    device = _device(teacher)
    student.eval()
    acc = _Averages()
    for batch in images.split(batch_size):
        batch = batch.to(device)
        raw = teacher.forward_taps(batch, run.teacher_layers)
        clean_taps = clean.forward_taps(batch, run.teacher_layers) if clean is not None else {}
        taps = student.forward_taps(batch, sorted({*run.student_layers, student.depth - 1}))
        own = student.split(taps[student.depth - 1])[1]
        acc.add_metrics("", artifact_metrics(own), len(batch))
        for layer, s_layer in zip(run.teacher_layers, run.student_layers):
            raw_patches = teacher.split(raw[layer])[1]
            normal = ~high_norm_mask(raw_patches)
            projected = projectors.patches(layer, taps[s_layer])
            acc.add_metrics("proj_", artifact_metrics(projected), len(batch), suffix=f"@{layer}")
            acc.add_cosine(f"normal_cos_raw@{layer}", projected, raw_patches, normal)
            if layer in clean_taps:
                acc.add_cosine(f"normal_cos_clean@{layer}", projected, clean.split(clean_taps[layer])[1], normal)
            if refiner is not None:
                refined = refiner(layer, raw[layer])
                refined_patches = teacher.split(refined)[1]
                acc.add_metrics("target_", artifact_metrics(refined_patches), len(batch), suffix=f"@{layer}")
                acc.add_cosine(f"target_cos@{layer}", refined_patches, raw_patches, normal)
                if layer + 1 < teacher.depth:
                    after = teacher.split(teacher.run_blocks(refined, layer + 1, layer + 2))[1]
                    before = teacher.split(teacher.run_blocks(raw[layer], layer + 1, layer + 2))[1]
                    acc.add_cosine(f"target_next_cos@{layer}", after, before, normal)
    return {"method": method, "role": "student", "measured_at": f"student block {student.depth - 1}",
            **acc.values()}


@torch.no_grad()
def _teacher_row(name: str, source: Backbone, raw_teacher: Backbone, layers: Sequence[int], images: Tensor,
                 batch_size: int) -> dict[str, Any]:
    device = _device(raw_teacher)
    deepest = layers[-1]
    acc = _Averages()
    for batch in images.split(batch_size):
        batch = batch.to(device)
        taps = source.forward_taps(batch, layers)
        raw = raw_teacher.forward_taps(batch, layers) if source is not raw_teacher else taps
        acc.add_metrics("", artifact_metrics(source.split(taps[deepest])[1]), len(batch))
        for layer in layers:
            patches, raw_patches = source.split(taps[layer])[1], raw_teacher.split(raw[layer])[1]
            acc.add_metrics("", artifact_metrics(patches), len(batch), suffix=f"@{layer}")
            if source is not raw_teacher:
                acc.add_cosine(f"normal_cos_raw@{layer}", patches, raw_patches, ~high_norm_mask(raw_patches))
    return {"method": name, "role": "reference", "measured_at": f"teacher block {deepest}", **acc.values()}


class _Averages:
    """Running means: artifact metrics weighted by images (they are per-image means), cosines by normal tokens."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def _add(self, key: str, value: float, weight: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value * weight
        self._weights[key] = self._weights.get(key, 0.0) + weight

    def add_metrics(self, prefix: str, metrics: dict[str, float], images: int, suffix: str = "") -> None:
        names = {"hnr": f"hnr_{DEFAULT_K:g}", "e_out": "e_out"}  # r_max is dominated by single tokens; left out
        for key, name in names.items():
            self._add(f"{prefix}{name}{suffix}", metrics[key], images)

    def add_cosine(self, key: str, a: Tensor, b: Tensor, normal: Tensor) -> None:
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1)[normal]
        if cos.numel():
            self._add(key, cos.sum().item() / cos.numel(), cos.numel())

    def values(self) -> dict[str, float]:
        return {key: self._sums[key] / self._weights[key] for key in self._sums}


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
            return (2, int(layer), _LAYER_COLUMNS.index(base) if base in _LAYER_COLUMNS else len(_LAYER_COLUMNS))
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
