"""One small read-only view over an ONNX graph or an OpenVINO model, and the ViT role of every op in it.

The precision policy speaks in roles (linear layer, attention product, LayerNorm, patch embedding, output
projection ...); each backend names the same thing differently (ONNX `LayerNormalization` is OpenVINO `MVN`,
an ONNX `MatMul` may become part of an OpenVINO `ScaledDotProductAttention`). Roles are derived from the graph
itself, so the policy never depends on the exporter's node names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ONNX, OPENVINO = "onnx", "openvino"

# Op types per role and dialect. Decomposed LayerNorm (ReduceMean / Pow / Sqrt) appears when an old exporter
# or opset < 17 produced the file; it needs the same protection as the fused op.
ROLE_TYPES: dict[str, dict[str, frozenset[str]]] = {
    ONNX: {
        "matmul": frozenset({"MatMul", "Gemm"}),
        "conv": frozenset({"Conv"}),
        "layernorm": frozenset({"LayerNormalization", "ReduceMean", "Pow", "Sqrt"}),
        "softmax": frozenset({"Softmax"}),
        "gelu": frozenset({"Gelu", "Erf"}),
        "sdpa": frozenset(),
    },
    OPENVINO: {
        "matmul": frozenset({"MatMul"}),
        "conv": frozenset({"Convolution"}),
        "layernorm": frozenset({"MVN"}),
        "softmax": frozenset({"Softmax", "SoftMax"}),
        "gelu": frozenset({"Gelu", "Erf"}),
        "sdpa": frozenset({"ScaledDotProductAttention"}),
    },
}

# Ops a weight passes through between its stored constant and the op using it (layout, decompression, Q/DQ).
_WEIGHT_PATH = frozenset({"Transpose", "Reshape", "Convert", "Cast", "DequantizeLinear", "QuantizeLinear",
                          "FakeQuantize", "Multiply", "Mul", "Subtract", "Sub", "Unsqueeze", "Squeeze", "Identity"})
# Ops between a layer and a graph output that do not change what the layer computed (layout, slicing, Q/DQ).
_OUTPUT_PATH = frozenset({"Transpose", "Reshape", "Convert", "Cast", "Slice", "StridedSlice", "Gather", "Squeeze",
                          "Unsqueeze", "Split", "VariadicSplit", "Concat", "Identity", "Flatten",
                          "QuantizeLinear", "DequantizeLinear", "FakeQuantize"})
_CONSTANT_TYPES = frozenset({"Constant", "Initializer"})
_BIAS_ADDS = frozenset({"Add"})


@dataclass
class OpNode:
    name: str
    op_type: str
    inputs: list[str | None]            # producer node per input; None for a graph input
    input_dtypes: list[str | None]      # "float32", "float16", "int8", ... per input (None when unknown)
    dtype: str | None = None            # element type of the first output
    consumers: list[str] = field(default_factory=list)


@dataclass
class OpGraph:
    dialect: str
    nodes: dict[str, OpNode]
    output_producers: set[str]          # nodes whose first output is a graph output

    def node(self, name: str | None) -> OpNode | None:
        return self.nodes.get(name) if name is not None else None

    def constant_rooted(self, name: str | None, _depth: int = 0) -> bool:
        """True when the tensor is a stored constant (a weight), possibly reshaped, converted or (de)quantized."""
        node = self.node(name)
        if node is None or _depth > 8:
            return False
        if node.op_type in _CONSTANT_TYPES:
            return True
        return node.op_type in _WEIGHT_PATH and all(self.constant_rooted(p, _depth + 1) for p in node.inputs
                                                    if p is not None) and any(p is not None for p in node.inputs)

    def feeds_output_directly(self, name: str) -> bool:
        """True when the op's result reaches a graph output through bias adds and layout ops only."""
        seen, frontier = set(), [name]
        while frontier:
            current = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in self.output_producers:
                return True
            for consumer in self.nodes[current].consumers:
                node = self.nodes[consumer]
                passes = node.op_type in _OUTPUT_PATH or (
                    node.op_type in _BIAS_ADDS and any(self.constant_rooted(p) for p in node.inputs if p != current))
                if passes:
                    frontier.append(consumer)
        return False

    def role(self, name: str) -> str:
        """The ViT role of one op (one of singer_deploy.config.VIT_OP_ROLES)."""
        node, types = self.nodes[name], ROLE_TYPES[self.dialect]
        if node.op_type in types["matmul"]:
            if not any(self.constant_rooted(p) for p in node.inputs):
                return "attention"  # activation x activation: Q.K^T and attn.V
            return "output_projection" if self.feeds_output_directly(name) else "linear"
        if node.op_type in types["sdpa"]:
            return "attention"
        if node.op_type in types["conv"]:
            return "patch_embedding"  # a ViT's only convolution is its patch (or stem) embedding
        for role in ("layernorm", "softmax", "gelu"):
            if node.op_type in types[role]:
                return role
        return "other"

    def roles(self) -> dict[str, str]:
        return {name: self.role(name) for name in self.nodes}


