"""Golden regression bundles: fixed inputs + reference outputs + the parity policy + hashes + environment.

A bundle lets anyone re-check an artifact later ("my engine still matches" after a runtime upgrade or a rebuild):
`verify(artifact, bundle_dir)` runs the artifact on the stored inputs, gates it with the stored policy and lists
what changed in the environment. Layout: `<bundle>/manifest.json` plus the arrays (inputs and eager-PyTorch
outputs) it names by relative path and sha256: either its own `<bundle>/golden.npz`, or, as export_student writes
them, one reference set shared by every artifact of an export (`goldens/reference/golden.npz`, see
`write_reference`), so a run stores the images and outputs once, not once per artifact. Files are written to a
temporary file and moved into place, manifest last, so a crash never leaves a half-written bundle that loads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from singer_deploy.errors import DataError, ExportError
from singer_deploy.export.formats import format_for_path
from singer_deploy.export.hardware import host_capabilities
from singer_deploy.config import ParityPolicy
from singer_deploy.export.parity import ParityReport, compare_outputs
from singer_deploy.export.runner import Runner
from singer_deploy.hashing import module_sha256
from singer_deploy.io import atomic_write_bytes, atomic_write_json

MANIFEST_NAME = "manifest.json"
ARRAYS_NAME = "golden.npz"
SCHEMA_VERSION = 2             # 2: manifest["arrays"] names the arrays file (shared reference sets)
REFERENCE_DIR = "reference"
REFERENCE_MANIFEST = "reference.json"
_INPUT_KEY = "input"
_OUTPUT_PREFIX = "output/"
_PACKAGES = ("numpy", "torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt",
             "torch-tensorrt", "singer-deploy")


def package_version(name: str) -> str | None:
    """Installed version of a distribution (pip name), or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_fingerprint(device: str = "cpu") -> dict:
    """What produced / ran the numbers: interpreter, platform, CPU capabilities (INT8 / BF16 kernels), runtime
    versions, device."""
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "cpu_capabilities": host_capabilities().to_dict(), "device": device,
            **{pkg: package_version(pkg) for pkg in _PACKAGES}}


def artifact_sha256(path: str | Path) -> str:
    """Hash of an artifact; an OpenVINO IR is its .xml and .bin together."""
    path = Path(path)
    digest = hashlib.sha256()
    parts = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    for part in parts:
        if part.is_file():
            with part.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


@dataclass
class GoldenBundle:
    inputs: np.ndarray
    outputs: dict[str, np.ndarray]
    policy: ParityPolicy
    manifest: dict


def write_reference(reference_dir: str | Path, *, inputs: np.ndarray, reference_outputs: dict[str, np.ndarray],
                    model: nn.Module | None = None) -> Path:
    """Write the arrays several bundles share (`golden.npz` + `reference.json`); returns the arrays file."""
    if not isinstance(inputs, np.ndarray) or inputs.dtype != np.float32 or inputs.ndim != 4:
        raise DataError("Golden inputs must be one float32 image batch", expected="float32 array (B, C, H, W)",
                        found=f"{type(inputs).__name__} {getattr(inputs, 'dtype', '')} "
                              f"{getattr(inputs, 'shape', '')}", fix="pass the parity images as float32")
    reference_dir = Path(reference_dir)
    arrays = {_INPUT_KEY: inputs, **{_OUTPUT_PREFIX + k: np.asarray(v, np.float32)
                                     for k, v in reference_outputs.items()}}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = atomic_write_bytes(reference_dir / ARRAYS_NAME, buffer.getvalue())
    summary = {"schema": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "inputs": {"shape": list(inputs.shape), "dtype": "float32"},
               "outputs": {k: list(np.shape(v)) for k, v in reference_outputs.items()},
               "arrays_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "bytes": len(buffer.getvalue()),
               "model_sha256": None if model is None else module_sha256(model)}
    atomic_write_bytes(reference_dir / REFERENCE_MANIFEST, json.dumps(summary, indent=2).encode())
    return path


def write_golden(bundle_dir: str | Path, *, policy: ParityPolicy, reference: str | Path | None = None,
                 inputs: np.ndarray | None = None, reference_outputs: dict[str, np.ndarray] | None = None,
                 artifact_path: str | Path | None = None, model: nn.Module | None = None, device: str = "cpu",
                 extra: dict | None = None) -> Path:
    """Write a bundle; returns its directory. Either `reference` (an arrays file from write_reference, shared) or
    `inputs` + `reference_outputs` (eager PyTorch outputs on `inputs`, stored in the bundle itself)."""
    bundle_dir = Path(bundle_dir)
    if reference is None:
        if inputs is None or reference_outputs is None:
            raise DataError("A golden bundle needs its arrays", expected="reference=PATH or inputs + "
                            "reference_outputs", found="neither", fix="pass the parity images and their outputs")
        reference = write_reference(bundle_dir, inputs=inputs, reference_outputs=reference_outputs)
    reference = Path(reference)
    shapes = _array_shapes(reference)
    manifest = {
        "schema": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "precision": policy.precision, "policy": policy.to_dict(),
        "arrays": os.path.relpath(reference, bundle_dir),
        "inputs": {"shape": shapes.pop(_INPUT_KEY), "dtype": "float32"},
        "outputs": {k[len(_OUTPUT_PREFIX):]: v for k, v in shapes.items()},
        "arrays_sha256": hashlib.sha256(reference.read_bytes()).hexdigest(),
        "artifact": None if artifact_path is None else {"name": Path(artifact_path).name,
                                                        "sha256": artifact_sha256(artifact_path)},
        "model_sha256": None if model is None else module_sha256(model),
        "environment": environment_fingerprint(device), **(extra or {}),
    }
    atomic_write_json(bundle_dir / MANIFEST_NAME, manifest)
    return bundle_dir


