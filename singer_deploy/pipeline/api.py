"""`distill_and_export`: the one-call pipeline, and each of its stages callable alone.

    config -> teacher + student + data -> distill -> merge (refined teacher) -> export + parity + goldens
           -> bench -> artifact analysis -> report.html + manifest.json

The output directory explains itself: manifest.json (versions, hashes, config, timings, results), the student as a
timm folder with its model card (student/), refined-teacher adapters, exported artifacts, goldens, metrics.jsonl
and report.html.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from singer_deploy import __version__
from singer_deploy.config import (CPU_FORMATS, PLANTED, ExportSpec, ModelSpec, RunConfig, TrainConfig, calibrates,
                                  format_name, from_mapping, is_auto_precision, normalize_precision, with_changes)
from singer_deploy.devices import training_device
from singer_deploy.evaluation.analysis import JUDGED, ArtifactAnalysis, analyse_artifacts
from singer_deploy.evaluation.features import ImageData, as_image_data
from singer_deploy.evaluation.probe_table import probe_table
from singer_deploy.evaluation.scan import ScanResult, scan_teacher
from singer_deploy.io import atomic_save_safetensors, atomic_write_json
from singer_deploy.method.artifact_subspace import NO_CANDIDATES, describe_subspace, incomplete_note
from singer_deploy.method.refine import RefinedTeacher, Refiner
from singer_deploy.models.backbone import Backbone, load_backbone
from singer_deploy.models.data import (IMAGENET_MEAN, IMAGENET_STD, ImageFolder, SyntheticShapes, TeacherInput,
                                       default_crop_pct, image_transform, stack_images)
from singer_deploy.models.planted import PlantedTeacher
from singer_deploy.models.planted_training import planted_teacher
from singer_deploy.pipeline.preflight import (check_built, check_data_memory, check_probe_labels, check_settings,
                                              unprobeable)
from singer_deploy.pipeline.rundir import MANIFEST, check_out_dir, open_run_dir
from singer_deploy.pipeline.runconfig import load_run_config
from singer_deploy.reporting.model_card import write_model_card
from singer_deploy.reporting.scan_page import write_scan_page
from singer_deploy.train.loop import STUDENT_DIR, DistillResult, distill

if TYPE_CHECKING:
    from singer_deploy.export.pipeline import ExportResult
    from singer_deploy.export.runner import Runner

log = logging.getLogger(__name__)

EAGER = "pytorch/fp32"   # the benchmark's label for the eager PyTorch reference


@dataclass
class PipelineResult:
    out_dir: Path
    passed: bool
    summary: dict
    files: dict[str, Path] = field(default_factory=dict)
    parity: list[dict] = field(default_factory=list)
    latency: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Models:
    teacher: Backbone
    student: Backbone
    planted: PlantedTeacher | None


def distill_and_export(config: RunConfig | dict | str | Path | None = None, *, teacher: str | dict | None = None,
                       student: str | dict | None = None, data: str | dict | None = None,
                       out_dir: str | Path | None = None, layers: Sequence[int] | None = None,
                       formats: Sequence[str] | None = None, precision: str | None = None,
                       method: str | None = None, overwrite: bool = False, resume: bool = True,
                       progress: bool = True, **sections: Any) -> PipelineResult:
    """Distil, merge, export, check parity, write goldens, benchmark and report, in one call.

    `config` is a RunConfig, a dict, or a YAML path (default: the RunConfig defaults). The keywords override it:
    `teacher` / `student` take a timm name or a ModelSpec mapping, `data` an image folder, "synthetic" or a DataSpec
    mapping; `formats` / `precision` set the export section, `method` ("singer" or "fitnet") the training method;
    any other keyword replaces a whole top-level section (e.g. `train={...}`). With `formats=[]` the run stops after
    distillation, merge and the report.

    Everything (config, models, weights, data) is checked before any directory is touched (`prepare`). The run
    directory is locked for the whole run (pipeline/rundir.py). A finished run in out_dir is never overwritten
    silently: the run goes to a new numbered directory unless overwrite=True, which empties a directory this tool
    created and refuses any other. An unfinished run resumes if its checkpoint belongs to the same run (else a
    ConfigError names what changed); resume=False starts it over.
    """
    shortcuts = dict(teacher=teacher, student=student, data=data, out_dir=out_dir, layers=layers, formats=formats,
                     precision=precision, method=method)
    config = _resolve_config(config, shortcuts, sections)
    clock = time.perf_counter()
    models, train_data, eval_images, labelled = prepare(config)
    timings = {"setup_s": time.perf_counter() - clock}
    with open_run_dir(Path(config.out_dir), overwrite=overwrite) as run_dir:
        # After an overwrite there is nothing to resume (and under torchrun the other ranks must not read the old
        # checkpoint while rank 0 deletes it).
        return _run_in(run_dir, config, models, train_data, eval_images, labelled, timings,
                       resume=resume and not overwrite, progress=progress)


SCAN_JSON, SCAN_PAGE = "scan.json", "scan.html"
# Images per teacher pass in a scan: every block's tokens of a batch are held at once (ViT-L/14 at 224 px: ~25 MB
# per image).
SCAN_BATCH = 16
CONFIG_SUFFIXES = (".yaml", ".yml")


def scan(config: RunConfig | dict | str | Path | None = None, *, teacher: str | dict | None = None,
         data: str | dict | None = None, out_dir: str | Path | None = None, overwrite: bool = False,
         **sections: Any) -> ScanResult:
    """`singer-deploy scan`: where the teacher's artifacts are, before distilling (no training).

    `config` as for distill_and_export (a RunConfig, a dict, a YAML path), or a bare timm name (any string that is
    not an existing file and does not end in .yaml / .yml); it reads the teacher, data, singer.select_k and
    train.device / train.seed settings, and scans the held-out evaluation images (data.eval_n). Writes
    `out_dir`/scan.json and scan.html (default scans/<teacher name>), a directory taken as a run directory is
    (pipeline/rundir.py). Returns the ScanResult, its `files` set."""
    if isinstance(config, (str, Path)) and not is_config_file(config):
        config, teacher = None, teacher or str(config)
    config = _resolve_config(config, dict(teacher=teacher, student=None, data=data, out_dir=None, layers=None,
                                          formats=None, precision=None, method=None), sections)
    out = Path(out_dir) if out_dir is not None else Path("scans") / safe_name(config.teacher.name)
    check_out_dir(out)
    torch.manual_seed(config.train.seed)    # a teacher without weights is the same on every scan
    model, _ = build_teacher(config)
    _, eval_images = build_data(config, model, training=False)
    device = training_device(config.train.device)
    model = model.to(device).eval()
    with open_run_dir(out, overwrite=overwrite) as run_dir:
        batches = (batch.to(device) for batch in torch.from_numpy(eval_images).split(SCAN_BATCH))
        result = scan_teacher(model, batches, name=config.teacher.name, select_k=config.singer.select_k)
        settings = config.to_dict()
        facts = {**result.to_dict(), "config": {key: settings[key] for key in ("teacher", "data")},
                 "select_k": config.singer.select_k, "versions": environment()}
        result.files["json"] = atomic_write_json(run_dir / SCAN_JSON, facts)
        shown = result.shown_blocks()
        result.files["page"] = write_scan_page(
            run_dir / SCAN_PAGE, facts, norm_maps={b: result.norm_maps[b] for b in shown}, shown_blocks=shown,
            images=display_images(eval_images[:len(result.norm_maps[shown[0]])],
                                  display_normalisation(config, model)))
    return result


def is_config_file(source: str | Path) -> bool:
    return Path(source).is_file() or str(source).lower().endswith(CONFIG_SUFFIXES)


def safe_name(name: str) -> str:
    """A model name as one folder name (hf-hub:org/name -> hf-hub-org-name)."""
    return name.replace(":", "-").replace("/", "-").strip("-") or "teacher"


def prepare(config: RunConfig) -> tuple[Models, Dataset, np.ndarray, ImageData | None]:
    """Every check a run makes before it touches a directory; `singer-deploy check-config` runs exactly this.

    Returns the built models, the training data, the held-out evaluation images (B, 3, H, W) and, when the data
    carries labels (`carries_labels`), the same images with their labels (and masks) for the probes, else None.
    """
    check_settings(config)
    check_out_dir(Path(config.out_dir))
    models = build_models(config)
    train_data, held_out = build_datasets(config, models.teacher)
    # Read once: a labelled set's images are the evaluation images.
    labelled = as_image_data(held_out) if carries_labels(config) else None
    eval_images = labelled.images if labelled is not None else stack_images(held_out).numpy()
    check_built(config, models.teacher, models.student, len(eval_images))
    if labelled is not None and config.data.source != "synthetic":
        check_probe_labels(labelled.labels)   # asked for by data.labels: refused now, not after training
    return models, train_data, eval_images, labelled


def _run_in(out_dir: Path, config: RunConfig, models: Models, train_data: Dataset, eval_images: np.ndarray,
            labelled: ImageData | None, timings: dict[str, float], *, resume: bool,
            progress: bool) -> PipelineResult:
    """The pipeline after `prepare`, inside a taken run directory: distil, merge, export + bench, probes (labelled
    data), report, manifest."""
    with _timed(timings, "distill_s"):
        result = distill(models.teacher, models.student, train_data, out_dir, layers=config.layers,
                         singer=config.singer, train=config.train, resume=resume, progress=progress,
                         context=run_context(config))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        # Under torchrun only rank 0 merges, exports and reports; the other ranks only trained.
        return PipelineResult(out_dir, True, {"rank": torch.distributed.get_rank()}, dict(result.files))

    files = dict(result.files)
    refined = merge(models.teacher, result.refiner, out_dir) if result.refiner is not None else None
    if refined is not None:
        files["refined_teacher"] = out_dir / "refined_teacher.safetensors"
    exported, latency_rows = _export_and_bench(result, out_dir, eval_images, config, train_data, timings)
    parity_rows = exported.parity_rows() if exported is not None else []
    if exported is not None:
        files["export_manifest"] = exported.manifest_path

    analysis = analyse_artifacts(models.teacher, refined, result, torch.from_numpy(eval_images), models.planted)
    summary = _summary(analysis, exported, latency_rows, result, config)
    with _timed(timings, "probes_s"):
        summary["probes"] = probes(models, result, exported, labelled, config)
    data_record = _data_record(train_data, result)
    _note_skipped_images(summary, data_record)
    summary = {"verdict": _verdict(summary, analysis, exported, latency_rows), **summary}
    files["report"] = report(out_dir, config, analysis, parity_rows, latency_rows, summary, eval_images,
                             display_normalisation(config, models.teacher))
    files["model_card"] = write_model_card(out_dir / STUDENT_DIR, config=config.to_dict(), summary=summary,
                                           distill_config=json.loads(result.files["distill_config"].read_text()),
                                           parity=parity_rows, latency=latency_rows)
    passed = exported is None or exported.passed
    timings["total_s"] = sum(timings.values())
    files["manifest"] = _write_manifest(out_dir, config, models, result, files, {
        "timings": timings, "passed": passed, "summary": summary, "data": data_record,
        "artifact_metrics": analysis.rows, "parity": parity_rows, "latency": latency_rows})
    return PipelineResult(out_dir, passed, summary, files, parity_rows, latency_rows, timings)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """timings[key] = the wall seconds of the block."""
    clock = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - clock


def _export_and_bench(result: DistillResult, out_dir: Path, eval_images: np.ndarray, config: RunConfig,
                      train_data: Dataset, timings: dict[str, float]) -> tuple[ExportResult | None, list[dict]]:
    """The export stage (artifacts, parity, goldens) and its latency table; (None, []) when no format is asked."""
    if not config.export.formats:
        return None, []
    with _timed(timings, "export_s"):
        exported = export(result, out_dir / "export", eval_images, config, train_data)
    if not config.export.benchmark:
        return exported, []
    with _timed(timings, "bench_s"):
        latency_rows = [row for batch in config.export.batch_sizes for row in bench(
            exported.reference, exported.runners, eval_images, artifacts=exported.paths, batch=batch,
            build_seconds={key: record.seconds for key, record in exported.artifacts.items()},
            parity={key: record.parity.passed for key, record in exported.artifacts.items()
                    if record.parity is not None})]
    return exported, latency_rows


def _note_skipped_images(summary: dict, data_record: dict) -> None:
    """Image folders: how many listed files were unreadable (and the first one) goes into the summary, and a
    warning when any was."""
    if data_record:
        skipped = data_record["skipped_images"]
        summary["unreadable images skipped"] = f"{skipped['count']} of {data_record['listed']} files" + (
            f" (first: {next(iter(skipped['files']))})" if skipped["count"] else "")
        if skipped["count"]:
            _warn(summary, f"unreadable images: {summary['unreadable images skipped']} were skipped and replaced by "
                           "the next readable file (manifest.json, data.skipped_images)")


def _warn(summary: dict, warning: str) -> None:
    """Every warning of a run goes to summary["warnings"] (and so to the verdict, the CLI and the report)."""
    summary.setdefault("warnings", []).append(warning)


def _verdict(summary: dict, analysis: ArtifactAnalysis, exported: ExportResult | None,
             latency_rows: list[dict]) -> dict:
    """The run's verdict (reporting/verdict.py), from the summary's warnings and the run's own objects."""
    from singer_deploy.reporting.verdict import build_verdict

    parity = {} if exported is None else {key: rec.parity for key, rec in exported.artifacts.items()}
    decision = {} if exported is None else exported.notes.get("precision_decision") or {}
    return build_verdict(parity=parity, artifact_rows=analysis.rows, judged=JUDGED, remain_limit=analysis.limit,
                         shipped=None if exported is None else exported.shipped, decision=decision.get("table", []),
                         latency_rows=latency_rows, warnings=summary.get("warnings", []))


