import pytest
import torch

from export_fixtures import tiny_vit
from singer_deploy.models.backbone import load_backbone
from singer_deploy.errors import ModelError
from singer_deploy.export.student import OUTPUT_NAMES, ExportableStudent


def test_outputs_are_last_block_tokens_before_the_final_norm_without_registers():
    vit = tiny_vit()
    assert vit.num_prefix_tokens == 5    # CLS + 4 registers
    wrapper = ExportableStudent(vit).eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        cls, patches = wrapper(x)
        normed = vit.forward_features(x)    # timm: final norm applied to all tokens
    assert wrapper.output_names == OUTPUT_NAMES[:2]
    assert cls.shape == (3, 48) and patches.shape == (3, 4, 48)     # 2x2 grid, registers excluded
    torch.testing.assert_close(vit.norm(patches), normed[:, 5:])
    torch.testing.assert_close(vit.norm(cls), normed[:, 0])
    assert not torch.allclose(patches, normed[:, 5:])               # really the raw (pre-norm) tokens


def test_projector_output_and_backbone_wrapper():
    backbone = load_backbone(tiny_vit())
    projector = torch.nn.Linear(48, 96)
    wrapper = ExportableStudent(backbone, projector).eval()
    with torch.no_grad():
        cls, patches, projected = wrapper(torch.randn(2, 3, 28, 28))
    assert wrapper.output_names == OUTPUT_NAMES
    torch.testing.assert_close(projected, projector(patches))
    assert projected.shape == (2, 4, 96)


def test_wrong_projector_width_and_non_vit_are_rejected():
    with pytest.raises(ModelError, match="projector"):
        ExportableStudent(tiny_vit(), torch.nn.Linear(32, 96))
    with pytest.raises(ModelError, match="VisionTransformer"):
        ExportableStudent(torch.nn.Conv2d(3, 8, 3))
