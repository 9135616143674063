"""Trained planted teachers (models/planted_training.py): they learn the shapes task, keep every planted weight,
write their artifacts at rho, and are trained once per recipe (docs/planted_teacher.md, "Trained teachers")."""

from dataclasses import replace

import pytest
import torch

from singer_deploy.config import PlantedConfig, PlantedTraining, from_mapping
from singer_deploy.errors import ConfigError
from singer_deploy.evaluation.probes import evaluate_backbone
from singer_deploy.hashing import module_sha256
from singer_deploy.models import planted_training
from singer_deploy.models.data import SyntheticShapes
from singer_deploy.models.planted import build_planted_teacher, calibration_images
from singer_deploy.models.planted_training import PlantedFreeze, planted_teacher, recipe_key, trained_planted_teacher

# A tiny teacher (32 px, patch 4, width 48, 4 blocks) and recipe: about ten seconds of training on one core.
TINY = PlantedConfig(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=2, artifact_layer=2,
                     training=PlantedTraining(steps=150, images=512, batch_size=32, lr=1e-2, rescale_every=50))
# In 150 steps the tiny teacher learns where the shape is, not yet which shape it is (image accuracy stays near chance,
# as for the untrained one): the held-out dense probes must beat the untrained teacher's by these margins (measured
# on an AMD EPYC host, 2026-12-06: fg mIoU 0.55 -> 0.79, class mIoU 0.18 -> 0.25).
FG_MARGIN, CLASS_MARGIN = 0.15, 0.04


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("planted-cache")


@pytest.fixture(scope="module")
def trained(cache):
    return trained_planted_teacher(TINY, cache_dir=cache)


def _held_out(config, n=192):
    return SyntheticShapes(n, config.img_size, config.patch_size, flat_share=0.08, seed=123_456)


def test_the_tiny_recipe_learns_the_task_on_held_out_images(trained):
    held_out = _held_out(TINY)
    last = TINY.depth - 1
    before = evaluate_backbone(build_planted_teacher(TINY).backbone, held_out, layer=last)
    after = evaluate_backbone(trained.backbone, held_out, layer=last)
    assert after["dense_fg_miou"] >= before["dense_fg_miou"] + FG_MARGIN, (before, after)
    assert after["dense_class_miou"] >= before["dense_class_miou"] + CLASS_MARGIN, (before, after)


def test_every_planted_weight_is_kept(trained):
    built = build_planted_teacher(TINY)
    reference, frozen = PlantedFreeze(built), PlantedFreeze(trained)
    rescaled = {(w.block, n) for w in trained.writers for n in w.neurons}   # checked in the rho test
    exact = 0
    for (param, mask), (ref_param, _) in zip(frozen.entries, reference.entries):
        mask = mask.clone()
        for block, neuron in rescaled:
            if param is trained.backbone.model.blocks[block].mlp.fc2.weight:
                mask[:, neuron] = False
        assert torch.equal(param.detach()[mask], ref_param.detach()[mask]), "a frozen planted entry moved"
        exact += int(mask.sum())
    assert exact > 1000
    model, dim = trained.backbone.model, TINY.embed_dim
    for block in model.blocks[TINY.artifact_layer + 1:]:
        assert (block.mlp.fc1.weight @ trained.null_basis.T).abs().max() < 1e-5   # the FFN still ignores N
        assert (block.attn.qkv.weight[2 * dim:] @ trained.u).abs().max() < 1e-5    # the values ignore u
    for block, ref_block in zip(model.blocks[TINY.artifact_layer + 1:], built.backbone.model.blocks[3:]):
        sink, ref_sink = (b.attn.qkv.weight[dim:2 * dim] @ trained.u for b in (block, ref_block))
        assert torch.allclose(sink, ref_sink, atol=1e-5)                            # the attention sinks stay
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p, dict(built.backbone.model.named_parameters())[n])]
    assert len(changed) > 10, "training changed almost nothing"


def test_the_writers_are_rescaled_to_rho(trained):
    images = calibration_images(TINY)
    backbone, writer = trained.backbone, trained.writers[0]
    norms = backbone.split(backbone.forward_taps(images, [writer.block])[writer.block])[1].norm(dim=-1)
    mask = trained.artifact_mask(images)
    assert (norms[mask].median() / norms[~mask].median()).item() == pytest.approx(TINY.rho, rel=0.01)
    fc2 = backbone.model.blocks[writer.block].mlp.fc2.weight
    assert torch.allclose(fc2[:, writer.neurons[0]], writer.scale * writer.direction)
    assert writer.scale != build_planted_teacher(TINY).writers[0].scale   # re-scaled for the trained tokens
    clean = trained.clean.model.blocks[writer.block].mlp.fc2.weight
    assert clean[:, list(writer.neurons)].abs().max() == 0 and torch.equal(clean[:, 100:], fc2[:, 100:])


def test_the_cache_is_hit_and_missed_by_recipe(trained, cache, monkeypatch):
    (path,) = cache.glob("planted-*.safetensors")
    stamp = path.stat().st_mtime_ns

    def no_training(_planted):
        raise AssertionError("trained again although the cache holds this recipe")

    monkeypatch.setattr(planted_training, "train_planted", no_training)
    again = trained_planted_teacher(TINY, cache_dir=cache)
    assert module_sha256(again.backbone.model) == module_sha256(trained.backbone.model)
    assert [w.scale for w in again.writers] == [w.scale for w in trained.writers]
    assert path.stat().st_mtime_ns == stamp
    changed = replace(TINY, training=replace(TINY.training, steps=2))
    assert recipe_key(changed) != recipe_key(TINY)
    with pytest.raises(AssertionError, match="trained again"):
        trained_planted_teacher(changed, cache_dir=cache)


def test_the_cache_dir_is_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv(planted_training.CACHE_ENV, str(tmp_path))
    assert planted_training.planted_cache_dir() == tmp_path


def test_untrained_by_default_and_recipe_from_yaml():
    assert module_sha256(planted_teacher(PlantedConfig()).backbone.model) == \
        module_sha256(build_planted_teacher(PlantedConfig()).backbone.model)
    config = from_mapping(PlantedConfig, {"training": {"steps": 300, "images": 1024}}, "teacher.planted.")
    assert config.training == PlantedTraining(steps=300, images=1024)
    with pytest.raises(ConfigError, match="steps"):
        from_mapping(PlantedConfig, {"training": {"steps": -1}}, "teacher.planted.")