def _write_manifest(out_dir: Path, config: RunConfig, models: Models, result: DistillResult,
                    files: dict[str, Path], outcome: dict) -> Path:
    """manifest.json: versions, config, the teacher's input geometry (export-only runs rebuild the held-out images
    from it), `outcome` (timings, results, rows), files and their hashes, resume history and weights reports."""
    weights = {role: backbone.weights_report for role, backbone in (("teacher", models.teacher),
                                                                    ("student", models.student))
               if backbone.weights_report is not None}
    manifest = {"singer_deploy": __version__, "versions": environment(), "config": config.to_dict(),
                "teacher_input": TeacherInput.of(models.teacher).to_dict(), **outcome,
                "files": {k: str(v) for k, v in files.items()}, "config_history": result.config_history,
                "weights": weights, "hashes": {k: _sha256(v) for k, v in files.items() if Path(v).is_file()}}
    return atomic_write_json(out_dir / MANIFEST, manifest)


def _resolve_config(config, shortcuts: dict, sections: dict) -> RunConfig:
    """The config source with keyword overrides applied; every changed section is checked as it is built."""
    base = config if isinstance(config, RunConfig) else RunConfig() if config is None else load_run_config(config)
    changes = dict(sections)
    for role in ("teacher", "student"):
        if shortcuts[role] is not None:
            changes[role] = {"name": shortcuts[role]} if isinstance(shortcuts[role], str) else shortcuts[role]
    if shortcuts["data"] is not None:
        data = shortcuts["data"]
        changes["data"] = {"source": str(data)} if isinstance(data, (str, Path)) else data
    if shortcuts["out_dir"] is not None:
        changes["out_dir"] = str(shortcuts["out_dir"])
    if shortcuts["layers"] is not None:
        changes["layers"] = list(shortcuts["layers"])
    export = {key: shortcuts[key] for key in ("formats", "precision") if shortcuts[key] is not None}
    if export:
        section = from_mapping(ExportSpec, changes["export"], "export.") if "export" in changes else base.export
        changes["export"] = with_changes(section, "export.", **export)
    if shortcuts["method"] is not None:
        section = from_mapping(TrainConfig, changes["train"], "train.") if "train" in changes else base.train
        changes["train"] = with_changes(section, "train.", method=shortcuts["method"])
    return with_changes(base, **changes)


