"""The reduced-precision converters this package offers singer_deploy.export's pipeline.

`export_student(..., converters=export_converters())` hands each converter the FP32 artifact, the path to write and
the user's calibration images; both INT8 backends draw their calibration set from the same cache beside the output,
so they calibrate on the same images. The pipeline layer passes them explicitly: export never imports calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from singer_deploy.calibration.cache import cached_calibration_set
from singer_deploy.calibration.int8_scheme import int8_scheme
from singer_deploy.calibration.onnx_fp16 import convert_onnx_fp16
from singer_deploy.calibration.onnx_int8 import quantize_onnx_int8
from singer_deploy.calibration.openvino_int8 import quantize_openvino_int8
from singer_deploy.calibration.policy import DEFAULT_POLICY
from singer_deploy.calibration.realised import realised_precision, require_policy_held
from singer_deploy.calibration.selection import CalibrationSet
from singer_deploy.errors import ConfigError
from singer_deploy.export.hardware import CpuCapabilities
from singer_deploy.export.pipeline import Converter

CACHE_DIR_NAME = "calibration"


def _calibration(calib_images: np.ndarray | None, out_path: Path) -> CalibrationSet:
    if calib_images is None:
        raise ConfigError("INT8 export needs calibration images", expected="calib_images from the distillation data",
                          found="None", fix="pass calibration images to the export (a few hundred is enough)")
    return cached_calibration_set(calib_images, out_path.parent / CACHE_DIR_NAME)


def _checked(path: Path, precision: str) -> Path:
    require_policy_held(realised_precision(path, DEFAULT_POLICY), precision)
    return path


@dataclass(frozen=True)
class TargetConverters:
    """The converters for one deployment target: INT8 is encoded for `target` (int8_scheme.py); `gpu_int8` makes the
    ONNX Q/DQ file TensorRT's symmetric kind (it then feeds the engine build, not a CPU)."""

    target: str | CpuCapabilities | None = None
    gpu_int8: bool = False

    def onnx_fp16(self, fp32: Path, out_path: Path, calib_images: np.ndarray | None) -> Path:
        return _checked(convert_onnx_fp16(fp32, out_path, DEFAULT_POLICY), "fp16")

    def onnx_int8(self, fp32: Path, out_path: Path, calib_images: np.ndarray | None) -> Path:
        scheme = int8_scheme("tensorrt") if self.gpu_int8 else int8_scheme("onnxruntime", self.target)
        return _checked(quantize_onnx_int8(fp32, out_path, _calibration(calib_images, Path(out_path)),
                                           scheme=scheme), "int8")

    def openvino_int8(self, fp32: Path, out_path: Path, calib_images: np.ndarray | None) -> Path:
        return _checked(quantize_openvino_int8(fp32, out_path, _calibration(calib_images, Path(out_path)),
                                               scheme=int8_scheme("openvino", self.target)), "int8")


def export_converters(target: str | CpuCapabilities | None = None, *,
                      gpu_int8: bool = False) -> dict[tuple[str, str], Converter]:
    """(format, precision) -> converter, for export_student(converters=...). "onnx" ones also feed TensorRT.
    INT8 is encoded for `target` (default: this host)."""
    made = TargetConverters(target, gpu_int8)
    return {("onnx", "fp16"): made.onnx_fp16, ("onnx", "int8"): made.onnx_int8,
            ("openvino", "int8"): made.openvino_int8}
