"""`singer-deploy export NAME --weights FILE`: any timm ViT exported as it is (no distillation), with overrides,
stage log lines, parity and goldens; and `singer-deploy doctor`."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from singer_deploy.pipeline.cli import EXIT_INPUT, EXIT_OK, main

TINY_KWARGS = "student.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_export_a_timm_model_from_a_weights_file(weights, tmp_path, caplog):
    out = tmp_path / "exported"
    with caplog.at_level("INFO"):
        code = main(["export", "vit_tiny_patch16_224", "--weights", str(weights), "--formats", "onnx",
                     "--out", str(out), TINY_KWARGS, "data.eval_n=12", "export.golden_size=4"])
    assert code == EXIT_OK
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["passed"] and set(manifest["artifacts"]) == {"onnx/fp32"}
    reference = json.loads((out / "goldens" / "reference" / "reference.json").read_text())
    assert reference["inputs"]["shape"] == [4, 3, 32, 32] and "projected" not in reference["outputs"]
    assert "export: ONNX fp32 (torch.onnx, opset 18)" in caplog.text
    assert "goldens: shared reference set of 4 images" in caplog.text and "parity: onnx/fp32" in caplog.text


def test_export_model_errors_are_input_errors(weights, tmp_path, capsys):
    assert main(["export", "vit_tiny_patch16_224", "--weights", str(weights), "--out", str(tmp_path / "a"),
                 TINY_KWARGS, "export.golden_sise=4"]) == EXIT_INPUT
    assert "did you mean 'golden_size'" in capsys.readouterr().err
    assert main(["export", "vit_tiny_patch16_225", "--out", str(tmp_path / "b")]) == EXIT_INPUT
    assert "did you mean" in capsys.readouterr().err


def test_doctor_command_runs(capsys):
    assert main(["doctor"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "ONNX Runtime:" in out and "format onnx:" in out and "format tensorrt:" in out and "CPU:" in out
