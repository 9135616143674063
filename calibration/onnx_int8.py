"""Explicit Q/DQ INT8 ONNX with ONNX Runtime's static quantizer.

Per-channel symmetric INT8 weights in QuantizeLinear/DequantizeLinear pairs; the activation encoding and the weight
range follow the consumer and target (int8_scheme.py): for TensorRT symmetric INT8 activations (the form a strongly
typed TensorRT 10/11 build consumes, docs/export.md "TensorRT"); for ONNX Runtime on a CPU asymmetric UINT8
activations, with 7-bit weights where the CPU has no VNNI, as ONNX Runtime's quantize_static guidance says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from singer_deploy.calibration.int8_scheme import Int8Scheme, int8_scheme
from singer_deploy.calibration.policy import DEFAULT_POLICY, onnx_quantize_static_args
from singer_deploy.config import PrecisionPolicy
from singer_deploy.calibration.selection import CalibrationSet
from singer_deploy.errors import ConfigError, ExportError
from singer_deploy.export.runtimes import import_onnxruntime
from singer_deploy.io import atomic_path

# ORT's static quantizer refuses opset >= 21 (docs/export.md, "Precision pitfalls on ViTs"); the exporter writes 18.
_MAX_OPSET = 20
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
_DEFAULT_BATCH = 8


def _input_spec(model) -> tuple[str, int | None]:
    (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dim = inp.type.tensor_type.shape.dim[0]
    return inp.name, (dim.dim_value if dim.HasField("dim_value") else None)


def _reader(images: np.ndarray, input_name: str, batch: int, fixed: bool):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds the cached calibration images; a fixed-batch graph gets exactly its batch size."""

        def __init__(self):
            usable = len(images) - len(images) % batch if fixed else len(images)
            self._batches = iter([{input_name: images[i:i + batch]} for i in range(0, usable, batch)])

        def get_next(self):
            return next(self._batches, None)

    return _Reader()


def quantize_onnx_int8(onnx_path: str | Path, output_path: str | Path, calibration: CalibrationSet,
                       policy: PrecisionPolicy = DEFAULT_POLICY, *, calibrate_method: str = "minmax",
                       per_channel: bool = True, scheme: Int8Scheme | None = None) -> Path:
    """Write a Q/DQ INT8 copy of `onnx_path` calibrated on `calibration`, quantizing only what `policy` allows,
    encoded per `scheme` (default: int8_scheme("onnxruntime") for this host)."""
    import onnx

    import_onnxruntime()  # a clear error when no ONNX Runtime build is installed at all
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibrate_method not in CALIBRATE_METHODS:
        raise ConfigError(f"Unknown calibration method {calibrate_method!r}", expected=f"one of {CALIBRATE_METHODS}",
                          found=repr(calibrate_method), fix="use calibrate_method='minmax'")
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    model = onnx.load(str(onnx_path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > _MAX_OPSET:
        raise ExportError("ONNX Runtime's static quantizer does not take this opset", expected=f"opset <= {_MAX_OPSET}",
                          found=f"opset {opset}", fix="export with opset 18 (export_onnx's default)")
    input_name, fixed_batch = _input_spec(model)
    batch = fixed_batch or _DEFAULT_BATCH
    if len(calibration) < batch:
        raise ConfigError("Too few calibration images for the graph's fixed batch", expected=f">= {batch} images",
                          found=f"{len(calibration)}", fix="export with a dynamic batch or calibrate on more images")
    args = onnx_quantize_static_args(policy, model)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibrate_method]
    scheme = scheme or int8_scheme("onnxruntime")
    symmetric = scheme.symmetric_activations
    extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True, **args["extra_options"]}
    try:
        with atomic_path(output_path) as tmp:
            quantize_static(str(onnx_path), str(tmp),
                            _reader(calibration.images, input_name, batch, fixed_batch is not None),
                            quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=per_channel,
                            reduce_range=scheme.half_range_weights, calibrate_method=method,
                            op_types_to_quantize=args["op_types_to_quantize"],
                            nodes_to_exclude=args["nodes_to_exclude"], extra_options=extra)
    except (ConfigError, ExportError):
        raise
    except Exception as exc:
        raise ExportError("ONNX Runtime static INT8 quantization failed", expected="a float ONNX student",
                          found=f"{type(exc).__name__}: {exc}", fix="quantize the FP32 export of export_onnx") from exc
    return output_path
