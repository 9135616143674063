import pytest
import torch

from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.method.metrics import artifact_metrics, high_norm_mask, mask_precision_recall
from singer_deploy.config import PlantedConfig
from singer_deploy.models.planted import build_planted_teacher, trigger_positions


@pytest.fixture(scope="module")
def teacher():
    return build_planted_teacher(PlantedConfig())


@pytest.mark.parametrize("share", [0.02, 0.08])
def test_hnr_finds_planted_tokens_at_and_after_the_artifact_layer(teacher, share):
    images = stack_images(SyntheticShapes(48, flat_share=share, seed=3))
    truth = teacher.artifact_mask(images)
    assert abs(truth.float().mean().item() - share) < 0.01
    layers = list(range(teacher.config.depth))
    with torch.no_grad():
        raw = teacher.backbone.forward_taps(images, layers)
        clean = teacher.clean.forward_taps(images, layers)
    for layer in layers:
        patches = teacher.backbone.split(raw[layer])[1]
        clean_hnr = artifact_metrics(teacher.clean.split(clean[layer])[1])["hnr"]
        assert clean_hnr < 0.005, (layer, clean_hnr)
        if layer < teacher.artifact_layer:
            assert artifact_metrics(patches)["hnr"] < 0.005
        else:
            precision, recall = mask_precision_recall(high_norm_mask(patches), truth)
            assert precision >= 0.95 and recall >= 0.95, (layer, precision, recall)


def test_norm_ratio_matches_rho(teacher):
    images = stack_images(SyntheticShapes(32, flat_share=0.05, seed=4))
    truth = teacher.artifact_mask(images)
    layer = teacher.artifact_layer
    with torch.no_grad():
        norms = teacher.backbone.split(teacher.backbone.forward_taps(images, [layer])[layer])[1].norm(dim=-1)
    ratio = (norms[truth].median() / norms[~truth].median()).item()
    assert ratio == pytest.approx(teacher.config.rho, rel=0.15)


def test_artifact_direction_is_in_the_next_blocks_ffn_nullspace(teacher):
    block = teacher.backbone.model.blocks[teacher.artifact_layer + 1]
    surrogate = (block.mlp.fc2.weight @ block.mlp.fc1.weight).T.double()
    assert (teacher.u.double() @ surrogate).norm() < 1e-5 * surrogate.norm()
    basis = teacher.null_basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert (basis @ teacher.u.double()).norm() == pytest.approx(1.0, abs=1e-6)


def test_u_outside_the_nullspace_knob():
    teacher = build_planted_teacher(PlantedConfig(u_in_null=False))
    assert (teacher.null_basis.double() @ teacher.u.double()).norm() < 1e-6


def test_later_blocks_attend_to_artifacts(teacher):
    """Attention sink: the CLS query puts far more than uniform mass on artifact tokens after the artifact layer."""
    images = stack_images(SyntheticShapes(16, flat_share=0.05, seed=5))
    truth = teacher.artifact_mask(images)
    backbone, layer = teacher.backbone, teacher.artifact_layer + 1
    block = backbone.model.blocks[layer]
    with torch.no_grad():
        tokens = backbone.forward_taps(images, [layer - 1])[layer - 1]
        b, t, d = tokens.shape
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(b, t, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * block.attn.scale).softmax(-1)  # (B, H, T, T)
    cls_to_patches = attn[:, :, 0, backbone.num_prefix_tokens:].mean(1)
    sink_mass = (cls_to_patches * truth).sum(1).mean().item()
    uniform = truth.float().mean().item()
    assert sink_mass > 5 * uniform


def test_deterministic(teacher):
    again = build_planted_teacher(PlantedConfig())
    for a, b in zip(teacher.backbone.state_dict().values(), again.backbone.state_dict().values()):
        assert torch.equal(a, b)


