"""ONNX Runtime and OpenVINO artifacts of a register-token student pass their precision gates; runners fail clearly."""

import numpy as np
import pytest

from singer_deploy.errors import ConfigError, DataError, ExportError
from singer_deploy.export.golden import open_runner
from singer_deploy.export.onnx import OnnxRuntimeRunner
from singer_deploy.export.openvino import OpenVINORunner
from singer_deploy.export.parity import compare_outputs
from singer_deploy.export.runner import TorchRunner


@pytest.fixture(scope="module")
def reference(reg_student, reg_images):
    student, projector = reg_student
    return TorchRunner(student, projector=projector).run(reg_images)


def test_onnx_export_is_dynamo_with_named_dynamic_batch(reg_artifacts):
    export = reg_artifacts["onnx"]
    assert export.exporter == "dynamo" and export.fallback_reason is None and export.opset >= 18
    runner = OnnxRuntimeRunner(export.path).load()
    assert runner.output_names == ("cls", "patch_tokens", "projected")
    assert runner.input_chw == (3, 28, 28)
    assert runner.info["exporter"] == "dynamo" and runner.info["provider"] == "CPUExecutionProvider"


def test_onnx_runtime_passes_the_fp32_gate(reg_artifacts, reg_images, reference):
    runner = OnnxRuntimeRunner(reg_artifacts["onnx"].path)
    report = compare_outputs(reference, runner.run(reg_images), "fp32")
    assert report.passed, report.markdown()
    one = runner.run(reg_images[:1])    # the batch axis really is dynamic
    np.testing.assert_allclose(one["patch_tokens"], reference["patch_tokens"][:1], rtol=1e-4, atol=1e-5)


def test_openvino_fp32_ir_passes_the_fp32_gate(reg_artifacts, reg_images, reference):
    runner = OpenVINORunner(reg_artifacts["ov_fp32"]).load()
    # Read back from the compiled model: the f32 hint held, and every product runs in FP32.
    assert runner.info["inference_precision"] == "fp32" and runner.info["realised_precision"] == "fp32"
    report = compare_outputs(reference, runner.run(reg_images), "fp32")
    assert report.passed, report.markdown()


def test_openvino_fp16_ir_passes_fp16_gate_and_really_is_compressed(reg_artifacts, reg_images, reference):
    fp16, fp32 = reg_artifacts["ov_fp16"], reg_artifacts["ov_fp32"]
    assert fp16.with_suffix(".bin").stat().st_size < 0.75 * fp32.with_suffix(".bin").stat().st_size
    outputs = OpenVINORunner(fp16).run(reg_images)
    report = compare_outputs(reference, outputs, "fp16")
    assert report.passed, report.markdown()
    assert report.outputs["patch_tokens"].metrics["max_abs"] > 0     # weights really changed


def test_runner_is_chosen_by_suffix(reg_artifacts):
    assert isinstance(open_runner(reg_artifacts["onnx"].path), OnnxRuntimeRunner)
    assert isinstance(open_runner(reg_artifacts["ov_fp16"]), OpenVINORunner)


@pytest.mark.parametrize("kind", ["onnx", "ov_fp32"])
def test_wrong_input_shape_and_dtype_give_clear_errors(reg_artifacts, reg_images, kind):
    path = reg_artifacts[kind].path if kind == "onnx" else reg_artifacts[kind]
    runner = open_runner(path)
    with pytest.raises(DataError, match=r"fixed image size.*\(B, 3, 28, 28\)"):
        runner.run(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(DataError, match="float32"):
        runner.run(reg_images.astype(np.float64))
    with pytest.raises(DataError, match="rank 4"):
        runner.run(reg_images[0])
    with pytest.raises(DataError, match="NumPy"):
        runner.run(reg_images.tolist())


def test_missing_artifact_files_give_clear_errors(tmp_path, reg_artifacts):
    for runner in (OnnxRuntimeRunner(tmp_path / "nope.onnx"), OpenVINORunner(tmp_path / "nope.xml")):
        with pytest.raises(ExportError, match="does not exist"):
            runner.load()
    lonely = tmp_path / "lonely.xml"
    lonely.write_text(reg_artifacts["ov_fp32"].read_text())
    with pytest.raises(ExportError, match=r"\.bin"):
        OpenVINORunner(lonely).load()
    with pytest.raises(ConfigError):
        open_runner(tmp_path / "model.pb")
    with pytest.raises(ConfigError, match="hint"):
        OpenVINORunner(reg_artifacts["ov_fp32"], inference_precision="int4")


def test_torchscript_fallback_is_used_and_recorded_only_when_dynamo_fails(tmp_path, monkeypatch, reg_images):
    import singer_deploy.export.onnx as onnx_module
    from export_fixtures import tiny_vit

    def broken_dynamo(*args, **kwargs):
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(onnx_module, "_export_dynamo", broken_dynamo)
    student = tiny_vit()
    export = onnx_module.export_onnx(student, tmp_path / "ts.onnx")
    assert export.exporter == "torchscript" and "simulated torch.export failure" in export.fallback_reason
    runner = OnnxRuntimeRunner(export.path)
    assert compare_outputs(TorchRunner(student).run(reg_images), runner.run(reg_images), "fp32").passed
    assert runner.info["exporter"] == "torchscript"


def test_simplify_without_a_simplifier_keeps_the_export(reg_artifacts, reg_images):
    import importlib.util

    from singer_deploy.export.onnx import simplify_onnx

    if importlib.util.find_spec("onnxslim") is not None:
        pytest.skip("onnxslim is installed here: the 'no simplifier' path cannot be shown")
    before = reg_artifacts["onnx"].path.read_bytes()
    simplified, note = simplify_onnx(reg_artifacts["onnx"].path, reg_images)
    assert not simplified and "not installed" in note
    assert reg_artifacts["onnx"].path.read_bytes() == before
