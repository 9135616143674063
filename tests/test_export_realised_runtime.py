"""Runners report the precision their runtime really executes, read back from the session / compiled model."""

from __future__ import annotations

from collections import Counter

from singer_deploy.export.realised_runtime import label


def test_labels_name_the_lowest_precision_and_its_share():
    assert label(Counter({"fp32": 14})) == "fp32"
    assert label(Counter({"fp32": 2, "int8": 12})) == "int8 12/14 + fp32"
    assert label(Counter()) == "unknown"


def test_fp32_artifacts_realise_fp32_and_an_fp16_cast_graph_says_what_ort_runs(reg_artifacts, tmp_path):
    from singer_deploy.calibration.onnx_fp16 import convert_onnx_fp16
    from singer_deploy.export.onnx import OnnxRuntimeRunner
    from singer_deploy.export.openvino import OpenVINORunner

    ort_info = OnnxRuntimeRunner(reg_artifacts["onnx"].path, providers=["CPUExecutionProvider"]).load().info
    assert ort_info["realised_precision"] == "fp32" and ort_info["realised_products"]["fp32"] >= 4
    ov_info = OpenVINORunner(reg_artifacts["ov_fp32"], inference_precision="f32").load().info
    assert ov_info["realised_precision"] == "fp32" and ov_info["inference_precision"] == "fp32"
    default = OpenVINORunner(reg_artifacts["ov_fp32"], inference_precision=None).load().info
    # The deployment default is whatever the CPU plugin picks here; the label must agree with its own hint.
    assert default["inference_precision"] in default["realised_precision"]
    fp16 = convert_onnx_fp16(reg_artifacts["onnx"].path, tmp_path / "fp16.onnx")
    fp16_info = OnnxRuntimeRunner(fp16, providers=["CPUExecutionProvider"]).load().info
    assert set(fp16_info["realised_products"]) <= {"fp16", "fp32"} and fp16_info["realised_products"]