def run_context(config: RunConfig) -> dict:
    """What defines a run beyond the training loop's own settings, for the checkpoint's fingerprint
    (train/checkpoint.py). The teacher enters there by the hash of its weights, so its spec is left out here."""
    # Labels and masks only feed the probes after training: turning them on does not change the run.
    data = {key: value for key, value in asdict(config.data).items() if key not in ("labels", "masks")}
    return {"student": asdict(config.student), "data": data}


def build_models(config: RunConfig) -> Models:
    # The student first: it is cheap to build, so a wrong student name or kwargs fails before the teacher is built.
    # After the seed, a teacher without weights is reproducible too (a resumed run compares its hash).
    torch.manual_seed(config.train.seed)
    student = load_model(config.student)
    teacher, planted = build_teacher(config)
    return Models(teacher, student, planted)


def build_teacher(config: RunConfig) -> tuple[Backbone, PlantedTeacher | None]:
    """The teacher a config names, and the planted teacher behind it when it is the planted one (else None)."""
    if config.teacher.name == PLANTED:
        planted = planted_teacher(config.teacher.planted_config())   # trained when its training.steps > 0
        return planted.backbone, planted
    return load_model(config.teacher), None


def load_model(spec: ModelSpec) -> Backbone:
    """The timm model a ModelSpec names (the planted teacher is built by build_planted_teacher instead)."""
    return load_backbone(spec.name, weights=spec.weights, pretrained=spec.pretrained, **spec.kwargs)


