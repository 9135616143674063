import warnings

import pytest

from singer_deploy.config import FORMAT_PRECISIONS, check_precision, normalize_precision
from singer_deploy.errors import ConfigError
from singer_deploy.export.formats import FORMATS, format_for_path, resolve_format


@pytest.mark.parametrize("name, expected", [
    ("onnx", "onnx"), ("ONNX", "onnx"), ("ort", "onnx"), ("trt", "tensorrt"), ("TensorRT", "tensorrt"),
    ("engine", "tensorrt"), ("ov", "openvino"), ("openvino_ir", "openvino"), ("OpenVINO", "openvino"),
    ("torch-tensorrt", "torch_tensorrt"),
])
def test_resolve_format_names_and_aliases(name, expected):
    assert resolve_format(name).name == expected


def test_near_miss_typo_is_read_with_a_warning():
    with pytest.warns(UserWarning, match="read as 'openvino'"):
        assert resolve_format("openvnio").name == "openvino"


def test_unknown_format_lists_the_valid_ones():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError) as err:
            resolve_format("coreml")
    for name in FORMATS:
        assert name in str(err.value)


def test_format_for_path_by_suffix():
    assert format_for_path("a/b/model.onnx").name == "onnx"
    assert format_for_path("model_fp16.xml").name == "openvino"
    assert format_for_path("model.plan").name == "tensorrt"
    with pytest.raises(ConfigError, match="suffix"):
        format_for_path("model.tflite")


def test_precision_rules():
    assert normalize_precision("FP16") == "fp16" and normalize_precision("float32") == "fp32"
    with pytest.raises(ConfigError):
        normalize_precision("fp64")
    assert check_precision("trt", "BF16") == "bf16" and check_precision("ov", "bf16") == "bf16"
    with pytest.raises(ConfigError, match="cannot carry"):
        check_precision("onnx", "bf16")


def test_the_export_table_and_the_config_names_agree():
    assert set(FORMATS) == set(FORMAT_PRECISIONS)
    assert all(fmt.precisions == FORMAT_PRECISIONS[name] for name, fmt in FORMATS.items())


def test_runner_classes_resolve_lazily():
    assert FORMATS["onnx"].runner_class().__name__ == "OnnxRuntimeRunner"
    assert FORMATS["tensorrt"].runner_class().__name__ == "TensorRTRunner"
