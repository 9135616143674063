"""The ViT precision policy: roles found from the graph, compiled into NNCF / ONNX Runtime / FP16-converter terms."""

from __future__ import annotations

import pytest
import timm
import torch

from singer_deploy.calibration.graph import load_graph
from singer_deploy.calibration.policy import (DEFAULT_POLICY, high_precision_nodes, low_precision_nodes, nncf_args,
                                             onnx_fp16_args, onnx_quantize_static_args)
from singer_deploy.config import PrecisionPolicy
from singer_deploy.errors import ConfigError


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from singer_deploy.export.onnx import export_onnx
    from singer_deploy.export.openvino import export_openvino

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1, embed_dim=32,
                            num_heads=2, num_classes=0).eval()
    out = tmp_path_factory.mktemp("policy")
    onnx_path = export_onnx(vit, out / "s.onnx", projector=torch.nn.Linear(32, 16)).path
    return {"onnx": load_graph(onnx_path), "openvino": load_graph(export_openvino(onnx_path, out, fp16=False).fp32_xml)}


@pytest.mark.parametrize("dialect", ["onnx", "openvino"])
def test_roles_of_a_register_vit_with_projector(graphs, dialect):
    roles = list(graphs[dialect].roles().values())
    assert roles.count("linear") == 4                      # qkv, proj, fc1, fc2 of the single block
    assert roles.count("output_projection") == 1          # the projector feeding the "projected" output
    assert roles.count("patch_embedding") == 1
    assert roles.count("layernorm") >= 2 and roles.count("gelu") == 1
    assert roles.count("attention") >= 1


def test_onnx_runtime_arguments(graphs):
    args = onnx_quantize_static_args(DEFAULT_POLICY, graphs["onnx"])
    projector = [n for n, r in graphs["onnx"].roles().items() if r == "output_projection"]
    assert args["op_types_to_quantize"] == ["MatMul"]
    assert args["nodes_to_exclude"] == projector
    assert args["extra_options"]["OpTypesToExcludeOutputQuantization"] == ["MatMul"]


def test_fp16_block_lists_keep_norms_and_named_nodes(graphs):
    args = onnx_fp16_args(DEFAULT_POLICY, graphs["onnx"])
    assert {"LayerNormalization", "Softmax", "Erf"} <= set(args["op_block_list"])
    assert "TopK" in args["op_block_list"]                 # ONNX Runtime's own defaults survive
    kinds = {graphs["onnx"].nodes[n].op_type for n in args["node_block_list"]}
    assert kinds == {"Conv", "MatMul"}                     # patch embedding + projector


def test_nncf_scope_ignores_everything_but_the_low_precision_roles(graphs):
    import nncf

    args = nncf_args(DEFAULT_POLICY, graphs["openvino"])
    assert args["model_type"] == nncf.ModelType.TRANSFORMER
    scope = args["ignored_scope"]
    assert {"MVN", "Convolution", "Gelu"} <= set(scope.types)
    assert "MatMul" not in scope.types
    projector = [n for n, r in graphs["openvino"].roles().items() if r == "output_projection"]
    assert scope.names == projector


def test_name_patterns_move_nodes_to_high_precision(graphs):
    graph = graphs["onnx"]
    target = low_precision_nodes(DEFAULT_POLICY, graph)[0]
    policy = PrecisionPolicy(keep_name_patterns=(f"^{target}$",))
    assert target in high_precision_nodes(policy, graph) and target not in low_precision_nodes(policy, graph)
    assert target in onnx_quantize_static_args(policy, graph)["nodes_to_exclude"]


@pytest.mark.parametrize("kwargs", [dict(low_precision_roles=("linear", "layernorm")),
                                    dict(high_precision_roles=("dropout",)),
                                    dict(keep_name_patterns=("([",))])
def test_invalid_policies_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        PrecisionPolicy(**kwargs)
