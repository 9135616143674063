"""Reopen a finished run directory: its config, distilled student and projector, for export-only workflows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from safetensors.torch import load_file
from torch import nn

from singer_deploy.errors import ConfigError
from singer_deploy.method.alignment import last_projector, load_projectors
from singer_deploy.models.backbone import Backbone
from singer_deploy.models.hub import WEIGHTS_NAME
from singer_deploy.pipeline.api import MANIFEST, bench, build_data, build_models, export_model
from singer_deploy.pipeline.runconfig import RunConfig, load_run_config
from singer_deploy.train.loop import STUDENT_DIR

if TYPE_CHECKING:
    from singer_deploy.export.pipeline import ExportResult


def load_run(run_dir: Path) -> tuple[RunConfig, Backbone, nn.Module, np.ndarray]:
    """(config, student Backbone with trained weights, last-layer projector, held-out evaluation images)."""
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError("Not a finished run directory", expected=f"{manifest_path} (written at the end of a run)",
                          found="no manifest.json", fix="point at the out_dir of a completed `run` or `demo`")
    config = load_run_config(json.loads(manifest_path.read_text())["config"])
    models = build_models(config)
    models.student.model.load_state_dict(load_file(str(run_dir / STUDENT_DIR / WEIGHTS_NAME)))
    projector = last_projector(load_projectors(load_file(str(run_dir / "projectors.safetensors"))))
    _, eval_images = build_data(config, models.teacher)
    return config, models.student.eval(), projector.eval(), eval_images


def export_run(run_dir: Path, formats: Sequence[str], precision: str, out_dir: Path | None = None) -> ExportResult:
    """Export a finished run's student (+ last-layer projector) with parity on its held-out images."""
    config, student, projector, eval_images = load_run(run_dir)
    return export_model(student, projector, out_dir or run_dir / f"export-{precision}", eval_images,
                        formats=formats, precision=precision, calibration_size=config.export.calibration_size,
                        golden_size=config.export.golden_size, polygraphy_goldens=config.export.polygraphy_goldens)


def bench_run(run_dir: Path) -> list[dict]:
    """Benchmark the artifacts a run exported (listed in export/export_manifest.json) next to eager PyTorch."""
    from singer_deploy.export.golden import open_runner
    from singer_deploy.export.pipeline import MANIFEST_NAME
    from singer_deploy.export.runner import TorchRunner

    listing = run_dir / "export" / MANIFEST_NAME
    if not listing.is_file():
        raise ConfigError("The run has no exported artifacts", expected=str(listing), found="no export manifest",
                          fix="run `singer-deploy export RUN_DIR` first")
    _, student, projector, eval_images = load_run(run_dir)
    artifacts = {key: Path(a["path"]) for key, a in json.loads(listing.read_text())["artifacts"].items()}
    return bench(TorchRunner(student.model.eval(), projector=projector),
                 {key: open_runner(path) for key, path in artifacts.items()}, eval_images, artifacts=artifacts)
