"""export_student end to end on a tiny student, the reduced-precision converters it is given, and early failures."""

import json
import shutil

import numpy as np
import pytest

from export_fixtures import shape_images, tiny_vit
from singer_deploy.errors import BackendUnavailableError, ConfigError, DataError, ParityError
from singer_deploy.export.golden import verify
from singer_deploy.export.pipeline import export_student


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    student = tiny_vit("vit_tiny_patch16_224", img_size=32)
    images = shape_images(12, 32, 16)
    out = tmp_path_factory.mktemp("pipeline")
    return student, images, export_student(student, out, ("onnx", "ov"), img_size=32, parity_images=images)


def test_onnx_and_openvino_artifacts_pass_with_goldens_and_manifest(exported):
    _, _, result = exported
    assert set(result.artifacts) == {"onnx/fp32", "openvino/fp32", "openvino/fp16"}
    assert result.passed, {k: r.failures() for k, r in result.reports.items()}
    assert result.artifacts["onnx/fp32"].exporter == "torch.onnx dynamo"
    assert result.artifacts["openvino/fp16"].parity.precision == "fp16"
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["passed"] and manifest["artifacts"]["onnx/fp32"]["parity"]["passed"]
    for record in result.artifacts.values():
        assert record.path.is_file()
        report = verify(record.path, record.golden_dir)
        assert report.passed and report.notes["environment_diff"] == {}
        assert report.notes["artifact_changed"] is False
    result.raise_if_failed()


def test_goldens_share_one_reference_set_of_the_chosen_size(exported, tmp_path):
    student, images, result = exported
    reference = result.out_dir / "goldens" / "reference"
    assert sorted(p.name for p in reference.iterdir()) == ["golden.npz", "reference.json"]
    assert json.loads((reference / "reference.json").read_text())["inputs"]["shape"] == [12, 3, 32, 32]
    for record in result.artifacts.values():
        assert not (record.golden_dir / "golden.npz").exists()
        assert json.loads((record.golden_dir / "manifest.json").read_text())["arrays"] == "../reference/golden.npz"
    small = export_student(student, tmp_path, ("onnx",), img_size=32, parity_images=images, golden_size=4,
                           polygraphy_goldens=True)
    bundle = json.loads((small.artifacts["onnx/fp32"].golden_dir / "manifest.json").read_text())
    assert bundle["inputs"]["shape"] == [4, 3, 32, 32]
    assert bundle["polygraphy_command"].startswith(f"polygraphy run {small.artifacts['onnx/fp32'].path} --onnxrt")
    assert (tmp_path / "goldens" / "reference" / "polygraphy_outputs.json").is_file()
    assert verify(small.artifacts["onnx/fp32"].path, small.artifacts["onnx/fp32"].golden_dir).passed
    with pytest.raises(ConfigError, match="golden_size"):
        export_student(student, tmp_path / "zero", ("onnx",), img_size=32, parity_images=images, golden_size=0)


def test_a_policy_override_gates_its_precision_only_and_raises(exported, tmp_path):
    from singer_deploy.config import ParityPolicy

    student, images, _ = exported
    unreachable = ParityPolicy.for_precision("fp32", image_cos_min=1.5)   # no cosine can reach it
    result = export_student(student, tmp_path, ("openvino",), img_size=32, parity_images=images,
                            policy=unreachable, write_goldens=False)
    assert not result.artifacts["openvino/fp32"].parity.passed
    assert result.artifacts["openvino/fp16"].parity.passed    # other precisions keep their default gate
    with pytest.raises(ParityError, match="openvino/fp32"):
        result.raise_if_failed()


def test_the_result_keeps_the_runners_parity_opened(exported):
    _, images, result = exported
    assert set(result.runners) == set(result.artifacts)
    for key, runner in result.runners.items():
        assert runner is result.artifacts[key].runner and runner.info == result.artifacts[key].runner_info
    assert result.reference is not None and result.reference.output_names
    assert set(result.reference.run(images[:1])) == set(result.runners["onnx/fp32"].run(images[:1]))


def test_parity_rows_are_the_reports_table_rows(exported):
    _, _, result = exported
    rows = result.parity_rows()
    assert rows == [row for a in result.artifacts.values() for row in a.parity.table_rows()]
    assert {row["candidate"] for row in rows} == set(result.artifacts)


def test_reduced_precision_onnx_goes_through_the_given_converter(exported, tmp_path):
    student, images, result = exported
    calls = []

    def fake_fp16(fp32_onnx, out_path, calib):
        # Stands in for singer_deploy.calibration: an FP32 copy trivially meets the FP16 gate.
        calls.append((fp32_onnx.name, out_path.name, None if calib is None else calib.shape))
        shutil.copy(fp32_onnx, out_path)
        return out_path

    out = export_student(student, tmp_path, ("onnx",), img_size=32, precision="fp16", calib_images=images[:4],
                         parity_images=images, write_goldens=False, converters={("ort", "FP16"): fake_fp16})
    assert calls == [("student.onnx", "student_fp16.onnx", (4, 3, 32, 32))]
    assert set(out.artifacts) == {"onnx/fp16"} and out.passed
    assert out.artifacts["onnx/fp16"].exporter.endswith("fake_fp16")


def test_impossible_requests_fail_before_any_work(exported, tmp_path):
    student, images, _ = exported
    with pytest.raises(ConfigError, match="No converter produces int8 onnx"):
        export_student(student, tmp_path, ("onnx",), img_size=32, precision="int8", parity_images=images)
    with pytest.raises(ConfigError, match="No converter produces int8 openvino"):
        export_student(student, tmp_path, ("ov",), img_size=32, precision="int8", parity_images=images,
                       converters={("onnx", "int8"): lambda *args: None})
    with pytest.raises(ConfigError, match="Unknown export format"):
        export_student(student, tmp_path, ("tflite",), img_size=32, parity_images=images)
    with pytest.raises(ConfigError, match="img_size"):
        export_student(student, tmp_path, ("onnx",), img_size=64, parity_images=images)
    with pytest.raises(DataError, match="fixed image size"):
        export_student(student, tmp_path, ("onnx",), img_size=32, parity_images=shape_images(4, 64, 16))
    with pytest.raises(DataError, match="float32"):
        export_student(student, tmp_path, ("onnx",), img_size=32, parity_images=images.astype(np.float16))
    assert not any(tmp_path.iterdir())


def test_tensorrt_on_a_cpu_machine_is_refused_up_front(exported, tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and CUDA are available here: the refusal path cannot be shown")
    student, images, _ = exported
    with pytest.raises(BackendUnavailableError, match="not available here"):
        export_student(student, tmp_path / "trt", ("onnx", "trt"), img_size=32, parity_images=images)
    assert not (tmp_path / "trt").exists()
