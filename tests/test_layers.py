"""Layer selection, Hungarian mapping, token layouts, grid resampling and projectors."""

from __future__ import annotations

import pytest
import torch

from singer_deploy.models.backbone import load_backbone
from singer_deploy.errors import ModelError
from singer_deploy.method.alignment import (Projectors, TokenAligner, TokenLayout, map_layers, resample_grid,
                                  resolve_teacher_layers)


def test_resolve_teacher_layers_appends_last_and_normalises():
    assert resolve_teacher_layers([17], 24) == [17, 23]
    assert resolve_teacher_layers([-7, 23], 24) == [17, 23]
    assert resolve_teacher_layers([5], 12, append_last=False) == [5]
    with pytest.raises(ModelError, match="24 blocks"):
        resolve_teacher_layers([24], 24)
    with pytest.raises(ModelError, match="12 blocks"):
        resolve_teacher_layers([-13], 12)


@pytest.mark.parametrize("teacher, t_depth, s_depth, expected", [
    ([17, 23], 24, 12, [8, 11]),            # ViT-L -> ViT-S/T (docs/method.md, layer mapping)
    ([8, 11], 12, 12, [7, 10]),             # the reference quirk: the student's last block is not distilled
    ([23, 31], 32, 12, [8, 11]),
    ([23, 31], 32, 24, [17, 22]),
    ([11, 17, 23], 24, 12, [5, 8, 11]),     # FitViT baseline layers
])
def test_hungarian_mapping_matches_reference(teacher, t_depth, s_depth, expected):
    assert map_layers(teacher, t_depth, s_depth) == expected


def test_force_last_pins_last_block():
    assert map_layers([8, 11], 12, 12, force_last=True) == [7, 11]
    assert map_layers([17, 23], 24, 12, force_last=True) == [8, 11]
    assert map_layers([3], 8, 4, force_last=True) == map_layers([3], 8, 4)   # last block not distilled: no change


def test_mapping_errors_name_the_depth():
    with pytest.raises(ModelError, match="2 blocks"):
        map_layers([1, 2, 3], 4, 2)
    with pytest.raises(ModelError, match="4 blocks"):
        map_layers([4], 4, 2)


def _dinov2_reg_teacher(img_size: int):
    return load_backbone("vit_small_patch14_reg4_dinov2", depth=1, embed_dim=48, num_heads=2, img_size=img_size)


def test_token_layouts_of_real_backbones():
    teacher = TokenLayout.of(_dinov2_reg_teacher(28))
    assert teacher == TokenLayout(num_prefix_tokens=5, has_cls=True, grid=(2, 2))
    no_cls = load_backbone("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=2, img_size=32,
                           class_token=False, global_pool="avg")
    assert TokenLayout.of(no_cls) == TokenLayout(num_prefix_tokens=0, has_cls=False, grid=(2, 2))


def test_aligner_with_patch14_teacher_and_patch16_student():
    teacher = TokenLayout.of(_dinov2_reg_teacher(224))                         # /14 -> 16x16, CLS + 4 registers
    student = TokenLayout.of(load_backbone("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2))  # 14x14
    assert teacher.grid == (16, 16) and student.grid == (14, 14)
    aligner = TokenAligner(student, teacher)
    projectors = Projectors([3, 11], student_dim=32, teacher_dim=48, aligner=aligner)
    assert set(projectors.proj.keys()) == {"3", "11"} and projectors.proj["3"].bias is not None
    s_tokens = torch.randn(2, 1 + 14 * 14, 32)
    t_tokens = torch.randn(2, 5 + 16 * 16, 48)
    aligned = projectors(3, s_tokens)
    target = aligner.teacher(t_tokens)
    assert aligned.shape == target.shape == (2, 1 + 256, 48)
    torch.testing.assert_close(target[:, 0], t_tokens[:, 0])                   # CLS compared ...
    torch.testing.assert_close(target[:, 1:], t_tokens[:, 5:])                 # ... registers are not
    torch.testing.assert_close(aligned[:, 0], projectors.proj["3"](s_tokens[:, 0]))
    torch.testing.assert_close(projectors.patches(3, s_tokens), aligned[:, 1:])  # CLS dropped, grid kept


def test_aligner_drops_cls_when_student_has_none():
    teacher = TokenLayout(num_prefix_tokens=1, has_cls=True, grid=(2, 2))
    student = TokenLayout(num_prefix_tokens=0, has_cls=False, grid=(2, 2))
    aligner = TokenAligner(student, teacher)
    t_tokens = torch.randn(1, 5, 8)
    torch.testing.assert_close(aligner.teacher(t_tokens), t_tokens[:, 1:])
    with pytest.raises(ModelError, match="Token count"):
        aligner.student(torch.randn(1, 5, 8))


def test_resample_grid_is_bilinear_and_shape_correct():
    constant = torch.full((2, 14 * 14, 3), 0.7)
    torch.testing.assert_close(resample_grid(constant, (14, 14), (16, 16)), torch.full((2, 256, 3), 0.7))
    # A 2x2 grid upsampled to 4x4 (align_corners=False) keeps the corners and averages in between.
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 4, 1)
    up = resample_grid(grid, (2, 2), (4, 4)).reshape(4, 4)
    assert up[0, 0] == 0.0 and up[3, 3] == 3.0
    torch.testing.assert_close(up[0, 1], torch.tensor(0.25))
    same = torch.randn(1, 4, 2)
    assert resample_grid(same, (2, 2), (2, 2)) is same