def load_graph(model: Any) -> OpGraph:
    """An OpGraph from an ONNX path / ModelProto, or an OpenVINO model / .xml path."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix == ".xml":
            from singer_deploy.export.openvino_core import openvino_core
            return openvino_graph(openvino_core().read_model(str(path)))
        import onnx
        return onnx_graph(onnx.load(str(path)))
    if type(model).__module__.startswith("onnx"):
        return onnx_graph(model)
    return openvino_graph(model)


def onnx_graph(model: Any) -> OpGraph:
    """An OpGraph of an onnx.ModelProto (dtypes from shape inference where it succeeds)."""
    from onnx import helper, shape_inference

    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference only helps the dtype lookup; without it dtypes stay unknown
        inferred = model
    graph = inferred.graph
    dtypes: dict[str, str] = {}
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.type.HasField("tensor_type"):
            dtypes[info.name] = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).name \
                if info.type.tensor_type.elem_type else None
    producer: dict[str, str] = {}
    nodes: dict[str, OpNode] = {}
    for init in graph.initializer:
        name = f"initializer:{init.name}"
        producer[init.name] = name
        dtypes[init.name] = helper.tensor_dtype_to_np_dtype(init.data_type).name
        nodes[name] = OpNode(name, "Initializer", [], [], dtypes[init.name])
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        for out in node.output:
            producer[out] = name
        nodes[name] = OpNode(name, node.op_type, [], [], dtypes.get(node.output[0]) if node.output else None)
    for index, node in enumerate(graph.node):
        op = nodes[node.name or f"{node.op_type}_{index}"]
        for tensor in node.input:
            if not tensor:
                continue
            source = producer.get(tensor)
            op.inputs.append(source)
            op.input_dtypes.append(dtypes.get(tensor))
            if source is not None:
                nodes[source].consumers.append(op.name)
    outputs = {producer[o.name] for o in graph.output if o.name in producer}
    return OpGraph(ONNX, nodes, outputs)


def _ov_dtype(element_type) -> str:
    name = element_type.get_type_name()
    return {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i8": "int8", "u8": "uint8", "i4": "int4",
            "u4": "uint4", "i32": "int32", "i64": "int64", "boolean": "bool"}.get(name, name)


def openvino_graph(model: Any) -> OpGraph:
    """An OpGraph of an openvino.Model (Parameters count as graph inputs, Results mark the outputs)."""
    nodes: dict[str, OpNode] = {}
    key = {}
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if name in nodes:  # friendly names are not guaranteed unique; the internal name is
            name = op.get_name()
        key[op.get_name()] = name
        op_type = op.get_type_name()
        dtype = _ov_dtype(op.get_output_element_type(0)) if op.get_output_size() else None
        nodes[name] = OpNode(name, op_type, [], [], dtype)
    outputs = set()
    for op in model.get_ordered_ops():
        current = nodes[key[op.get_name()]]
        for port in op.inputs():
            source = key[port.get_source_output().get_node().get_name()]
            current.inputs.append(source)
            current.input_dtypes.append(_ov_dtype(port.get_element_type()))
            nodes[source].consumers.append(current.name)
        if current.op_type == "Result":
            outputs.add(current.inputs[0])
    # Parameters are graph inputs: mark them as "no producer" like ONNX graph inputs.
    for node in nodes.values():
        node.inputs = [None if p is not None and nodes[p].op_type == "Parameter" else p for p in node.inputs]
    return OpGraph(OPENVINO, nodes, outputs)
