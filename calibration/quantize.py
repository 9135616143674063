"""One entry for reduced precision: FP32 artifact in, FP16 / INT8 artifact out, with its realised precision
(read back from the file) and its parity against a reference, gated per precision by the export parity policy.

    result = reduce_precision("student_fp32.onnx", precision="int8", backend="onnx",
                              output_dir="out", calibration=calib)
    result.realised.counts(); result.parity.passed

`quantize_student` does the whole path from a PyTorch student: ONNX export, calibration cache, quantization,
parity against eager PyTorch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from singer_deploy.calibration.cache import cached_calibration_set
from singer_deploy.calibration.int8_scheme import Int8Scheme, int8_scheme
from singer_deploy.calibration.onnx_fp16 import convert_onnx_fp16
from singer_deploy.calibration.onnx_int8 import quantize_onnx_int8
from singer_deploy.calibration.openvino_int8 import openvino_fp16, quantize_openvino_int8
from singer_deploy.calibration.policy import DEFAULT_POLICY
from singer_deploy.calibration.realised import RealisedPrecision, realised_precision, require_policy_held
from singer_deploy.calibration.selection import DEFAULT_CALIBRATION_SIZE, CalibrationSet, Method
from singer_deploy.calibration.source import ImageSource, load_calibration_images
from singer_deploy.config import PrecisionPolicy, normalize_precision
from singer_deploy.errors import ConfigError
from singer_deploy.export.hardware import CpuCapabilities
from singer_deploy.export.parity import ParityReport, compare_outputs
from singer_deploy.export.runner import Runner, TorchRunner

BACKENDS: tuple[str, ...] = ("onnx", "openvino")
REDUCED_PRECISIONS: tuple[str, ...] = ("fp16", "int8")
_RUN_BATCH = 16
# Images held out of calibration for the parity check when the caller gives none.
_HELD_OUT = 64


@dataclass
class ReducedModel:
    artifact: Path
    backend: str
    precision: str
    realised: RealisedPrecision
    parity: ParityReport | None
    parity_images: str          # which images the parity ran on: "held-out", "given" or "calibration (in-sample)"
    calibration: dict | None    # method, seed, size of the calibration set (INT8 only)
    seconds: float              # time spent producing the artifact
    int8_scheme: Int8Scheme | None = None   # INT8 encoding chosen for the target (INT8 only)

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), "backend": self.backend, "precision": self.precision,
                "realised": self.realised.to_dict(), "parity": self.parity.to_dict() if self.parity else None,
                "parity_images": self.parity_images, "calibration": self.calibration, "seconds": self.seconds,
                "int8_scheme": None if self.int8_scheme is None else self.int8_scheme.to_dict()}


def run_all(runner: Runner, images: np.ndarray, batch: int = _RUN_BATCH) -> dict[str, np.ndarray]:
    """Run `images` through `runner` in batches and concatenate every output."""
    parts = [runner.run(np.ascontiguousarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def artifact_runner(path: str | Path, backend: str) -> Runner:
    """The CPU parity runner of one artifact: ONNX Runtime, or OpenVINO with FP32 execution for unquantized ops."""
    if backend == "onnx":
        from singer_deploy.export.onnx import OnnxRuntimeRunner
        return OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"])
    from singer_deploy.export.openvino import OpenVINORunner
    return OpenVINORunner(path, inference_precision="f32")


def _check_request(model: Any, precision: str, backend: str, calibration: CalibrationSet | None) -> str:
    precision = normalize_precision(precision)
    if precision not in REDUCED_PRECISIONS:
        raise ConfigError(f"reduce_precision makes {REDUCED_PRECISIONS} artifacts", expected="fp16 or int8",
                          found=precision, fix="the FP32 artifact is export_onnx / export_openvino's output")
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown backend {backend!r} for reduced precision", expected=f"one of {BACKENDS}",
                          found=repr(backend), fix="TensorRT builds consume the ONNX Q/DQ / FP16 files made here")
    if precision == "int8" and calibration is None:
        raise ConfigError("INT8 needs a calibration set", expected="calibration=cached_calibration_set(...)",
                          found="calibration=None", fix="select calibration images from the distillation data")
    if backend == "onnx" and Path(str(model)).suffix != ".onnx":
        raise ConfigError("The ONNX backend reduces an ONNX file", expected="a path ending in .onnx",
                          found=str(model), fix="pass export_onnx(...).path")
    return precision


def _produce(model: Any, precision: str, backend: str, out: Path, calibration: CalibrationSet | None,
             policy: PrecisionPolicy, stem: str, scheme: Int8Scheme) -> Path:
    if backend == "onnx":
        if precision == "fp16":
            return convert_onnx_fp16(model, out / f"{stem}_fp16.onnx", policy)
        return quantize_onnx_int8(model, out / f"{stem}_int8_qdq.onnx", calibration, policy, scheme=scheme)
    if precision == "fp16":
        return openvino_fp16(model, out, stem=stem)
    return quantize_openvino_int8(model, out / f"{stem}_int8.xml", calibration, policy, scheme=scheme)


def reduce_precision(model: str | Path, *, precision: str, backend: str, output_dir: str | Path,
                     calibration: CalibrationSet | None = None, policy: PrecisionPolicy = DEFAULT_POLICY,
                     eval_images: np.ndarray | None = None, reference: Runner | dict | None = None,
                     stem: str = "student", check: bool = True, strict: bool = True,
                     target: str | CpuCapabilities | None = None) -> ReducedModel:
    """Make the FP16 / INT8 artifact of an FP32 ONNX file (either backend) or IR .xml (OpenVINO).

    INT8 is encoded for `target` (an export.target name; default: this host), see int8_scheme.py.
    The realised precision is read back from the produced file and must honour `policy` (ExportError if not).
    When `check`, outputs are compared with `reference` (a Runner or precomputed outputs; default: the FP32 input
    artifact on the same backend) on `eval_images` (default: the calibration images, reported as in-sample);
    `strict` raises ParityError when the precision's gate fails.
    """
    precision = _check_request(model, precision, backend, calibration)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scheme = int8_scheme("onnxruntime" if backend == "onnx" else "openvino", target) if precision == "int8" else None
    start = time.perf_counter()
    artifact = _produce(model, precision, backend, out, calibration, policy, stem, scheme)
    seconds = time.perf_counter() - start
    realised = realised_precision(artifact, policy)
    require_policy_held(realised, precision, weights_only=(backend == "openvino" and precision == "fp16"))
    parity, parity_images = None, "not checked"
    if check:
        images, parity_images = _parity_images(eval_images, calibration)
        if isinstance(reference, dict):
            ref_outputs = reference
        else:
            ref_runner = reference or artifact_runner(model, "onnx" if Path(str(model)).suffix == ".onnx" else backend)
            ref_outputs = run_all(ref_runner, images)
        cand_outputs = run_all(artifact_runner(artifact, backend), images)
        parity = compare_outputs(ref_outputs, cand_outputs, precision,
                                 candidate_name=f"{backend}-{precision}")
        if strict:
            parity.raise_if_failed()
    calib_info = None if calibration is None else {"method": calibration.method, "seed": calibration.seed,
                                                   "size": len(calibration), "source_size": calibration.source_size}
    return ReducedModel(Path(artifact), backend, precision, realised, parity, parity_images, calib_info, seconds,
                        scheme)


def _parity_images(eval_images: np.ndarray | None, calibration: CalibrationSet | None) -> tuple[np.ndarray, str]:
    if eval_images is not None:
        return load_calibration_images(eval_images), "given"
    if calibration is not None:
        return calibration.images, "calibration (in-sample)"
    raise ConfigError("A parity check needs images", expected="eval_images=... (or a calibration set)",
                      found="neither", fix="pass a few real images, or check=False to skip parity (reported)")


def quantize_student(student: nn.Module, output_dir: str | Path, calibration_source: ImageSource, *,
                     backend: str = "openvino", precision: str = "int8", projector: nn.Module | None = None,
                     size: int = DEFAULT_CALIBRATION_SIZE, method: Method = "random", seed: int = 0,
                     cache_dir: str | Path | None = None, eval_images: np.ndarray | None = None,
                     policy: PrecisionPolicy = DEFAULT_POLICY, strict: bool = True,
                     target: str | CpuCapabilities | None = None) -> ReducedModel:
    """Export `student` (timm ViT) to ONNX, calibrate on its distillation images, reduce for `target` (default:
    this host), and gate parity against eager PyTorch. Without `eval_images`, up to 64 source images left out of
    calibration are the parity set."""
    from singer_deploy.export.onnx import export_onnx
    from singer_deploy.export.openvino import export_openvino
    from singer_deploy.export.student import ExportableStudent

    out = Path(output_dir)
    wrapper = ExportableStudent(student, projector).eval()
    onnx_path = export_onnx(wrapper, out / "student_fp32.onnx").path
    source = onnx_path if backend == "onnx" else export_openvino(onnx_path, out, fp16=False).fp32_xml
    images = load_calibration_images(calibration_source)
    calibration = cached_calibration_set(images, cache_dir or out / "calibration", size=size, method=method,
                                         seed=seed, embed_fn=wrapper if method == "kcenter" else None)
    if eval_images is None:
        held_out = np.setdiff1d(np.arange(len(images)), calibration.indices)[:_HELD_OUT]
        eval_images = images[held_out] if len(held_out) >= 2 else None
    result = reduce_precision(source, precision=precision, backend=backend, output_dir=out, calibration=calibration,
                              policy=policy, eval_images=eval_images, reference=TorchRunner(wrapper), strict=strict,
                              target=target)
    if eval_images is not None and result.parity_images == "given":
        result.parity_images = "held-out"
    return result
