"""Export-only workflows: reopen a finished run directory (its config, distilled student and projector) to export
or benchmark it again, without building the teacher (the manifest records what the data needs of it), or export any
timm ViT as it is (name + local weights) without distilling."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from singer_deploy.config import RunConfig
from singer_deploy.errors import ConfigError, ModelError, SingerDeployError, shown_path, whole_sentences
from singer_deploy.memory import Need, check_fits
from singer_deploy.method.alignment import last_projector, load_projectors
from singer_deploy.models.backbone import Backbone
from singer_deploy.models.data import TeacherInput
from singer_deploy.models.hub import WEIGHTS_NAME
from singer_deploy.models.weights import check_weights_file, read_state_dict
from singer_deploy.pipeline.api import BENCH_BUDGET_S, bench, build_data, build_models, export_model, load_model
from singer_deploy.pipeline.overrides import apply_overrides, parse_override
from singer_deploy.pipeline.rundir import MANIFEST, MARKER
from singer_deploy.pipeline.runconfig import load_run_config
from singer_deploy.train.loop import CHECKPOINT, STUDENT_DIR

if TYPE_CHECKING:
    from singer_deploy.export.pipeline import ExportResult

log = logging.getLogger(__name__)


# What `singer-deploy export RUN_DIR` builds unless told otherwise, whatever the run itself exported (a distill-only
# run exported nothing).
EXPORT_DEFAULTS = {"formats": ["onnx", "openvino"], "precision": "fp32"}


def load_run(run_dir: Path, overrides: Sequence[str] = (), **export: Any
             ) -> tuple[RunConfig, Backbone, nn.Module, np.ndarray, Dataset]:
    """(config, student Backbone with trained weights, last-layer projector, held-out evaluation images, training
    data). `overrides` (KEY=VALUE, export.* keys only) and then `export` (formats=, precision=, target=) change the
    run config's export section; the rest of the config is the run's own (its student, its images)."""
    overrides = _export_only(overrides, run_dir)
    manifest = read_run_manifest(run_dir)
    config = load_run_config(export_settings(manifest["config"], overrides, export))
    student = load_model(config.student)
    weights, projectors = run_dir / STUDENT_DIR / WEIGHTS_NAME, run_dir / "projectors.safetensors"
    try:
        student.model.load_state_dict(read_state_dict(check_weights_file(weights)))
        projector = last_projector(load_projectors(read_state_dict(check_weights_file(projectors))))
    except (RuntimeError, KeyError, ValueError) as err:
        if isinstance(err, SingerDeployError):
            raise
        raise ModelError(f"The run's weights do not fit its config ({run_dir})", expected=f"{weights} and "
                         f"{projectors.name} as the run wrote them", found=f"{type(err).__name__}: "
                         f"{whole_sentences(str(err))}", fix="export an intact run directory, or run it again "
                         "with --overwrite") from err
    train_data, eval_images = build_data(config, _teacher_input(manifest, config), training=False)
    return config, student.eval(), projector.eval(), eval_images, train_data


def read_run_manifest(run_dir: Path) -> dict:
    """A finished run's manifest.json; a ConfigError that says what the directory is otherwise: an unfinished run
    (and how to finish it), a directory no run wrote, or a manifest that is not a run's."""
    path = run_dir / MANIFEST
    if not path.is_file():
        if (run_dir / MARKER).is_file():
            checkpoint = " and a checkpoint" if (run_dir / CHECKPOINT).is_file() else ""
            raise ConfigError(f"{run_dir} holds an unfinished run", expected="a finished run (its manifest.json is "
                              "written last)", found=f"a run marker{checkpoint}, no manifest.json",
                              fix=f"run the same `singer-deploy run CONFIG --out-dir {run_dir}` command again: it "
                              "resumes where the run stopped and finishes it; then export it")
        raise ConfigError(f"{shown_path(run_dir)} is not a run directory", expected="the out_dir of a finished "
                          "`run` or `demo` (with its manifest.json), or a timm model name",
                          found="a directory without manifest.json or run marker",
                          fix="point at a finished run's out_dir; a timm model folder is local-dir:PATH")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not a run manifest", expected="the JSON a finished run writes",
                          found=f"{type(err).__name__}: {whole_sentences(str(err))}",
                          fix="point at a finished run's out_dir, or run it again with --overwrite") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        found = f"a JSON {type(manifest).__name__}" if not isinstance(manifest, dict) else \
            f"no 'config' mapping (keys: {', '.join(map(str, manifest)) or 'none'})"
        raise ConfigError(f"{path} is not a run manifest", expected="the manifest.json a finished run writes, with "
                          "its config", found=found, fix="point at the out_dir of a finished `run` or `demo`")
    return manifest