def _array_shapes(arrays_path: Path) -> dict[str, list[int]]:
    with np.load(arrays_path) as arrays:
        return {key: list(arrays[key].shape) for key in arrays.files}


def load_golden(bundle_dir: str | Path) -> GoldenBundle:
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ExportError("Not a golden bundle", expected=f"{MANIFEST_NAME} in the directory", found=str(bundle_dir),
                          fix="create it with write_golden (export_student writes one)")
    manifest, policy = _read_manifest(manifest_path)
    arrays_path = bundle_dir / manifest.get("arrays", ARRAYS_NAME)
    if not arrays_path.is_file():
        raise ExportError("Not a golden bundle", expected=f"the arrays file its manifest names "
                          f"(default {ARRAYS_NAME}) in the directory", found=str(bundle_dir),
                          fix="create it with write_golden (export_student writes one); copy a run's goldens/ "
                              "folder whole, bundles share its reference/ arrays")
    data = arrays_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("arrays_sha256"):
        raise ExportError("The golden arrays do not match their manifest", expected=manifest.get("arrays_sha256"),
                          found=f"a different {arrays_path.name}", fix="restore the bundle from version control")
    with np.load(io.BytesIO(data)) as arrays:
        inputs = arrays[_INPUT_KEY]
        outputs = {k[len(_OUTPUT_PREFIX):]: arrays[k] for k in arrays.files if k.startswith(_OUTPUT_PREFIX)}
    return GoldenBundle(inputs, outputs, policy, manifest)


def _read_manifest(path: Path) -> tuple[dict, ParityPolicy]:
    """A bundle manifest and its policy, or a DataError saying what is wrong with it (a corrupt bundle is bad input, not a bug)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"The golden manifest {path} is not valid JSON", expected="the JSON write_golden wrote",
                        found=f"{type(err).__name__}: {err}"[:200], fix="restore the bundle from version control, "
                        "or write it again with `singer-deploy export`") from err
    missing = [key for key in ("policy", "arrays_sha256") if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise DataError(f"The golden manifest {path} is incomplete", expected="the keys policy and arrays_sha256",
                        found=f"missing {', '.join(missing)}", fix="restore the bundle from version control, or "
                        "write it again with `singer-deploy export`")
    try:
        return manifest, ParityPolicy.from_dict(manifest["policy"])
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise DataError(f"The golden manifest {path} holds an unreadable parity policy", expected="the policy "
                        "write_golden recorded", found=f"{type(err).__name__}: {err}"[:200],
                        fix="restore the bundle from version control") from err


def environment_diff(before: dict, after: dict) -> dict:
    """Keys whose value differs between two fingerprints: {key: {"golden": old, "now": new}}."""
    return {k: {"golden": before.get(k), "now": after.get(k)} for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


def runner_device(runner: Runner) -> str:
    """The device string a bundle records: ONNX Runtime's execution provider, otherwise the runner's device."""
    return str(runner.info.get("provider") or runner.info.get("device") or "cpu")


def open_runner(artifact_path: str | Path, **options) -> Runner:
    """The runner of an artifact's format, chosen by file suffix."""
    return format_for_path(artifact_path).runner_class()(artifact_path, **options)


def recorded_runner_options(bundle: GoldenBundle, artifact_path: str | Path) -> dict:
    """The runner options a bundle was gated with, when the artifact is of the format the bundle was written for
    (bundles written before they recorded options: none, the runner's parity defaults)."""
    recorded_format = str(bundle.manifest.get("artifact_key", "")).partition("/")[0]
    if recorded_format != format_for_path(artifact_path).name:
        return {}
    return dict(bundle.manifest.get("runner_options") or {})


def verify(artifact_path: str | Path, bundle_dir: str | Path, *, runner: Runner | None = None,
           **runner_options) -> ParityReport:
    """Run the artifact on the bundle's inputs and gate it with the bundle's policy.

    The report's notes list environment differences and whether the artifact bytes changed since the bundle
    was written; they do not fail the check by themselves (the numbers do). The artifact runs with the runner
    options its bundle recorded (an OpenVINO IR at the inference precision hint it was gated with) unless
    `runner_options` name others.
    """
    bundle = load_golden(bundle_dir)
    runner = (runner or open_runner(artifact_path, **{**recorded_runner_options(bundle, artifact_path),
                                                      **runner_options})).load()
    outputs = runner.run(bundle.inputs)
    report = compare_outputs(bundle.outputs, outputs, bundle.policy.precision, bundle.policy,
                             reference_name=f"golden:{Path(bundle_dir).name}",
                             candidate_name=f"{runner.name}:{Path(artifact_path).name}")
    device = runner_device(runner)
    recorded = bundle.manifest.get("artifact") or {}
    report.notes = {
        "environment_diff": environment_diff(bundle.manifest.get("environment", {}), environment_fingerprint(device)),
        "artifact_changed": (recorded.get("sha256") != artifact_sha256(artifact_path)) if recorded else None,
        "runner": runner.info,
    }
    return report
