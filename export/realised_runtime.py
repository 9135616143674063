"""The precision a loaded runtime really executes, read back from the runtime itself, never from a label.

A requested precision is a wish: OpenVINO may run an "f32" IR in bf16 on a CPU with AMX (its default hint), ONNX
Runtime may leave a Q/DQ pair unfused and run the MatMul in FP32. So each runner asks its runtime:

- OpenVINO: the compiled model's INFERENCE_PRECISION_HINT and, per layer of its runtime graph, `runtimePrecision`.
- ONNX Runtime: the kernels one profiled call executed (op types such as MatMulIntegerToFloat or QLinearMatMul
  run INT8; MatMul / Gemm / FusedMatMul run in the input's float type).

Only the matrix products are counted (fully connected layers, MatMul, convolutions): they are the compute that a
precision speeds up. The label says "fp32", "bf16", or e.g. "int8 12/14 + fp32" (12 of 14 products in INT8).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

_OV_PRODUCTS = frozenset({"FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution",
                          "ScaledDotProductAttention"})
_OV_TYPES = {"i8": "int8", "u8": "int8", "i4": "int4", "u4": "int4", "bf16": "bf16", "f16": "fp16", "f32": "fp32"}

_ORT_INT8 = frozenset({"MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger",
                       "QGemm", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM"})
_ORT_FLOAT = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "Attention",
                        "MultiHeadAttention"})


def label(counts: Counter) -> str:
    """"fp32" when one precision runs everything, else the lowest first: "int8 12/14 + fp32"."""
    if not counts:
        return "unknown"
    total = sum(counts.values())
    ordered = sorted(counts, key=lambda p: ("int4", "int8", "fp16", "bf16", "fp32").index(p)
                     if p in ("int4", "int8", "fp16", "bf16", "fp32") else 9)
    if len(ordered) == 1:
        return ordered[0]
    return f"{ordered[0]} {counts[ordered[0]]}/{total} + " + " + ".join(ordered[1:])


def openvino_realised(compiled: Any) -> dict:
    """Per-product precisions of an OpenVINO compiled model's runtime graph, and its precision hint."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer in _OV_PRODUCTS and "runtimePrecision" in info:
            precision = info["runtimePrecision"].astype(str)
            counts[_OV_TYPES.get(precision, precision)] += 1
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return {"realised_precision": label(counts), "realised_products": dict(counts),
            "inference_precision_hint": _OV_TYPES.get(_short(hint), _short(hint))}


def _short(ov_type: str) -> str:
    """"<Type: 'float32'>" -> "f32"."""
    name = ov_type.split("'")[1] if "'" in ov_type else ov_type
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


def onnxruntime_realised(profile_path: str | Path, input_dtype: str = "float32") -> dict:
    """Per-product precisions from an ONNX Runtime profile (InferenceSession.end_profiling()'s JSON)."""
    events = json.loads(Path(profile_path).read_text())
    float_kind = {"float16": "fp16", "bfloat16": "bf16"}.get(input_dtype, "fp32")
    counts: Counter = Counter()
    seen: set[str] = set()
    providers: Counter = Counter()
    for event in events:
        args = event.get("args", {})
        op, node = args.get("op_name"), event.get("name", "")
        if event.get("cat") != "Node" or not op or not node.endswith("_kernel_time") or node in seen:
            continue
        seen.add(node)
        providers[args.get("provider", "?")] += 1
        if op in _ORT_INT8:
            counts["int8"] += 1
        elif op in _ORT_FLOAT:
            counts[_float_kind(args, float_kind)] += 1
    return {"realised_precision": label(counts), "realised_products": dict(counts),
            "executed_by": dict(providers)}


def _float_kind(args: dict, default: str) -> str:
    """A float product's type from its profiled input (float16 in an FP16 cast graph)."""
    types = [entry.get("float16") is not None for entry in args.get("input_type_shape", []) if isinstance(entry, dict)]
    return "fp16" if types and any(types) else default
