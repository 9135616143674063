"""Export-only workflows: reopen a finished run directory (its config, distilled student and projector) to export
or benchmark it again, without building the teacher (the manifest records what the data needs of it), or export any
timm ViT as it is (name + local weights) without distilling."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from singer_deploy.config import RunConfig, check_batch_sizes
from singer_deploy.errors import ConfigError
from singer_deploy.method.alignment import last_projector, load_projectors
from singer_deploy.models.backbone import Backbone
from singer_deploy.models.data import TeacherInput
from singer_deploy.models.hub import WEIGHTS_NAME
from singer_deploy.pipeline.api import BENCH_BUDGET_S, bench, build_data, build_models, export_model, load_model
from singer_deploy.pipeline.rundir import MANIFEST
from singer_deploy.pipeline.runconfig import load_run_config
from singer_deploy.train.loop import STUDENT_DIR

if TYPE_CHECKING:
    from singer_deploy.export.pipeline import ExportResult

log = logging.getLogger(__name__)


def load_run(run_dir: Path) -> tuple[RunConfig, Backbone, nn.Module, np.ndarray, Dataset]:
    """(config, student Backbone with trained weights, last-layer projector, held-out evaluation images, training
    data)."""
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError("Not a finished run directory", expected=f"{manifest_path} (written at the end of a run)",
                          found="no manifest.json", fix="point at the out_dir of a completed `run` or `demo`")
    manifest = json.loads(manifest_path.read_text())
    config = load_run_config(manifest["config"])
    student = load_model(config.student)
    student.model.load_state_dict(load_file(str(run_dir / STUDENT_DIR / WEIGHTS_NAME)))
    projector = last_projector(load_projectors(load_file(str(run_dir / "projectors.safetensors"))))
    train_data, eval_images = build_data(config, _teacher_input(manifest, config))
    return config, student.eval(), projector.eval(), eval_images, train_data


def _teacher_input(manifest: dict, config: RunConfig) -> TeacherInput:
    if "teacher_input" in manifest:
        return TeacherInput.from_dict(manifest["teacher_input"])
    # Runs written before the manifest recorded it: the teacher's geometry comes from the teacher itself.
    log.warning("manifest.json has no teacher_input (an older run): building the teacher to read its input size")
    return TeacherInput.of(build_models(config).teacher)


def export_run(run_dir: Path, formats: Sequence[str], precision: str, out_dir: Path | None = None,
               target: str | None = None, batch_sizes: Sequence[int] | None = None) -> ExportResult:
    """Export a finished run's student (+ last-layer projector) with parity on its held-out images, INT8
    calibrated on its training images, for `target` and `batch_sizes` (default: the run config's export.target and
    export.batch_sizes)."""
    if batch_sizes is not None:
        check_batch_sizes(batch_sizes)
    config, student, projector, eval_images, train_data = load_run(run_dir)
    return export_model(student, projector, out_dir or run_dir / f"export-{precision}", eval_images, train_data,
                        formats=formats, precision=precision, calibration_size=config.export.calibration_size,
                        target=target or config.export.target, golden_size=config.export.golden_size,
                        polygraphy_goldens=config.export.polygraphy_goldens,
                        batch_sizes=batch_sizes or config.export.batch_sizes)


def export_timm_model(config: RunConfig, out_dir: Path) -> ExportResult:
    """Export `config.student` as it is (any timm ViT name + optional local weights, or a hf-hub: / local-dir:
    name): no distillation, no projector. Parity and goldens use `config.data`'s held-out images (synthetic shapes
    unless data.source names an image folder)."""
    student = load_model(config.student)
    train_data, eval_images = build_data(config, student)
    return export_model(student, None, out_dir, eval_images, train_data, formats=config.export.formats,
                        precision=config.export.precision, calibration_size=config.export.calibration_size,
                        target=config.export.target, golden_size=config.export.golden_size,
                        polygraphy_goldens=config.export.polygraphy_goldens, batch_sizes=config.export.batch_sizes)


def bench_run(run_dir: Path, *, formats: Sequence[str] | None = None, batch_sizes: Sequence[int] = (1,),
              threads: int | None = None, time_budget_s: float | None = None) -> list[dict]:
    """Benchmark the artifacts a run exported (listed in export/export_manifest.json) next to eager PyTorch.

    formats: only these formats' artifacts; batch_sizes: one latency table per batch size; threads: intra-op
    threads of PyTorch, ONNX Runtime and OpenVINO; time_budget_s: timed calls per runner chosen so the whole
    benchmark takes about this long (estimated from each runner's warm-up calls; at least 10 calls each; default
    BENCH_BUDGET_S per runner). Rows carry each artifact's parity result from the export manifest.
    """
    import torch

    from singer_deploy.export.bench import tile_batch
    from singer_deploy.config import format_name
    from singer_deploy.export.formats import format_for_path
    from singer_deploy.export.golden import open_runner
    from singer_deploy.export.pipeline import MANIFEST_NAME
    from singer_deploy.export.runner import TorchRunner

    listing = run_dir / "export" / MANIFEST_NAME
    if not listing.is_file():
        raise ConfigError("The run has no exported artifacts", expected=str(listing), found="no export manifest",
                          fix="run `singer-deploy export RUN_DIR` first")
    exported = json.loads(listing.read_text())["artifacts"]
    parity = {key: a["parity"]["passed"] for key, a in exported.items() if a.get("parity")}
    artifacts = {key: Path(a["path"]) for key, a in exported.items()}
    options = {key: a.get("runner_options") or {} for key, a in exported.items()}   # e.g. OpenVINO's precision hint
    if formats:
        wanted = {format_name(name) for name in formats}
        artifacts = {key: path for key, path in artifacts.items() if format_for_path(path).name in wanted}
        if not artifacts:
            raise ConfigError("The run exported none of the requested formats", expected=", ".join(sorted(wanted)),
                              found=", ".join(exported),
                              fix="drop --formats or export those formats first")
    if threads:
        torch.set_num_threads(threads)
    _, student, projector, eval_images, _ = load_run(run_dir)
    reference = TorchRunner(student.model.eval(), projector=projector)
    runners = {key: open_runner(path, **options[key], **({"num_threads": threads} if threads and
                                                         format_for_path(path).name in ("onnx", "openvino") else {}))
               for key, path in artifacts.items()}
    rows = []
    for batch in batch_sizes:
        images = tile_batch(eval_images, batch)
        # Each timed row (eager, every artifact, OpenVINO IRs once more at their default hint) gets its share of
        # the whole budget; benchmark_runners spends a runner's budget on latency and half as much on throughput.
        timed_rows = 1 + len(runners) + sum(format_for_path(path).name == "openvino" for path in artifacts.values())
        budget_s = time_budget_s / len(batch_sizes) / timed_rows / 1.5 if time_budget_s else BENCH_BUDGET_S
        log.info("bench: batch %d, %.2f s of timed calls per runner", batch, budget_s)
        rows += bench(reference, runners, images, artifacts=artifacts, batch=batch, budget_s=budget_s,
                      parity=parity)
    return rows
