"""The reduced-precision converters this package offers singer_deploy.export's pipeline.

`export_student(..., converters=export_converters())` hands each converter the FP32 artifact, the path to write and
the user's calibration images; both INT8 backends draw their calibration set from the same cache beside the output,
so they calibrate on the same images. The pipeline layer passes them explicitly: export never imports calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from singer_deploy.calibration.cache import cached_calibration_set
from singer_deploy.calibration.onnx_fp16 import convert_onnx_fp16
from singer_deploy.calibration.onnx_int8 import quantize_onnx_int8
from singer_deploy.calibration.openvino_int8 import quantize_openvino_int8
from singer_deploy.calibration.policy import DEFAULT_POLICY
from singer_deploy.calibration.realised import realised_precision, require_policy_held
from singer_deploy.calibration.selection import CalibrationSet
from singer_deploy.errors import ConfigError
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


def onnx_fp16_converter(fp32: Path, out_path: Path, calib_images: np.ndarray | None) -> Path:
    return _checked(convert_onnx_fp16(fp32, out_path, DEFAULT_POLICY), "fp16")


def onnx_int8_converter(fp32: Path, out_path: Path, calib_images: np.ndarray | None) -> Path:
    return _checked(quantize_onnx_int8(fp32, out_path, _calibration(calib_images, Path(out_path))), "int8")


def openvino_int8_converter(fp32: Path, out_path: Path, calib_images: np.ndarray | None) -> Path:
    return _checked(quantize_openvino_int8(fp32, out_path, _calibration(calib_images, Path(out_path))), "int8")


def export_converters() -> dict[tuple[str, str], Converter]:
    """(format, precision) -> converter, for export_student(converters=...). "onnx" ones also feed TensorRT."""
    return {("onnx", "fp16"): onnx_fp16_converter, ("onnx", "int8"): onnx_int8_converter,
            ("openvino", "int8"): openvino_int8_converter}