def build_data(config: RunConfig, teacher: Backbone | TeacherInput, *, training: bool = True
               ) -> tuple[Dataset, np.ndarray]:
    """Training data set and a fixed batch of held-out, normalised evaluation images (B, 3, H, W) float32
    (`build_datasets`, the held-out images stacked)."""
    train, held_out = build_datasets(config, teacher, training=training)
    return train, stack_images(held_out).numpy()


def build_datasets(config: RunConfig, teacher: Backbone | TeacherInput, *, training: bool = True
                   ) -> tuple[Dataset, Dataset]:
    """Training data set and the held-out evaluation set, whose items carry "label" (and "fg_mask") when the data
    carries labels (`carries_labels`); training items never do.

    `teacher` is the built teacher or the TeacherInput a run's manifest recorded (export-only runs, which pass
    training=False). The data sets are opened lazily; `check_data_memory` refuses settings whose images cannot fit
    in memory before the held-out images are read."""
    spec = config.data
    if spec.source == "synthetic":
        size, patch = teacher.img_size[0], teacher.patch_size[0]
        train = SyntheticShapes(spec.n, size, patch, flat_share=spec.flat_share, seed=spec.seed)
        held_out = SyntheticShapes(spec.eval_n, size, patch, flat_share=spec.flat_share, seed=spec.seed + 1)
        check_data_memory(config, teacher.img_size, len(train), len(held_out), training=training)
        return train, held_out
    folder = ImageFolder(spec.source, labels=spec.labels, masks=spec.masks)
    crop_pct = spec.crop_pct if spec.crop_pct is not None else \
        default_crop_pct(folder, teacher.img_size, teacher.data_config()["crop_pct"])
    transform = teacher.data_config(crop_pct)   # the model's own input size, the teacher's mean/std
    training_images = folder.without_annotations().with_transform(image_transform(transform, training=spec.augment))
    folder = folder.with_transform(image_transform(transform, training=False))
    eval_n = min(spec.eval_n, max(len(folder) // 5, 1))
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(folder), generator=generator).tolist()
    held_out, train_idx = order[:eval_n], order[eval_n:] or order
    check_data_memory(config, teacher.img_size, len(train_idx), len(held_out), training=training)
    return torch.utils.data.Subset(training_images, train_idx), torch.utils.data.Subset(folder, held_out)


def carries_labels(config: RunConfig) -> bool:
    """The synthetic shapes always carry labels (and masks); an image folder when `data.labels` says so."""
    return config.data.source == "synthetic" or config.data.labels


NO_LABELS = ("the data carries no labels: set data.labels: true for a folder with one subfolder per class "
             "(docs/usage.md, \"Labelled folders\")")


def probes(models: Models, result: DistillResult, exported: ExportResult | None, labelled: ImageData | None,
           config: RunConfig) -> dict | str:
    """The probe table (evaluation/probe_table.py) on the held-out images: the raw teacher, the student and every
    exported artifact; NO_LABELS when the data carries none, or why the held-out synthetic shapes cannot be probed
    (too few: a folder's are checked by `prepare`). Dense: the synthetic shapes' class on the foreground, or a
    folder's own mask classes."""
    if labelled is None:
        return NO_LABELS
    problem = unprobeable(labelled.labels)
    if problem is not None:
        return f"too few held-out images for the probes ({problem}): raise data.eval_n"
    reused = {} if exported is None else {"reference": exported.reference, "runners": exported.runners}
    return probe_table(models.teacher, result.student, labelled, projector=result.projectors.last, **reused,
                       dense_target="class" if config.data.source == "synthetic" else "mask", seed=config.train.seed)


def _data_record(train_data: Dataset, result: DistillResult) -> dict:
    """For image folders: files listed, and the unreadable ones skipped wherever they were met (training on any
    rank or DataLoader worker, evaluation images); {} for the synthetic source."""
    listing = getattr(train_data, "dataset", train_data)
    if not isinstance(listing, ImageFolder):
        return {}
    files = {**listing.skipped, **result.skipped_images.get("files", {})}
    return {"source": str(listing.source), "listed": len(listing),
            "skipped_images": {"count": max(len(files), result.skipped_images.get("count", 0)),
                               "files": dict(list(files.items())[:20])}}


def merge(teacher: Backbone, refiner: Refiner, out_dir: Path) -> RefinedTeacher:
    """Fold the adapters into plain Linear layers: the refined teacher is an ordinary module, saved as safetensors."""
    refined = RefinedTeacher.from_refiner(teacher, refiner)
    atomic_save_safetensors(refined.refiners.state_dict(), out_dir / "refined_teacher.safetensors",
                            metadata={"layers": ",".join(map(str, refined.layers)), "stream": refined.stream})
    return refined


def export(result: DistillResult, out_dir: Path, eval_images: np.ndarray, config: RunConfig,
           train_data: Dataset) -> ExportResult:
    """Export the student (+ its last-layer projector into teacher space) with parity gates and goldens."""
    return export_model(result.student, result.projectors.last, out_dir, eval_images, train_data,
                        formats=config.export.formats, precision=config.export.precision,
                        calibration_size=config.export.calibration_size, target=config.export.target,
                        golden_size=config.export.golden_size, polygraphy_goldens=config.export.polygraphy_goldens,
                        batch_sizes=config.export.batch_sizes)


def export_model(student: Backbone, projector: nn.Module | None, out_dir: Path, eval_images: np.ndarray,
                 train_data: Dataset, *, formats: Sequence[str], precision: str, calibration_size: int,
                 target: str = "host", golden_size: int = 32, polygraphy_goldens: bool = False,
                 batch_sizes: Sequence[int] = (1,)) -> ExportResult:
    """export_student with calibration's converters for `target`: where the pipeline composes the two.

    INT8 calibrates on up to `calibration_size` training images, never on the parity (eval) images, so its gate is
    out of sample; the manifest records both sets by index and hash. Precision "auto" builds every native candidate,
    times each at every one of `batch_sizes` and ships the fastest passing one per format at the first
    (calibration/auto_export.py); an explicit INT8 also builds FP32
    beside it, so the run can warn when INT8 is the slower one here (`_precision_summary`).
    """
    from singer_deploy.calibration.auto_export import export_auto
    from singer_deploy.calibration.converters import export_converters
    from singer_deploy.calibration.holdout import calibration_from_training
    from singer_deploy.export.hardware import resolve_target
    from singer_deploy.export.pipeline import export_student

    auto = is_auto_precision(precision)
    held = calibration_from_training(train_data, eval_images, size=calibration_size) if calibrates(precision) else None
    calib = None if held is None else held.calibration.images
    goldens = {"golden_size": golden_size, "polygraphy_goldens": polygraphy_goldens}
    if auto:
        exported = export_auto(student.model, out_dir, formats, img_size=student.img_size, projector=projector,
                               parity_images=eval_images, calib_images=calib, target=target,
                               batch_sizes=batch_sizes, **goldens).result
    else:
        # A GPU format among them: the Q/DQ file feeds a TensorRT build, so it takes TensorRT's INT8 encoding.
        gpu_int8 = any(format_name(f) not in CPU_FORMATS for f in formats)
        # Explicit INT8 on CPU formats also builds FP32 beside it: the yardstick that says whether INT8 is faster.
        compare = held is not None and not gpu_int8
        exported = export_student(student.model, out_dir, formats, img_size=student.img_size, projector=projector,
                                  precision=("int8", "fp32") if compare else precision, calib_images=calib,
                                  parity_images=eval_images, converters=export_converters(target, gpu_int8=gpu_int8),
                                  **goldens)
        if compare:
            exported.shipped = {format_name(f): f"{format_name(f)}/int8" for f in formats}
        exported.notes["target"] = resolve_target(target).to_dict()
    if held is not None:
        exported.notes["calibration"] = held.to_dict()
    exported.write_manifest()
    return exported


def _explicit_int8(precision: str) -> bool:
    return not is_auto_precision(precision) and normalize_precision(precision) == "int8"


# Seconds of timed latency calls per benchmarked runner (half as much again for throughput) when no budget is given.
BENCH_BUDGET_S = 2.0


def bench(reference: Runner, runners: Mapping[str, Runner], eval_images: np.ndarray, *,
          artifacts: Mapping[str, Path] | None = None, build_seconds: Mapping[str, float] | None = None,
          batch: int = 1, iters: int | None = None, budget_s: float = BENCH_BUDGET_S,
          parity: Mapping[str, bool] | None = None) -> list[dict]:
    """Latency of each runner next to the eager PyTorch `reference` ("pytorch/fp32"), same inputs, same run.

    Pass the runners an export already opened (ExportResult.runners / .reference): they hold parity's settings.
    OpenVINO IRs are timed again at the plugin's deployment default ("<key>@default"); each row carries its parity
    result and the precision its runtime reports it executed. Each runner gets `budget_s` seconds of timed calls
    (`iters` fixes their number instead). Eager runs on the device the runtimes use (a copy on the GPU when one of
    them runs there), so the speed-ups compare like with like.
    """
    from singer_deploy.export.bench import add_ratios, benchmark_runners, eager_device, with_deployment_defaults
    from singer_deploy.export.runner import TorchRunner

    device = eager_device(dict(runners))
    if reference.device.type != device:
        reference = TorchRunner(copy.deepcopy(reference.module), device=device)
    rows = benchmark_runners(with_deployment_defaults({EAGER: reference, **runners}), eval_images, iters=iters,
                             budget_s=budget_s, artifacts=dict(artifacts or {}),
                             build_seconds=dict(build_seconds or {}), parity=dict(parity or {}), batch=batch)
    return add_ratios(rows, EAGER)


def display_normalisation(config: RunConfig,
                          teacher: Backbone | TeacherInput) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) the evaluation images were normalised with, to show them in their true colours."""
    if config.data.source == "synthetic":
        return IMAGENET_MEAN, IMAGENET_STD
    data_config = teacher.data_config()
    return data_config["mean"], data_config["std"]


def display_images(images: np.ndarray, normalisation: tuple[Sequence[float], Sequence[float]]) -> np.ndarray:
    """Normalised images (n, 3, H, W) back to displayable (n, H, W, 3) in 0..1."""
    mean, std = normalisation
    return np.clip(images.transpose(0, 2, 3, 1) * np.array(std) + np.array(mean), 0, 1)


def report(out_dir: Path, config: RunConfig, analysis: ArtifactAnalysis, parity_rows: list[dict],
           latency_rows: list[dict], summary: dict, eval_images: np.ndarray,
           normalisation: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD)) -> Path:
    from singer_deploy.reporting.report import ReportData, write_report

    shown = slice(0, 6)
    data = ReportData(
        title="singer-deploy run", verdict=summary.get("verdict"), summary=summary, config=config.to_dict(),
        versions=environment(), artifacts=analysis.rows,
        images=display_images(eval_images[shown], normalisation), norm_maps={k: v[shown] for k, v in analysis.norm_maps.items()},
        norm_histograms=analysis.norms, pca_tokens={k: v[shown] for k, v in analysis.tokens.items()},
        metrics=out_dir / "metrics.jsonl", parity=parity_rows, latency=latency_rows, probes=summary.get("probes"))
    return write_report(out_dir / "report.html", data)


def _with_estimate_notes(remain: dict, diagnostics: dict) -> dict:
    """Each layer's "artifacts remain" line, with why the subspace estimate is incomplete next to it."""
    subspaces = diagnostics.get("artifact_subspace", {})
    return {layer: line if (facts := subspaces.get(str(layer))) is None or facts["complete"]
            else f"{line}; {incomplete_note(facts)}" for layer, line in remain.items()}


