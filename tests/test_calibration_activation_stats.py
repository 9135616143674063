"""Activation-range statistics: a planted high-norm token shows up as a large token max/median ratio and few
INT8 levels for ordinary tokens; the artifact study reports both for two students."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from singer_deploy.calibration.activation_stats import activation_range_stats, residual_blocks, summarize_ranges


class _Toy(nn.Module):
    """A token MLP whose input can carry one planted artifact token (100x the others)."""

    def __init__(self, artifact: bool):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.artifact = artifact

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)                 # (B, 16, 8)
        if self.artifact:
            tokens = tokens.clone()
            tokens[:, 0] *= 100.0
        return self.fc(tokens)


def test_planted_artifact_token_dominates_the_range():
    images = np.random.default_rng(0).normal(size=(20, 8, 4, 4)).astype(np.float32)
    clean = activation_range_stats(_Toy(False), images, batch_size=6)["fc"]
    dirty = activation_range_stats(_Toy(True), images, batch_size=6)["fc"]
    assert dirty.tokens == clean.tokens == 20 * 16
    assert dirty.token_max_over_median > 20 * clean.token_max_over_median
    assert dirty.median_token_levels < 5 < clean.median_token_levels
    assert clean.p999_abs <= clean.max_abs


def test_vit_stats_cover_every_linear_in_forward_order():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=48, num_heads=2, num_classes=0)
    images = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    stats = activation_range_stats(vit, images)
    assert list(stats)[:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert len(stats) == 8 and vit.training is True        # the caller's train/eval mode is restored
    summary = summarize_ranges(stats)
    assert summary["token_max_over_median_max"] >= 1.0 and set(summary["layers"]) == set(stats)
    residual = activation_range_stats(vit, images, layers=residual_blocks, capture="output")
    assert list(residual) == ["blocks.0", "blocks.1"] and residual["blocks.0"].tokens == 4 * (16 + 1)


def test_int8_artifact_study_reports_both_students(tmp_path):
    from singer_deploy.calibration.study import int8_artifact_study
    from singer_deploy.models.data import SyntheticShapes

    data = SyntheticShapes(n=40, img_size=32, patch_size=8, seed=0)
    images = np.stack([data[i]["image"].numpy() for i in range(40)]).astype(np.float32)
    torch.manual_seed(0)
    make = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,  # noqa
                                     depth=2, embed_dim=48, num_heads=2, num_classes=0).eval()
    result = int8_artifact_study(make(), make(), images[:32], images[32:], names=("fitnet", "singer"),
                                 backends=("onnx",), work_dir=tmp_path)
    assert set(result) == {"fitnet", "singer"}
    assert result["singer"]["calibration"] == {"calibration_images": 32, "eval_images": 8, "overlap": 0,
                                               "checked_by": "per-image sha256 of the float32 pixels"}
    for entry in result.values():
        onnx_entry = entry["backends"]["onnx"]
        assert 0.9 < onnx_entry["normal_token_cosine"] <= 1.0 + 1e-6
        assert onnx_entry["realised"]["violations"] == []
        assert "token_max_over_median_max" in entry["activation_ranges"]
        assert set(entry["residual_ranges"]["layers"]) == {"blocks.0", "blocks.1"}
        assert set(entry["fp32_artifact_metrics"]) == {"hnr", "r_max", "e_out"}


def test_int8_study_refuses_to_compare_on_calibration_images():
    from singer_deploy.calibration.study import out_of_sample_record
    from singer_deploy.errors import DataError

    images = np.random.default_rng(0).normal(size=(10, 3, 8, 8)).astype(np.float32)
    assert out_of_sample_record(images[:6], images[6:])["overlap"] == 0
    with pytest.raises(DataError, match="2 of 5 evaluation images are calibration images"):
        out_of_sample_record(images[:6], images[4:9])
