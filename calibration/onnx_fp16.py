"""FP16 ONNX cast graph: FP16 weights and compute except where the policy keeps FP32, with FP32 inputs/outputs.

Uses ONNX Runtime's own converter (onnxruntime.transformers.float16), which inserts the Casts around blocked ops;
LayerNorm and softmax stay FP32 because they overflow in FP16 on ViTs (docs/export.md, "Precision pitfalls on ViTs").
"""

from __future__ import annotations

from pathlib import Path

from singer_deploy.calibration.policy import DEFAULT_POLICY, onnx_fp16_args
from singer_deploy.config import PrecisionPolicy
from singer_deploy.errors import BackendUnavailableError, ExportError
from singer_deploy.export.runtimes import INSTALL_FIX, import_onnxruntime
from singer_deploy.io import atomic_path


def convert_onnx_fp16(onnx_path: str | Path, output_path: str | Path,
                      policy: PrecisionPolicy = DEFAULT_POLICY) -> Path:
    """Write an FP16 copy of `onnx_path` (FP32 I/O, policy ops in FP32) and check it with onnx.checker."""
    import onnx

    import_onnxruntime()  # a clear error when no ONNX Runtime build is installed at all
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as exc:
        raise BackendUnavailableError("The ONNX FP16 converter is missing", expected="onnxruntime with its "
                                      "transformers tools", found=f"ImportError: {exc}",
                                      fix=INSTALL_FIX) from exc
    from singer_deploy.export.onnx import check_onnx

    output_path = Path(output_path)
    model = onnx.load(str(onnx_path))
    args = onnx_fp16_args(policy, model)
    try:
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=args["op_block_list"],
                                             node_block_list=args["node_block_list"])
    except Exception as exc:
        raise ExportError("FP16 conversion of the ONNX graph failed", expected="a float ONNX student",
                          found=f"{type(exc).__name__}: {exc}", fix="convert the FP32 export of export_onnx") from exc
    # The converter appends the input Casts after their consumers; ORT does not mind, onnx.checker (and TensorRT's
    # parser) require topological order.
    OnnxModel(converted).topological_sort()
    # Its value_info keeps some pre-conversion element types, which full shape inference rejects; re-inferred.
    del converted.graph.value_info[:]
    with atomic_path(output_path) as tmp:
        onnx.save(converted, str(tmp))
        check_onnx(tmp)
    return output_path