def _summary(analysis: ArtifactAnalysis, exported: ExportResult | None, latency_rows: list[dict],
             result: DistillResult, config: RunConfig) -> dict:
    summary = {"method": "singer" if result.refiner is not None else "fitnet",
               "teacher_layers": result.teacher_layers, "student_layers": result.student_layers,
               "distill_seconds": round(result.seconds, 1)}
    # Every distilled layer, each source; and one line per layer on whether artifacts remain (not a parity verdict).
    summary["artifacts remain"] = _with_estimate_notes(analysis.remain, result.diagnostics)
    summary["artifacts"] = analysis.headline
    for warning in analysis.warnings:
        _warn(summary, warning)
    diagnostics = result.diagnostics
    if diagnostics:
        summary["nullspace k below tau"] = {layer: f"{d['k_below_tau']} ({d['rule']} rule, rank {d['rank']})"
                                            for layer, d in diagnostics["nullspace"].items()}
        summary["quantile trap"] = {layer: "FIRED" if d["fired"] else "no"
                                    for layer, d in diagnostics["quantile_trap"].items()} or \
            f"not applicable (outlier_target {config.singer.outlier_target})"
        for layer, d in diagnostics["quantile_trap"].items():
            if d["fired"]:
                _warn(summary, f"quantile trap at layer {layer}: {d['high_norm_share']:.1%} of the patch tokens are "
                               f"high-norm, more than 1 - alpha = {d['limit']:.1%}, so L_out's quantile target sits "
                               "inside the artifact cluster (docs/method.md, \"Traps\"; fix: leave out "
                               "`preset: published`)")
        if "artifact_subspace" in diagnostics:
            summary["artifact subspace"] = {
                layer: f"none found ({NO_CANDIDATES})" if d is None else describe_subspace(d)
                for layer, d in diagnostics["artifact_subspace"].items()}
            for layer, d in diagnostics["artifact_subspace"].items():
                if d is not None and not d["complete"]:
                    _warn(summary, f"layer {layer}: {incomplete_note(d)}")
    summary["parity"] = {} if exported is None else {
        key: ("pass" if rec.parity is not None and rec.parity.passed else "FAIL")
        for key, rec in exported.artifacts.items()}
    if exported is not None:
        precision = _precision_summary(exported, latency_rows, config)
        for warning in precision.pop("warnings", []):
            _warn(summary, warning)
        summary.update(precision)
    if latency_rows:
        summary["latency_p50_ms"] = {r["runner"]: f"{r['p50_ms']:.2f} ({r.get('realised_precision') or '?'})"
                                     for r in latency_rows}
    return summary


