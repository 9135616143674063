"""What precision each op of a produced graph really runs in, and whether the policy held.

Flags are not evidence: other SDKs shipped FP32 engines that were asked for FP16 (docs/export.md, "TensorRT"). So
the produced file is read back: in ONNX an op is INT8 when its inputs come from DequantizeLinear and FP16 when
its inputs are float16 tensors; in an OpenVINO IR an op is INT8 when its activations pass a FakeQuantize (or its
weights are stored as int8) and FP16 when its weights are stored as f16 constants.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from singer_deploy.calibration.graph import OpGraph, load_graph
from singer_deploy.calibration.policy import DEFAULT_POLICY, high_precision_nodes
from singer_deploy.config import PrecisionPolicy
from singer_deploy.errors import ExportError

_LOW_INT = {"int8", "uint8", "int4", "uint4"}
_QUANT_OPS = {"DequantizeLinear", "FakeQuantize"}
_FLOAT = {"float32", "float16", "bfloat16"}
# Layout ops a quantized tensor may pass between its FakeQuantize / DequantizeLinear and the op using it.
_LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert", "Cast"}


@dataclass
class RealisedPrecision:
    """Per-op realised precision of one artifact, counted by role."""

    backend: str
    per_node: dict[str, tuple[str, str]]                   # name -> (role, precision)
    violations: list[str] = field(default_factory=list)    # high-precision nodes that did not stay FP32
    fp16_weights: list[str] = field(default_factory=list)  # ops whose weights are stored f16 (decompressed to f32)

    def counts(self) -> dict[str, dict[str, int]]:
        """{role: {precision: count}} over every op with a role other than "other"."""
        table: dict[str, Counter] = {}
        for role, precision in self.per_node.values():
            if role != "other":
                table.setdefault(role, Counter())[precision] += 1
        return {role: dict(sorted(c.items())) for role, c in sorted(table.items())}

    def share(self, precision: str, roles: tuple[str, ...] = ("linear", "attention")) -> float:
        """Fraction of ops in `roles` realised in `precision` (e.g. how much of the compute really is INT8)."""
        picked = [p for r, p in self.per_node.values() if r in roles]
        return sum(p == precision for p in picked) / len(picked) if picked else 0.0

    def to_dict(self) -> dict:
        return {"backend": self.backend, "counts": self.counts(), "int8_share": self.share("int8"),
                "fp16_share": self.share("fp16"), "fp16_weight_ops": len(self.fp16_weights),
                "violations": list(self.violations)}


def _quantized(graph: OpGraph, source: str | None, depth: int = 0) -> bool:
    node = graph.node(source)
    if node is None or depth > 4:
        return False
    if node.op_type in _QUANT_OPS:
        return True
    return node.op_type in _LAYOUT and any(_quantized(graph, p, depth + 1) for p in node.inputs)


def _stored_dtype(graph: OpGraph, source: str | None, depth: int = 0) -> str | None:
    """dtype of the constant a weight input is stored as (int8 under a dequantize chain, f16 under a Convert)."""
    node = graph.node(source)
    if node is None or depth > 8:
        return None
    if node.op_type in ("Constant", "Initializer"):
        return node.dtype
    dtypes = [_stored_dtype(graph, p, depth + 1) for p in node.inputs if p is not None]
    for wanted in ("int8", "uint8", "int4", "uint4", "float16"):
        if wanted in dtypes:
            return wanted
    return next((d for d in dtypes if d is not None), None)


def op_precision(graph: OpGraph, name: str) -> str:
    """"int8" (all float data inputs quantized), "mixed" (some), "fp16" or "fp32"."""
    node = graph.nodes[name]
    kinds = []
    for source, dtype in zip(node.inputs, node.input_dtypes):
        if graph.constant_rooted(source) and (_stored_dtype(graph, source) in _LOW_INT or _quantized(graph, source)):
            kinds.append("int8")
            continue
        if dtype is not None and dtype not in _FLOAT:
            continue  # shape / index inputs say nothing about compute precision
        if _quantized(graph, source):
            kinds.append("int8")
        else:
            kinds.append("fp16" if dtype == "float16" else "fp32")
    if not kinds:
        return "fp16" if node.dtype == "float16" else "fp32"
    if all(k == "int8" for k in kinds):
        return "int8"
    if "int8" in kinds:
        return "mixed"
    return "fp16" if "fp16" in kinds else "fp32"


def realised_precision(artifact: Any, policy: PrecisionPolicy = DEFAULT_POLICY) -> RealisedPrecision:
    """Read the produced artifact (ONNX path/ModelProto, OpenVINO model/.xml) back and classify every op.

    A violation is a node the policy keeps FP32 that computes in INT8 or FP16. A weight stored as f16 but
    converted to f32 before its op (OpenVINO's compressed IR, the ONNX converter's blocked nodes) computes in
    FP32; such ops are listed in `fp16_weights` instead.
    """
    graph = artifact if isinstance(artifact, OpGraph) else load_graph(artifact)
    roles = graph.roles()
    per_node = {name: (role, op_precision(graph, name)) for name, role in roles.items()
                if graph.nodes[name].op_type not in ("Constant", "Initializer", "Parameter", "Result")}
    violations = [f"{name} ({per_node[name][0]}) runs {per_node[name][1]}" for name in
                  high_precision_nodes(policy, graph) if name in per_node and per_node[name][1] != "fp32"]
    fp16_weights = sorted(name for name in per_node if any(
        graph.constant_rooted(p) and _stored_dtype(graph, p) == "float16" for p in graph.nodes[name].inputs)
        and graph.nodes[name].op_type not in _LAYOUT)
    return RealisedPrecision(graph.dialect, per_node, violations, fp16_weights)


def require_policy_held(report: RealisedPrecision, requested: str, *, weights_only: bool = False) -> None:
    """Raise ExportError when a protected op was lowered, or when nothing was lowered at all.

    `weights_only`: the artifact stores FP16 weights but computes at the runtime's chosen precision (OpenVINO's
    compressed IR), so "lowered" means f16 weight storage rather than f16 compute.
    """
    if report.violations:
        raise ExportError("Ops the precision policy keeps FP32 were lowered", expected="FP32 for LayerNorm, softmax, "
                          "GELU, patch embedding and output projections", found="; ".join(report.violations[:6]),
                          fix="check the policy's compiled ignore lists for this backend")
    lowered = bool(report.fp16_weights) if weights_only else report.share(requested) > 0.0
    if not lowered:
        raise ExportError(f"No linear or attention op runs {requested}", expected=f"a {requested} artifact",
                          found=f"realised counts {report.counts()}",
                          fix="the quantizer silently produced a full-precision model; check its log")