def test_position_trigger_puts_artifacts_on_fixed_positions_whatever_the_image():
    teacher = build_planted_teacher(PlantedConfig(trigger="position", position_share=0.08))
    images = stack_images(SyntheticShapes(16, flat_share=0.02, seed=6))
    truth = teacher.artifact_mask(images)
    assert torch.equal(truth, truth[:1].expand_as(truth)) and truth[0].sum() == 5      # round(0.08 * 64)
    assert not torch.equal(truth, teacher_flat := build_planted_teacher(PlantedConfig()).artifact_mask(images))
    layer = teacher.artifact_layer
    with torch.no_grad():
        patches = teacher.backbone.split(teacher.backbone.forward_taps(images, [layer])[layer])[1]
        clean = teacher.clean.split(teacher.clean.forward_taps(images, [layer])[layer])[1]
    precision, recall = mask_precision_recall(high_norm_mask(patches), truth)
    assert precision >= 0.95 and recall >= 0.95
    assert not high_norm_mask(patches)[teacher_flat & ~truth].any()                    # flat patches stay normal
    assert artifact_metrics(clean)["hnr"] < 0.005                                      # as the content twin


def test_unknown_trigger_is_a_config_error():
    from singer_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="trigger"):
        PlantedConfig(trigger="both")


FAMILIES = {
    "two mechanisms": PlantedConfig(second_layer=6),
    "grown": PlantedConfig(artifact_layer=3, grow_blocks=3),
    "image-dependent": PlantedConfig(varying_dims=3),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_have_their_clusters_and_a_clean_twin(name):
    """Each cluster is high-norm from its first writer block on (and not before), the clean twin has none anywhere,
    and normal tokens stay close to the twin's."""
    teacher = build_planted_teacher(FAMILIES[name])
    images = stack_images(SyntheticShapes(32, flat_share=0.08, seed=7))
    masks = teacher.cluster_masks(images)
    union = teacher.artifact_mask(images)
    layers = list(range(teacher.config.depth))
    with torch.no_grad():
        raw = teacher.backbone.forward_taps(images, layers)
        clean = teacher.clean.forward_taps(images, layers)
    for layer in layers:
        patches, twin = teacher.backbone.split(raw[layer])[1], teacher.clean.split(clean[layer])[1]
        assert artifact_metrics(twin)["hnr"] < 0.005, layer
        norms = patches.norm(dim=-1)
        normal = norms[~union].median()
        for cluster in teacher.clusters:
            ratio = (norms[masks[cluster.name]].median() / normal).item()
            assert (ratio > 3.0) == (layer >= cluster.first_block), (cluster.name, layer, ratio)
        cos = torch.nn.functional.cosine_similarity(patches[~union], twin[~union], dim=-1)
        assert cos.mean() > 0.99


def test_two_mechanisms_write_different_directions_at_their_own_blocks():
    teacher = build_planted_teacher(FAMILIES["two mechanisms"])
    assert [(c.name, c.trigger, c.first_block) for c in teacher.clusters] == [("main", "content", 4),
                                                                               ("position", "position", 6)]
    content, position = (w.direction for w in teacher.writers)
    assert abs(float(content @ position)) < 1e-6
    images = stack_images(SyntheticShapes(16, flat_share=0.08, seed=8))
    masks = teacher.cluster_masks(images)
    assert torch.equal(masks["position"], trigger_positions(teacher.config).expand_as(masks["position"]))
    with torch.no_grad():
        gap = teacher.backbone.split(teacher.backbone.forward_taps(images, [7])[7])[1] - \
            teacher.clean.split(teacher.clean.forward_taps(images, [7])[7])[1]
    only_position = masks["position"] & ~masks["main"]
    along = torch.nn.functional.cosine_similarity(gap[only_position], position.expand(int(only_position.sum()), -1))
    assert along.abs().min() > 0.95                       # the position cluster's artifact lies along its direction


def test_grown_artifact_turns_from_block_to_block():
    teacher = build_planted_teacher(FAMILIES["grown"])
    blocks = [w.block for w in teacher.writers]
    assert blocks == [3, 4, 5]
    directions = torch.stack([w.direction for w in teacher.writers])
    cos = directions @ directions.T
    assert torch.allclose(torch.diagonal(cos, 1), torch.full((2,), 0.5), atol=1e-5)     # 60 degrees apart


def test_image_dependent_part_varies_from_token_to_token_within_its_directions():
    teacher = build_planted_teacher(FAMILIES["image-dependent"])
    images = stack_images(SyntheticShapes(32, flat_share=0.08, seed=9))
    mask = teacher.artifact_mask(images)
    writer = teacher.writers[0]
    with torch.no_grad():
        layer = teacher.artifact_layer
        gap = (teacher.backbone.split(teacher.backbone.forward_taps(images, [layer])[layer])[1] -
               teacher.clean.split(teacher.clean.forward_taps(images, [layer])[layer])[1])[mask]
        normal = teacher.clean.split(teacher.clean.forward_taps(images, [layer])[layer])[1][~mask].norm(dim=-1)
    varying = gap @ writer.varying.T                                       # (tokens, varying_dims)
    spread = (varying - varying.mean(0)).square().sum(-1).mean().sqrt() / normal.median()
    assert spread > 2.0                                                   # several normal norms, token to token
    fixed = gap - varying @ writer.varying
    assert torch.nn.functional.cosine_similarity(fixed, writer.direction.expand_as(fixed)).min() > 0.99


def test_family_settings_are_validated():
    from singer_deploy.errors import ConfigError

    for bad in (dict(second_layer=4), dict(second_layer=6, trigger="position"), dict(grow_blocks=4),
                dict(varying_dims=8), dict(varying_dims=2, u_in_null=False), dict(grow_blocks=0)):
        with pytest.raises(ConfigError):
            PlantedConfig(**bad)


@pytest.fixture(scope="module")
def real_size_narrow():
    """The real-size preset (DINOv2 ViT-L/14's depth, heads, patch, 224 px and LayerScale) at width 64 (the test
    suite's budget), and its grown variant."""
    from singer_deploy.config import planted_preset

    return {grow: build_planted_teacher(planted_preset("vit_l14", embed_dim=64, grow_blocks=grow)) for grow in (1, 3)}


def test_real_size_preset_has_the_paper_teachers_shape_and_writes_mid_depth(real_size_narrow):
    teacher = real_size_narrow[1]
    model = teacher.backbone.model
    assert (teacher.backbone.depth, len(model.blocks), model.blocks[0].attn.num_heads) == (24, 24, 16)
    assert type(model.blocks[0].ls1).__name__ == "LayerScale"
    assert [w.block for w in teacher.writers] == [10]
    assert [w.block for w in real_size_narrow[3].writers] == [10, 11, 12]
    images = stack_images(SyntheticShapes(8, 224, 14, flat_share=0.02, seed=5))
    with torch.no_grad():
        taps = teacher.backbone.forward_taps(images, [9, 10, 17, 23])
        twin = teacher.clean.forward_taps(images, [10, 23])
    assert taps[23].shape == (8, 257, 64)                   # CLS + 256 patch tokens
    for grow, planted in real_size_narrow.items():
        mask = planted.artifact_mask(images)
        assert 0.005 < mask.float().mean() < 0.05             # about 2% of the patches
        layer = 9 + grow
        with torch.no_grad():
            norms = planted.backbone.split(planted.backbone.forward_taps(images, [9, layer])[layer])[1].norm(dim=-1)
        assert norms[mask].median() / norms[~mask].median() == pytest.approx(10.0, rel=0.15)
    norms = {layer: teacher.backbone.split(taps[layer])[1].norm(dim=-1) for layer in taps}
    assert (norms[9][mask].median() / norms[9][~mask].median()) < 1.5          # nothing before the writer
    for layer in (10, 23):
        clean = teacher.clean.split(twin[layer])[1]
        twin_norms = clean.norm(dim=-1)
        assert twin_norms[mask].median() / twin_norms[~mask].median() < 1.5, layer      # the twin has none
        cos = torch.nn.functional.cosine_similarity(teacher.backbone.split(taps[layer])[1][~mask], clean[~mask],
                                                    dim=-1)
        assert cos.mean() > 0.99


def test_real_size_preset_is_reachable_from_the_run_config():
    from singer_deploy.config import ModelSpec, planted_preset
    from singer_deploy.errors import ConfigError

    spec = ModelSpec(name="planted", planted={"preset": "vit_l14", "grow_blocks": 3})
    assert spec.planted_config() == planted_preset("vit_l14", grow_blocks=3)
    assert (spec.planted_config().depth, spec.planted_config().init_values) == (24, 0.1)
    with pytest.raises(ConfigError, match="preset"):
        ModelSpec(name="planted", planted={"preset": "vit_h14"}).planted_config()
    with pytest.raises(ConfigError, match="init_values"):
        PlantedConfig(init_values=0.0)
