"""Students as timm models (timm's folder format) and `hf-hub:` / `local-dir:` names resolved offline."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from singer_deploy.errors import ModelError
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.hub import CONFIG_NAME, WEIGHTS_NAME, resolve_model_source, save_timm_dir

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return load_backbone("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=32, depth=2, num_heads=2)


def _fake_hf_cache(root, repo_id: str, student_model) -> None:
    """The Hugging Face cache layout (models--org--name/{refs/main, snapshots/<commit>/...}), written locally."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    save_timm_dir(student_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_student_folder_loads_with_timm_create_model_and_gives_the_same_features(student, tmp_path):
    weights = save_timm_dir(student.model, tmp_path / "student")
    assert weights == tmp_path / "student" / WEIGHTS_NAME
    config = json.loads((tmp_path / "student" / CONFIG_NAME).read_text())
    assert config["architecture"] == "vit_small_patch14_reg4_dinov2"
    assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["depth"] == 2
    loaded = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True).eval()
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = student.model.forward_features(images)
        assert torch.equal(loaded.forward_features(images), expected)
    # The same folder as a teacher/student spec, through our loader.
    again = load_backbone(f"local-dir:{tmp_path / 'student'}")
    with torch.no_grad():
        assert torch.equal(again(images), student(images))


def test_hf_hub_name_resolves_from_the_local_cache_only(student, tmp_path):
    _fake_hf_cache(tmp_path, "acme/tiny-student", student.model)
    source = resolve_model_source("hf-hub:acme/tiny-student", cache_dir=tmp_path)
    assert source.create_name.startswith("local-dir:") and source.architecture == "vit_small_patch14_reg4_dinov2"
    loaded = timm.create_model(source.create_name, pretrained=True).eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), student.model.forward_features(images))


def test_hf_hub_name_missing_from_the_cache_fails_clearly_without_network(tmp_path):
    with pytest.raises(ModelError, match="not in the local Hugging Face cache") as caught:
        resolve_model_source("hf-hub:acme/never-downloaded", cache_dir=tmp_path)
    assert "hf download acme/never-downloaded" in caught.value.fix
    with pytest.raises(ModelError, match="organisation and a repository"):
        resolve_model_source("hf-hub:no-org")


def test_local_dir_errors_name_the_missing_file(student, tmp_path):
    with pytest.raises(ModelError, match="no timm model folder") as caught:
        load_backbone(f"local-dir:{tmp_path / 'nowhere'}")
    assert "save_for_hf" in caught.value.fix
    save_timm_dir(student.model, tmp_path / "student")
    (tmp_path / "student" / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelError, match="holds no weights"):
        resolve_model_source(f"local-dir:{tmp_path / 'student'}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a timm model config"):
        resolve_model_source(f"local-dir:{tmp_path / 'broken'}")


def test_hub_name_and_weights_file_together_are_rejected(student, tmp_path):
    save_timm_dir(student.model, tmp_path / "student")
    with pytest.raises(ModelError, match="brings its own weights"):
        load_backbone(f"local-dir:{tmp_path / 'student'}", weights=tmp_path / "student" / WEIGHTS_NAME)


def test_plain_timm_names_pass_through():
    source = resolve_model_source("vit_tiny_patch16_224")
    assert source.create_name == "vit_tiny_patch16_224" and not source.has_weights