def export_settings(raw: dict, overrides: Sequence[str], export: Mapping[str, Any]) -> dict:
    """`raw` (a config mapping) with EXPORT_DEFAULTS in its export section, then the KEY=VALUE overrides, then the
    `export` values given (the CLI's --formats, --precision, --target win over overrides)."""
    section = raw.get("export", {})
    raw = {**raw, "export": {**section, **EXPORT_DEFAULTS}} if isinstance(section, dict) else raw
    raw = apply_overrides(raw, overrides)
    given = {key: value for key, value in export.items() if value is not None}
    if given and isinstance(raw.get("export"), dict):   # not a mapping: load_run_config says so with the key
        raw["export"].update(given)
    return raw


def _export_only(overrides: Sequence[str], run_dir: Path) -> Sequence[str]:
    """The overrides of an export-only run: export.* keys only (the student and its images are the run's)."""
    for item in overrides:
        path, _ = parse_override(item)
        if path[0] != "export":
            raise ConfigError(f"{item}: only export settings change when exporting a run",
                              expected="export.KEY=VALUE (e.g. export.polygraphy_goldens=true)", found=item,
                              fix=f"a run directory exports its own student on its own images; to change "
                              f"{'.'.join(path)}, run again with it ({run_dir})")
    return overrides


def _teacher_input(manifest: dict, config: RunConfig) -> TeacherInput:
    if "teacher_input" in manifest:
        return TeacherInput.from_dict(manifest["teacher_input"])
    # Runs written before the manifest recorded it: the teacher's geometry comes from the teacher itself.
    log.warning("manifest.json has no teacher_input (an older run): building the teacher to read its input size")
    return TeacherInput.of(build_models(config).teacher)


def export_run(run_dir: Path, formats: Sequence[str] | None = None, precision: str | None = None,
               out_dir: Path | None = None, target: str | None = None, batch_sizes: Sequence[int] | None = None,
               overrides: Sequence[str] = ()) -> ExportResult:
    """Export a finished run's student (+ last-layer projector) with parity on its held-out images, INT8
    calibrated on its training images. Formats and precision default to EXPORT_DEFAULTS, target and batch sizes
    to the run config's; `overrides` are KEY=VALUE items on the export section (e.g.
    export.polygraphy_goldens=true), and formats / precision / target / batch_sizes, when given, win over them."""
    config, student, projector, eval_images, train_data = load_run(run_dir, overrides, formats=formats,
                                                                   precision=precision, target=target,
                                                                   batch_sizes=batch_sizes)
    spec = config.export
    return export_model(student, projector, out_dir or run_dir / f"export-{spec.precision}", eval_images,
                        train_data, formats=spec.formats, precision=spec.precision,
                        calibration_size=spec.calibration_size, target=spec.target, golden_size=spec.golden_size,
                        polygraphy_goldens=spec.polygraphy_goldens, batch_sizes=spec.batch_sizes)


def export_timm_model(config: RunConfig, out_dir: Path) -> ExportResult:
    """Export `config.student` as it is (any timm ViT name + optional local weights, or a hf-hub: / local-dir:
    name): no distillation, no projector. Parity and goldens use `config.data`'s held-out images (synthetic shapes
    unless data.source names an image folder)."""
    student = load_model(config.student)
    train_data, eval_images = build_data(config, student, training=False)
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
    exported = _exported_artifacts(listing)
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
    largest = max(batch_sizes)   # (tile_batch refuses sizes below 1, with the flag's name)
    shape = "x".join(map(str, eval_images.shape[1:]))
    check_fits([Need("--batch-sizes", f"a timed batch of {largest} images of {shape} float32",
                     largest * eval_images[0].nbytes)], "The benchmark")
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


def _exported_artifacts(listing: Path) -> dict[str, dict]:
    """The `artifacts` table of an export manifest; a ConfigError when the file is not one an export wrote."""
    try:
        artifacts = json.loads(listing.read_text(encoding="utf-8"))["artifacts"]
        if all(isinstance(a["path"], str) and "passed" in (a.get("parity") or {"passed": None})
               and isinstance(a.get("parity") or {}, dict) for a in artifacts.values()):
            return artifacts
        found = "an artifact entry without a path or parity record"
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        found = f"{type(err).__name__}: {whole_sentences(str(err))}"
    raise ConfigError(f"{listing} is not an export manifest", expected="the export_manifest.json an export "
                      "writes (an 'artifacts' table with each artifact's path and parity)", found=found,
                      fix="export the run again: `singer-deploy export RUN_DIR`")
