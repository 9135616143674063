"""Token selection from the data (method/selection.py, docs/method.md "Token selection"): the candidate writes on
hand-made updates, the component ratio and threshold with known answers, and the whole selection on planted
teachers at weak and strong artifact strengths, against the ground truth, and on their clean twins."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from singer_deploy.config import PlantedConfig, SingerConfig
from singer_deploy.method.artifact_subspace import SubspaceEstimator, estimate_artifact_subspaces
from singer_deploy.method.metrics import mask_precision_recall
from singer_deploy.method.selection import (BAND_SHARE, GAP_RATIO, MIN_COMPONENT, SELECT_FACTOR, WRITE_SIZE,
                                            component_ratios, in_band, selection_threshold, write_cut, write_outliers)
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import build_planted_teacher

BASE = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, artifact_layer=2, null_dim=6)
LAYERS = [2, 4]


def test_a_write_that_stands_out_at_its_block_is_a_candidate():
    torch.manual_seed(0)
    updates = [torch.randn(2, 50, 8) * (1 + torch.rand(2, 50, 1)) for _ in range(3)]
    updates[0][0, 7] *= 1000.0          # block 0 is the patch embedding: its size is content, never a candidate
    updates[2][1, 3] += 400.0           # a write at block 2 on token 3 of image 1
    found = write_outliers(updates)
    assert found.tolist() == [[False] * 50, [i == 3 for i in range(50)]]
    # A uniformly larger image is not an outlier: every ratio is to the image's own median update.
    updates[1][0] *= 50.0
    assert write_outliers(updates).tolist() == found.tolist()


def test_a_block_writes_the_tokens_above_a_wide_gap_not_a_heavy_tail():
    """write_cut on hand-made score distributions: a cluster apart from the bulk is cut at the gap's middle; a
    continuous heavy tail reaching 20 deviations (a trained teacher's early block) and a Gaussian bulk write nothing;
    one token a little above the bulk is not a write."""
    generator = torch.Generator().manual_seed(0)
    bulk = torch.randn(2000, generator=generator).abs() * 0.5           # ends near 1.7 deviations
    cluster = 4.5 + torch.rand(40, generator=generator)                 # a weak trained writer: 4.5-5.5
    top_of_bulk = float(bulk.max())
    assert write_cut(torch.cat([bulk, cluster])) == pytest.approx((top_of_bulk + float(cluster.min())) / 2)
    tail = torch.empty(2000).exponential_(1 / 3.0, generator=generator)  # continuous, up to ~20
    assert float(tail.max()) > 15 and write_cut(tail) == float("inf")
    assert write_cut(bulk) == float("inf")
    lonely = top_of_bulk + 0.5 * GAP_RATIO * top_of_bulk               # a gap half as wide as the rule asks
    assert write_cut(torch.cat([bulk, torch.tensor([lonely])])) == float("inf")
    # The same cluster and tail at two blocks of one batch: only the cluster is written.
    updates = [torch.ones(1, 2040, 4)] + [torch.ones(1, 2040, 4) for _ in range(2)]
    scale = 0.476 * 2.0          # log-norm spread that makes one unit of block_write_scores about one score unit
    updates[1] *= torch.cat([tail, tail[:40]]).mul(scale).exp()[None, :, None]
    updates[2] *= torch.cat([bulk, cluster]).mul(scale).exp()[None, :, None]
    found = write_outliers(updates)[0]
    assert found[2000:].all() and not found[:2000].any()


def test_an_update_larger_than_write_size_tokens_is_a_write_where_no_gap_shows_it():
    """A trained block that updates its content tokens continuously up to 5x the median token norm leaves no gap below
    4 tokens it writes at 7.5x: the gap rule misses them, the size rule (WRITE_SIZE) finds them and only them; it
    needs the write to stand out from the image's other updates too."""
    images, tokens, width = 4, 64, 8
    stream = [torch.nn.functional.normalize(torch.randn(images, tokens, width), dim=-1)]    # every token norm 1
    norms = torch.logspace(-1.3, 0.7, tokens).expand(images, tokens).clone()              # 0.05 .. 5.0
    norms[:, :4] = 7.5
    direction = torch.nn.functional.normalize(torch.randn(images, tokens, width), dim=-1)
    updates = [stream[0], direction * norms[..., None]]
    stream.append(stream[0] + updates[1])
    assert WRITE_SIZE < 7.5 and not write_outliers(updates)[:, :4].all()
    found = write_outliers(updates, stream)
    assert found[:, :4].all() and not found[:, 4:].any()
    # A block that updates every token by 8x (a patch embedding far smaller than the blocks) writes none of them.
    everyone = [stream[0], direction * 8.0]
    assert not write_outliers(everyone, [stream[0], stream[0] + everyone[1]]).any()


def test_component_ratio_and_threshold_have_known_values():
    mean, basis = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([[0.0, 1.0, 0.0]])
    tokens = torch.tensor([[[1.0, 0.0, 2.0], [1.0, 3.0, 0.0], [1.0, 0.0, -2.0]]])   # norms 2.24, 3.16, 2.24
    median = tokens.norm(dim=-1).median()
    ratios = component_ratios(tokens, mean, basis)
    torch.testing.assert_close(ratios, torch.tensor([[0.0, 3.0, 0.0]]) / median)
    # Kept tokens with their images' medians give the same numbers.
    torch.testing.assert_close(component_ratios(tokens[0], mean, basis, median.expand(3)), ratios[0])
    assert selection_threshold(torch.tensor([0.02, 0.05, 0.08])) == pytest.approx(SELECT_FACTOR * 0.05)
    assert selection_threshold(torch.tensor([0.0, 0.0, 1e-4])) == MIN_COMPONENT
    # The band: above BAND_SHARE of the threshold, up to it; a selected token is not in it.
    ratios = torch.tensor([0.0, BAND_SHARE * 0.9, BAND_SHARE * 1.1, 1.0, 1.5])
    assert in_band(ratios, 1.0).tolist() == [False, False, True, True, False]


def _held_images() -> torch.Tensor:
    return stack_images(SyntheticShapes(64, 32, 8, flat_share=0.08, seed=4))


def _estimate(backbone, select_k: float | None):
    train = stack_images(SyntheticShapes(96, 32, 8, flat_share=0.08, seed=3))
    return estimate_artifact_subspaces(backbone, train.split(32), LAYERS, select_k, max_rank=6)


def _selected(backbone, found, images: torch.Tensor) -> dict[int, torch.Tensor]:
    raw = backbone.forward_taps(images, LAYERS)
    p = backbone.num_prefix_tokens
    return {layer: torch.zeros(raw[layer][:, p:].shape[:2], dtype=torch.bool) if found[layer] is None
            else found[layer].select(raw[layer][:, p:]) for layer in LAYERS}


@pytest.mark.parametrize("family", [{}, {"second_layer": 4}, {"grow_blocks": 3}, {"varying_dims": 2},
                                    {"trigger": "position"}], ids=["content", "two", "grown", "varying", "position"])
@pytest.mark.parametrize("rho", [2.5, 10.0])
def test_every_family_is_selected_at_weak_and_strong_strengths(family, rho):
    """At 2.5x the artifact tokens' norms overlap textured patches' (a norm cut cannot separate them); their
    component in the estimated subspace does. Layer 4 holds every mechanism (the second one writes at block 4)."""
    planted = build_planted_teacher(PlantedConfig(**BASE, rho=rho, second_rho=rho, position_share=0.08, **family))
    found, held = _estimate(planted.backbone, None), _held_images()
    masks = planted.cluster_masks(held)
    for layer, picked in _selected(planted.backbone, found, held).items():
        expected = torch.stack([masks[c.name] for c in planted.clusters if c.first_block <= layer]).any(0)
        precision, recall = mask_precision_recall(picked, expected)
        assert precision >= 0.95 and recall >= 0.95, (layer, precision, recall)
        facts = found[layer].summary()["selection"]
        assert facts["rule"] == "subspace component" and facts["threshold"] >= MIN_COMPONENT
        assert facts["share"] == pytest.approx(float(expected.float().mean()), abs=0.03)
        raw = planted.backbone.forward_taps(held, [layer])[layer][:, planted.backbone.num_prefix_tokens:]
        chosen, band = found[layer].token_groups(raw)
        assert torch.equal(chosen, picked) and not (band & chosen).any()
        # The recorded band share is the estimation batches'; held-out images give about the same.
        assert facts["band_share"] == pytest.approx(float(band.float().mean()), abs=0.02)


def test_a_norm_cut_misses_what_the_data_driven_rule_finds():
    """The 2.5x teacher under the fixed 4x rule: (almost) nothing above the cut, so (almost) nothing selected."""
    planted = build_planted_teacher(PlantedConfig(**BASE, rho=2.5))
    fixed = _estimate(planted.backbone, 4.0)
    held = _held_images()
    truth = planted.artifact_mask(held)
    for layer, picked in _selected(planted.backbone, fixed, held).items():
        assert mask_precision_recall(picked, truth)[1] < 0.5, layer
        assert fixed[layer] is None or fixed[layer].summary()["selection"]["rule"] == "select_k"


@pytest.mark.parametrize("family", [{}, {"second_layer": 4, "grow_blocks": 2, "varying_dims": 2}])
def test_a_clean_twin_selects_nothing(family):
    planted = build_planted_teacher(PlantedConfig(**BASE, **family))
    found = _estimate(planted.clean, None)
    for layer, picked in _selected(planted.clean, found, _held_images()).items():
        assert picked.float().mean() <= 0.001, (layer, found[layer] and found[layer].summary())


def test_select_k_is_unset_by_default_and_validated_when_set():
    assert SingerConfig().select_k is None and SingerConfig(select_k=3.0).select_k == 3.0
    with pytest.raises(Exception, match="select_k"):
        SingerConfig(select_k=0)


def _taps_with_embedded_outliers(seed: int, outliers: bool) -> dict[int, torch.Tensor]:
    """Three blocks that add small noise to every token; with `outliers`, 5% of the patch tokens already sit at ~10x
    the median when embedded (block 0), so no block writes them."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(4, 1 + 60, 16, generator=generator)
    if outliers:
        tokens[:, 1:4] *= 10.0
    taps = {0: tokens}
    for block in (1, 2):
        taps[block] = taps[block - 1] + 0.1 * torch.randn(tokens.shape, generator=generator)
    return taps


def test_a_high_norm_mode_no_block_writes_is_reported_not_silently_ignored():
    estimator = SubspaceEstimator([2], None, 1)
    for seed in range(2):
        estimator.add(_taps_with_embedded_outliers(seed, outliers=True))
    found = estimator.result()[2]
    assert found.rank == 0 and not found.complete and found.untreated_share == pytest.approx(0.05, abs=0.01)
    assert "leaves 5.0% of the tokens above 4x the median norm unselected" in found.describe()
    clean = SubspaceEstimator([2], None, 1)
    clean.add(_taps_with_embedded_outliers(0, outliers=False))
    assert clean.result()[2] is None


def test_an_artifact_that_also_fires_on_some_normal_patches_is_selected_and_removed_there():
    """A trained teacher's trigger also fires on some patches the ground truth calls normal (docs/method.md, "Token
    selection"). Here the flatness neuron's energy read is softened so the writer also fires on ~25% of the other
    patches: the selection takes them in, and the counterfactual target brings them to the clean twin."""
    from singer_deploy.method.metrics import token_cosines
    from singer_deploy.models.planted import _reserve_channels

    planted = build_planted_teacher(PlantedConfig(**BASE))
    energy = list(_reserve_channels(planted.config)["energy"])
    with torch.no_grad():
        for backbone in (planted.backbone, planted.clean):
            backbone.model.blocks[1].mlp.fc1.weight[:2, energy] *= 0.06
    held = _held_images()
    raw = planted.backbone.forward_taps(held, list(range(5)))
    clean = planted.clean.forward_taps(held, LAYERS)
    written = (raw[2] - clean[2])[:, 1:].norm(dim=-1) > clean[2][:, 1:].norm(dim=-1).median()
    extra = written & ~planted.artifact_mask(held)
    assert 0.1 < extra.float().mean() < 0.35            # the writer reaches well beyond the flat patches
    found = _estimate(planted.backbone, None)
    for layer in LAYERS:
        picked = found[layer].select(raw[layer][:, 1:])
        assert picked[extra].float().mean() > 0.95
        target = found[layer].counterfactual(raw, layer, picked, planted.backbone.run_block_rows, 1)
        assert token_cosines(target[:, 1:], clean[layer][:, 1:])[extra].mean() > 0.99
        assert token_cosines(raw[layer][:, 1:], clean[layer][:, 1:])[extra].mean() < 0.5
