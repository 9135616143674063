"""The INT8 encoding follows the deployment target: 7-bit weights (NNCF overflow fix ENABLE, ONNX Runtime
reduce_range) wherever the target lacks VNNI/AMX, and the produced files really carry the chosen weight range."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from singer_deploy.calibration.cache import cached_calibration_set
from singer_deploy.calibration.int8_scheme import int8_scheme
from singer_deploy.calibration.onnx_int8 import quantize_onnx_int8
from singer_deploy.calibration.openvino_int8 import quantize_openvino_int8
from singer_deploy.errors import ConfigError
from singer_deploy.export.hardware import TARGETS, host_capabilities
from singer_deploy.models.data import SyntheticShapes

WITHOUT_VNNI = ("avx2", "avx512")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_gets_the_overflow_fix_its_int8_kernels_need(target):
    openvino, ort = int8_scheme("openvino", target), int8_scheme("onnxruntime", target)
    saturates = target in WITHOUT_VNNI
    assert openvino.nncf_overflow_fix == ("enable" if saturates else "first_layer_only")
    assert ort.half_range_weights == saturates and not ort.symmetric_activations   # ORT: QUInt8 activations
    assert openvino.target == ort.target == target


def test_host_and_tensorrt_schemes():
    host = host_capabilities()
    assert int8_scheme("openvino").half_range_weights == (not host.int8_without_saturation)
    assert int8_scheme("openvino").target == host.isa
    trt = int8_scheme("tensorrt", "avx2")   # the CPU target does not change a GPU engine's encoding
    assert trt.symmetric_activations and not trt.half_range_weights and trt.target == "gpu"
    with pytest.raises(ConfigError, match="consumer"):
        int8_scheme("tflite")


@pytest.fixture(scope="module")
def fp32_models(tmp_path_factory):
    from singer_deploy.export.onnx import export_onnx
    from singer_deploy.export.openvino import export_openvino

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            embed_dim=48, num_heads=2, num_classes=0).eval()
    out = tmp_path_factory.mktemp("scheme")
    onnx_path = export_onnx(vit, out / "s.onnx").path
    data = SyntheticShapes(n=24, img_size=32, patch_size=8, seed=0)
    images = np.stack([data[i]["image"].numpy() for i in range(24)]).astype(np.float32)
    return {"dir": out, "onnx": onnx_path, "ov": export_openvino(onnx_path, out, fp16=False).fp32_xml,
            "calibration": cached_calibration_set(images, out / "calibration", size=24)}


def _max_int8_weight_ov(xml) -> int:
    import openvino as ov

    from singer_deploy.export.openvino_core import openvino_core

    model = openvino_core().read_model(str(xml))
    return max(int(np.abs(op.get_data().astype(np.int32)).max()) for op in model.get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8)


def _max_int8_weight_onnx(path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims)


@pytest.mark.parametrize("target", ["avx2", "avx512_vnni"])
def test_produced_weights_use_the_range_the_target_needs(fp32_models, target):
    out, calibration = fp32_models["dir"], fp32_models["calibration"]
    xml = quantize_openvino_int8(fp32_models["ov"], out / f"{target}.xml", calibration,
                                 scheme=int8_scheme("openvino", target))
    qdq = quantize_onnx_int8(fp32_models["onnx"], out / f"{target}.onnx", calibration,
                             scheme=int8_scheme("onnxruntime", target))
    if target in WITHOUT_VNNI:
        assert _max_int8_weight_ov(xml) <= 64 and _max_int8_weight_onnx(qdq) <= 64
    else:
        assert _max_int8_weight_ov(xml) > 100 and _max_int8_weight_onnx(qdq) > 100
