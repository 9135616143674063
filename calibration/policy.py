"""One ViT precision policy, compiled into each backend's own dialect.

Which ops may run in reduced precision and which must stay FP32 is decided once, by ViT role (see graph.py): the
linear layers and attention products carry almost all FLOPs and tolerate INT8 / FP16; LayerNorm, softmax and GELU
overflow or lose range in FP16 and collapse under per-tensor INT8 (docs/export.md, "Precision pitfalls on ViTs");
the patch-embedding convolution sees raw pixels, and the output projections write the features users compare, so
both stay FP32 too. The policy is then translated into NNCF's IgnoredScope, ONNX Runtime's quantize_static arguments
and the FP16 converter's block lists, all resolved to node names of the concrete graph. The policy itself (its roles
and their validation) is PrecisionPolicy in singer_deploy/config.py; this module compiles it.
"""

from __future__ import annotations

import re
from typing import Any

from singer_deploy.calibration.graph import ROLE_TYPES, OpGraph, load_graph
from singer_deploy.config import PrecisionPolicy

# Default FP16 block list of ONNX Runtime's converter (ops with no FP16 kernel); kept whenever we pass our own.
try:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST as _ORT_FP16_BLOCK_LIST
except ImportError:  # onnxruntime without its transformers tools: only our own block list applies
    _ORT_FP16_BLOCK_LIST = []


DEFAULT_POLICY = PrecisionPolicy()


def _kept_by_name(policy: PrecisionPolicy, name: str) -> bool:
    return any(re.search(pattern, name) for pattern in policy.keep_name_patterns)


def decisions(policy: PrecisionPolicy, graph: OpGraph) -> dict[str, str]:
    """Per node: "low" (may be INT8 / FP16), "high" (must stay FP32) or "free" (FP16 cast allowed, never INT8)."""
    out = {}
    for name, role in graph.roles().items():
        if role in policy.high_precision_roles or _kept_by_name(policy, name):
            out[name] = "high"
        elif role in policy.low_precision_roles:
            out[name] = "low"
        else:
            out[name] = "free"
    return out


def low_precision_nodes(policy: PrecisionPolicy, graph: OpGraph) -> list[str]:
    return sorted(n for n, d in decisions(policy, graph).items() if d == "low")


def high_precision_nodes(policy: PrecisionPolicy, graph: OpGraph) -> list[str]:
    return sorted(n for n, d in decisions(policy, graph).items() if d == "high")


def onnx_quantize_static_args(policy: PrecisionPolicy, model: Any) -> dict:
    """`op_types_to_quantize` / `nodes_to_exclude` for onnxruntime.quantization.quantize_static."""
    graph = _as_graph(model)
    low = set(low_precision_nodes(policy, graph))
    op_types = sorted({graph.nodes[n].op_type for n in low})
    excluded = sorted(n for n, node in graph.nodes.items() if node.op_type in op_types and n not in low)
    # Quantizing a MatMul's output would put Q/DQ in front of whatever follows it (softmax, GELU, LayerNorm):
    # inputs only, which is also the pattern TensorRT fuses into INT8 GEMMs.
    return {"op_types_to_quantize": op_types, "nodes_to_exclude": excluded,
            "extra_options": {"OpTypesToExcludeOutputQuantization": op_types}}


def onnx_fp16_args(policy: PrecisionPolicy, model: Any) -> dict:
    """`op_block_list` / `node_block_list` for the ONNX FP16 converter (keep_io_types is always on)."""
    graph = _as_graph(model)
    blocked_types = set(_ORT_FP16_BLOCK_LIST)
    for role in ("layernorm", "softmax", "gelu"):
        if role in policy.high_precision_roles:
            blocked_types |= ROLE_TYPES[graph.dialect][role]
    blocked_nodes = [n for n in high_precision_nodes(policy, graph) if graph.nodes[n].op_type not in blocked_types]
    return {"op_block_list": sorted(blocked_types), "node_block_list": sorted(blocked_nodes)}


def nncf_args(policy: PrecisionPolicy, ov_model: Any) -> dict:
    """`model_type` + `ignored_scope` for nncf.quantize on an OpenVINO model.

    Every op type outside the low-precision roles is ignored by type, so NNCF inserts FakeQuantize only in
    front of the roles the policy allows; the high-precision members of those types are ignored by name.
    """
    import nncf

    graph = _as_graph(ov_model)
    decided = decisions(policy, graph)
    low_types = {graph.nodes[n].op_type for n, d in decided.items() if d == "low"}
    ignored_types = sorted({node.op_type for node in graph.nodes.values()} - low_types)
    ignored_names = sorted(n for n, d in decided.items() if d != "low" and graph.nodes[n].op_type in low_types)
    scope = nncf.IgnoredScope(names=ignored_names, types=ignored_types, validate=False)
    return {"model_type": nncf.ModelType.TRANSFORMER, "ignored_scope": scope}


def _as_graph(model: Any) -> OpGraph:
    return model if isinstance(model, OpGraph) else load_graph(model)
