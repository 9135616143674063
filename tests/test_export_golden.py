"""Golden bundles round-trip, catch a perturbed model, detect tampering; the pytest fixture gates artifacts."""

import copy
import json

import numpy as np
import pytest
import torch

from singer_deploy.errors import ExportError
from singer_deploy.export.golden import environment_fingerprint, load_golden, verify, write_golden
from singer_deploy.export.onnx import export_onnx
from singer_deploy.config import ParityPolicy
from singer_deploy.export.runner import TorchRunner


@pytest.fixture(scope="module")
def bundle(reg_student, reg_images, reg_artifacts, tmp_path_factory):
    student, projector = reg_student
    reference = TorchRunner(student, projector=projector).run(reg_images)
    return write_golden(tmp_path_factory.mktemp("golden") / "onnx-fp32", inputs=reg_images,
                        reference_outputs=reference, policy=ParityPolicy.for_precision("fp32"),
                        artifact_path=reg_artifacts["onnx"].path, model=student)


def test_bundle_round_trips(bundle, reg_images):
    loaded = load_golden(bundle)
    np.testing.assert_array_equal(loaded.inputs, reg_images)
    assert set(loaded.outputs) == {"cls", "patch_tokens", "projected"}
    assert loaded.policy == ParityPolicy.for_precision("fp32")
    manifest = loaded.manifest
    assert manifest["environment"]["onnxruntime"] and manifest["environment"]["torch"]
    assert len(manifest["artifact"]["sha256"]) == 64 and len(manifest["model_sha256"]) == 64
    assert not list(bundle.glob(".*.tmp"))     # atomic writes leave no temporaries


def test_verify_passes_the_exported_artifact_and_notes_the_environment(bundle, reg_artifacts):
    report = verify(reg_artifacts["onnx"].path, bundle)
    assert report.passed, report.markdown()
    assert report.notes["artifact_changed"] is False
    assert report.notes["environment_diff"] == {"device": {"golden": "cpu", "now": "CPUExecutionProvider"}}


def test_verify_catches_a_perturbed_model(bundle, reg_student, tmp_path):
    student, projector = reg_student
    perturbed = copy.deepcopy(student)
    with torch.no_grad():
        perturbed.blocks[1].mlp.fc2.weight.add_(0.01 * torch.randn_like(perturbed.blocks[1].mlp.fc2.weight))
    path = export_onnx(perturbed, tmp_path / "perturbed.onnx", projector=projector).path
    report = verify(path, bundle)
    assert not report.passed
    assert report.notes["artifact_changed"] is True
    assert any("max_abs_rel" in f for f in report.failures())


def test_tampered_or_missing_bundle_is_refused(bundle, tmp_path):
    with pytest.raises(ExportError, match="Not a golden bundle"):
        load_golden(tmp_path)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["arrays_sha256"] = "0" * 64
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    (copy_dir / "golden.npz").write_bytes((bundle / "golden.npz").read_bytes())
    with pytest.raises(ExportError, match="do not match"):
        load_golden(copy_dir)


def test_environment_fingerprint_has_the_runtime_versions():
    env = environment_fingerprint("CPU")
    assert env["device"] == "CPU" and env["openvino"] and env["python"]


def test_golden_check_fixture_passes_and_fails(golden_check, bundle, reg_artifacts):
    report = golden_check(reg_artifacts["ov_fp32"], bundle)
    assert report.passed
    with pytest.raises(pytest.fail.Exception, match="FAIL"):
        golden_check(reg_artifacts["ov_fp16"], bundle)    # FP16 weights do not meet the bundle's FP32 gate
