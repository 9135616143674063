"""Hook point for reduced-precision artifacts made by singer_deploy.calibration.

The export half writes FP32 ONNX and FP32 / FP16-compressed OpenVINO IR. Turning the FP32 ONNX into an FP16 cast
graph or an INT8 Q/DQ graph (for ONNX Runtime and for TensorRT, whose strongly typed networks take their precision
from the graph), or the FP32 IR into an NNCF INT8 IR, is the calibration package's job. It registers one converter
per (format, precision):

    register_converter("onnx", "int8", fn)       # fn(fp32_artifact: Path, out_path: Path,
    register_converter("openvino", "int8", fn)   #    calib_images: np.ndarray | None) -> Path written

and the export pipeline looks converters up here, importing singer_deploy.calibration first so its registrations
run. The "onnx" converters also feed the TensorRT build.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import numpy as np

from singer_deploy.errors import ConfigError
from singer_deploy.export.formats import normalize_precision, resolve_format

Converter = Callable[[Path, Path, np.ndarray | None], Path]

_CONVERTERS: dict[tuple[str, str], Converter] = {}


def register_converter(fmt: str, precision: str, converter: Converter) -> None:
    _CONVERTERS[(resolve_format(fmt).name, normalize_precision(precision))] = converter


def converter_for(fmt: str, precision: str) -> Converter:
    """The registered FP32 -> `precision` converter for `fmt`, or ConfigError saying nothing provides it."""
    key = (resolve_format(fmt).name, normalize_precision(precision))
    if key not in _CONVERTERS:
        try:
            importlib.import_module("singer_deploy.calibration")
        except ImportError:
            pass   # the calibration package is optional; the error below says what is missing
    if key not in _CONVERTERS:
        raise ConfigError(f"No converter produces {key[1]} {key[0]} artifacts here",
                          expected=f"singer_deploy.calibration to call register_converter('{key[0]}', '{key[1]}', fn)",
                          found=f"converters for: {', '.join('/'.join(k) for k in sorted(_CONVERTERS)) or 'none'}",
                          fix="use precision='fp32' (OpenVINO also writes an FP16 IR), or install/import the "
                              "calibration package that provides it")
    return _CONVERTERS[key]
