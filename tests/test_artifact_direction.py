"""The "direction" outlier target: the artifact direction estimated where the teacher writes it, the loss on
hand-made tokens, and a distillation run that records the estimate. Small planted teacher (artifacts at block 2)."""

from __future__ import annotations

import json

import pytest
import torch

from singer_deploy.config import PlantedConfig, SingerConfig, TrainConfig
from singer_deploy.errors import ConfigError, ModelError
from singer_deploy.method.alignment import TokenAligner, TokenLayout
from singer_deploy.method.artifact_direction import (ArtifactDirection, direction_loss,
                                                     estimate_artifact_directions)
from singer_deploy.method.losses import SingerLoss
from singer_deploy.method.metrics import high_norm_mask
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import build_planted_teacher
from singer_deploy.train.loop import distill

LAYERS = [2, 3]


def _batches(share: float, n: int = 64) -> list[torch.Tensor]:
    return list(stack_images(SyntheticShapes(n, 32, 8, flat_share=share, seed=3)).split(16))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).abs())


def test_direction_is_found_at_the_writing_block_and_beats_the_layers_mean_difference(small_planted):
    teacher = small_planted.backbone
    batches = _batches(0.08)
    found = estimate_artifact_directions(teacher, batches, LAYERS, select_k=4.0)
    for layer in LAYERS:
        artifact = found[layer]
        assert artifact.block == small_planted.artifact_layer
        assert 0.9 < artifact.block_share < 1.1        # one block writes the artifact; the rest is content
        assert artifact.artifact_tokens > 0 and artifact.normal_tokens > artifact.artifact_tokens
        # The plain difference of means at the layer, for comparison: flat patches' own content biases it.
        with torch.no_grad():
            patches = torch.cat([teacher.forward_taps(b, [layer])[layer][:, 1:] for b in batches])
        selected = high_norm_mask(patches, 4.0)
        plain = patches[selected].mean(0) - patches[~selected].mean(0)
        assert _cos(artifact.direction, small_planted.u) > 0.9999
        assert _cos(artifact.direction, small_planted.u) > _cos(plain, small_planted.u)
        # level: the normal tokens' mean component along the direction, small next to the artifact's.
        along = patches[~selected] @ artifact.direction
        assert artifact.level == pytest.approx(float(along.mean()), rel=1e-3, abs=1e-5)


def test_position_triggered_artifacts_are_found_too():
    planted = build_planted_teacher(PlantedConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, artifact_layer=2,
                                                  null_dim=4, trigger="position", position_share=0.125))
    found = estimate_artifact_directions(planted.backbone, _batches(0.0), LAYERS, select_k=4.0)
    assert all(_cos(found[layer].direction, planted.u) > 0.9999 for layer in LAYERS)


def test_a_teacher_without_artifacts_has_no_direction_and_a_zero_loss(small_planted):
    found = estimate_artifact_directions(small_planted.clean, _batches(0.08), LAYERS, select_k=4.0)
    assert found == {2: None, 3: None}
    refined = torch.randn(2, 4, 8, requires_grad=True)
    loss = direction_loss(refined, refined.detach(), torch.ones(2, 4, dtype=torch.bool), None)
    assert loss.item() == 0.0
    loss.backward()                                                     # a graph, so the step still runs


def test_direction_loss_hand_values():
    # Two normal tokens and one artifact: 10 along d = e_1 on top of content e_0; normal level along d is 0.5.
    raw = torch.tensor([[[1.0, 0.5], [2.0, 0.5], [1.0, 10.0]]])
    selected = torch.tensor([[False, False, True]])
    artifact = ArtifactDirection(torch.tensor([0.0, 1.0]), level=0.5, block=0, block_share=1.0, artifact_tokens=1,
                                 normal_tokens=2)
    # Target for the artifact: [1, 0.5] (content kept, d component at the normal level), |T|^2 = 1.25.
    assert direction_loss(raw, raw, selected, artifact).item() == pytest.approx(9.5 ** 2 / 1.25)
    refined = torch.tensor([[[1.0, 0.5], [2.0, 0.5], [1.0, 0.5]]])
    assert direction_loss(refined, raw, selected, artifact).item() == pytest.approx(0.0)
    # A shrink that keeps the direction is not what the target asks for: half the norm, still mostly along d.
    shrunk = raw.clone()
    shrunk[0, 2] = raw[0, 2] / 2
    assert direction_loss(shrunk, raw, selected, artifact).item() > 10.0
    # Relative: the same picture at 10x the scale gives the same loss.
    scaled = ArtifactDirection(artifact.direction, level=5.0, block=0, block_share=1.0, artifact_tokens=1,
                               normal_tokens=2)
    assert direction_loss(raw * 10, raw * 10, selected, scaled).item() == pytest.approx(9.5 ** 2 / 1.25)


def test_singer_loss_without_directions_is_a_clear_error(small_planted):
    teacher = small_planted.backbone
    layout = TokenLayout.of(teacher)
    raw = teacher.forward_taps(_batches(0.08)[0], LAYERS)
    loss = SingerLoss(SingerConfig(rank=4, outlier_target="direction"), LAYERS, teacher, TokenAligner(layout, layout))
    with pytest.raises(ModelError, match="artifact direction of every distilled layer"):
        loss(raw, raw, raw)


def test_direction_batches_is_validated():
    with pytest.raises(ConfigError, match="direction_batches"):
        SingerConfig(direction_batches=0)


def test_distillation_estimates_and_records_the_direction(small_planted, tmp_path):
    torch.manual_seed(0)
    student = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    singer = SingerConfig(rank=4, outlier_target="direction", info_tokens="normal", adapter_init="remove",
                          direction_batches=2)
    train = TrainConfig(steps=3, batch_size=8, warmup_steps=1, log_every=1, device="cpu")
    result = distill(small_planted.backbone, student, SyntheticShapes(32, 32, 8, flat_share=0.08, seed=1), tmp_path,
                     layers=[2], singer=singer, train=train, progress=False)
    recorded = json.loads(result.files["distill_config"].read_text())["diagnostics"]["artifact_direction"]
    assert set(recorded) == {"2", "3"}
    assert all(entry["block"] == small_planted.artifact_layer and entry["artifact_tokens"] > 0
               for entry in recorded.values())
