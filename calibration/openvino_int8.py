"""OpenVINO INT8 through NNCF post-training quantization, and the FP16-compressed IR.

`ModelType.TRANSFORMER` is the single biggest accuracy lever for ViTs (SmoothQuant first, MIXED preset; see
docs/export.md, "OpenVINO"); the policy's IgnoredScope keeps LayerNorm, softmax, GELU, the patch
embedding and output projections out of INT8. The INT8 IR is saved without FP16 weight compression so the layers
the policy keeps high precision really stay FP32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from singer_deploy.calibration.int8_scheme import Int8Scheme, int8_scheme
from singer_deploy.calibration.policy import DEFAULT_POLICY, nncf_args
from singer_deploy.config import PrecisionPolicy
from singer_deploy.calibration.selection import CalibrationSet
from singer_deploy.errors import ConfigError, ExportError
from singer_deploy.export.openvino import export_openvino, save_ir
from singer_deploy.export.openvino_core import import_openvino, openvino_core


def load_openvino_model(source: Any) -> Any:
    """An ov.Model from an ov.Model, an IR .xml or an ONNX file."""
    ov = import_openvino()
    if isinstance(source, ov.Model):
        return source
    path = Path(source)
    if not path.is_file():
        raise ExportError("The model to quantize does not exist", expected="an .xml IR or .onnx file",
                          found=str(path), fix="export the student first")
    if path.suffix == ".xml":
        return openvino_core().read_model(str(path))
    return ov.convert_model(str(path))


def quantize_openvino_int8(source: Any, output_xml: str | Path, calibration: CalibrationSet,
                           policy: PrecisionPolicy = DEFAULT_POLICY, *, subset_size: int | None = None,
                           fast_bias_correction: bool = True, scheme: Int8Scheme | None = None) -> Path:
    """nncf.quantize the FP32 model on `calibration` (one image per step) and save the INT8 IR. `scheme` (default:
    int8_scheme("openvino") for this host) sets NNCF's overflow fix for the CPU the IR will run on."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = load_openvino_model(source)
    subset = subset_size or len(calibration)
    if subset < 1 or len(calibration) == 0:
        raise ConfigError("NNCF needs calibration images", expected="a non-empty calibration set",
                          found=f"{len(calibration)} images, subset_size={subset_size}",
                          fix="select calibration images first and leave subset_size=None (all of them)")
    # One image per step: batched statistics make NNCF warn and skew transformer ranges (nncf quantize_model.py).
    dataset = nncf.Dataset([calibration.images[i:i + 1] for i in range(len(calibration))])
    scheme = scheme or int8_scheme("openvino")
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix(scheme.nncf_overflow_fix))
    previous = nncf.nncf_logger.level
    nncf.set_log_level(logging.WARNING)   # NNCF logs one INFO line per ignored op
    try:
        quantized = nncf.quantize(model, dataset, subset_size=subset, fast_bias_correction=fast_bias_correction,
                                  advanced_parameters=advanced, **nncf_args(policy, model))
    except Exception as exc:
        raise ExportError("NNCF INT8 quantization failed", expected="an FP32 OpenVINO student",
                          found=f"{type(exc).__name__}: {exc}", fix="quantize the FP32 IR (student_fp32.xml)") from exc
    finally:
        nncf.set_log_level(previous)
    return save_ir(quantized, Path(output_xml), compress_to_fp16=False)


def openvino_fp16(source: Any, out_dir: str | Path, *, stem: str = "student") -> Path:
    """The FP16-compressed IR: export_openvino's for an ONNX file; a re-save with compression for an ov.Model/IR."""
    out_dir = Path(out_dir)
    if isinstance(source, (str, Path)) and Path(source).suffix == ".onnx":
        return export_openvino(source, out_dir, stem=stem, fp16=True).fp16_xml
    return save_ir(load_openvino_model(source), out_dir / f"{stem}_fp16.xml", compress_to_fp16=True)