def _precision_summary(exported: ExportResult, latency_rows: list[dict], config: RunConfig) -> dict:
    """Target, shipped artifacts, the precision-auto decision table and the slower-INT8 warning, for the summary
    (and so the CLI and the report); each warning is also logged."""
    from singer_deploy.calibration.auto_precision import slower_int8_warnings

    out: dict = {"target": exported.notes.get("target", {}).get("isa", config.export.target)}
    if exported.shipped is not None:
        out["shipped"] = exported.shipped
    shipped = exported.artifacts if exported.shipped is None else exported.shipped.values()
    # How each shipped artifact was gated and timed, so a deployment runs it the same way (OpenVINO's hint).
    out["runner options"] = {key: ", ".join(f"{k}={v}" for k, v in exported.artifacts[key].runner_options.items())
                             for key in shipped if exported.artifacts[key].runner_options}
    decision = exported.notes.get("precision_decision")
    if decision:
        out["precision auto"] = {row["key"]: ("SHIPPED: " if row["chosen"] else "not chosen: ") + row["reason"]
                                 for row in decision["table"]}
        if decision.get("ranking_lines"):
            out["precision auto ranking"] = decision["ranking_lines"]
    if "calibration" in exported.notes:
        calib = exported.notes["calibration"]
        out["int8 calibration"] = (f"{calib['size']} training images, {calib['overlap_with_parity']} shared with the "
                                   f"{calib['parity_images']} parity images")
    if _explicit_int8(config.export.precision):
        warnings = slower_int8_warnings(latency_rows) if latency_rows else \
            ["INT8 was not benchmarked (export.benchmark is off): whether it is faster than FP32 here is unknown"]
        for warning in warnings:
            log.warning(warning)
            _warn(out, warning)
    return out


def environment() -> dict:
    """The golden bundles' environment fingerprint plus the training-side packages (one definition of "versions")."""
    from singer_deploy.export.golden import environment_fingerprint, package_version

    cuda = torch.cuda.is_available()
    return {**environment_fingerprint("cuda" if cuda else "cpu"), "cuda": cuda,
            **{name: package_version(name) for name in ("peft", "nncf")}}


def _sha256(path) -> str:
    from singer_deploy.export.golden import artifact_sha256
    return artifact_sha256(path)
