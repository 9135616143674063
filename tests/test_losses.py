"""SiNGER losses on hand-made tensors, the quantile-trap detector, and the combined loss on a tiny teacher."""

from __future__ import annotations

import warnings

from dataclasses import replace

import pytest
import torch

from singer_deploy.models.backbone import load_backbone
from singer_deploy.config import SingerConfig
from singer_deploy.errors import ConfigError, ModelError
from singer_deploy.method.alignment import TokenAligner, TokenLayout
from singer_deploy.method.artifact_subspace import ArtifactSubspace
from singer_deploy.method.losses import (SingerLoss, carry_selection, check_quantile_trap, gram_info_loss, kd_loss,
                                  next_block_info_loss, outlier_loss)
from singer_deploy.method.refine import Refiner


def _norm_tokens(norms: list[list[float]]) -> torch.Tensor:
    """Patch tokens (B, N, 1) whose L2 norms are the given values."""
    return torch.tensor(norms, dtype=torch.float32).unsqueeze(-1)


def test_kd_loss_value_and_detach():
    student = torch.zeros(1, 2, 2, requires_grad=True)
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    loss = kd_loss(student, target)
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    loss.backward()
    assert target.grad is not None and target.grad.abs().sum() > 0           # published: target not detached
    target.grad = None
    kd_loss(student, target, detach_target=True).backward()
    assert target.grad is None
    with pytest.raises(ModelError, match="line up"):
        kd_loss(torch.zeros(1, 3, 2), target)


def test_outlier_loss_quantile_hand_values():
    # Image 1 norms [1,2,3,4,10], alpha 0.5 -> q = 3, selected 4 and 10 -> (1 + 49).
    # Image 2 norms [1,1,1,1,5], alpha 0.5 -> q = 1, selected 5 -> 16. Pooled over the batch: 66 / 3.
    patches = _norm_tokens([[1, 2, 3, 4, 10], [1, 1, 1, 1, 5]])
    assert outlier_loss(patches, alpha=0.5).item() == pytest.approx(66 / 3)
    # alpha 0.97 -> linear interpolation at position 3.88: q = 4 + 0.88 * 6 = 9.28; only 10 is above.
    assert outlier_loss(patches[:1], alpha=0.97).item() == pytest.approx((10 - 9.28) ** 2, rel=1e-5)


def test_outlier_loss_threshold_is_detached():
    one = _norm_tokens([[1, 2, 3, 4, 10]]).requires_grad_(True)
    outlier_loss(one, alpha=0.5).backward()
    # d/dn of ((4-q)^2 + (10-q)^2) / 2 with q detached: (4-3) and (10-3); nothing flows through q.
    torch.testing.assert_close(one.grad.flatten(), torch.tensor([0.0, 0.0, 0.0, 1.0, 7.0]))


def test_outlier_loss_empty_selection_and_autocast():
    flat = torch.ones(2, 6, 3, requires_grad=True)
    loss = outlier_loss(flat)
    assert loss.item() == 0.0 and loss.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = outlier_loss(torch.randn(2, 50, 8, dtype=torch.bfloat16))
    assert value.dtype == torch.float32 and torch.isfinite(value)


def _artifact_batch(num_artifacts: int, n: int = 100, b: int = 4, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    patches = patches * (1.0 + 0.1 * torch.rand(b, n, 1, generator=g))
    patches[:, :num_artifacts] *= 10.0
    return patches


def test_quantile_trap_detector_fires_at_8_percent_not_at_2():
    with pytest.warns(UserWarning) as caught:
        trapped = check_quantile_trap(_artifact_batch(8), alpha=0.97, label="layer 17")
    message = str(caught[0].message)
    # The layer, the share above threshold, both failure modes, and the setting that fixes them.
    for part in ("at layer 17", "8.0% of its patch tokens", "barely shrink", "damages normal tokens",
                 "leave out `preset: published`", "artifact subspace"):
        assert part in message, part
    assert trapped.fired and trapped.share == pytest.approx(0.08)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine = check_quantile_trap(_artifact_batch(2), alpha=0.97)
    assert not fine.fired and fine.share == pytest.approx(0.02)
    # The trap itself: with 8% artifacts the 0.97 quantile sits inside the artifact cluster.
    norms = _artifact_batch(8).norm(dim=-1)
    assert torch.quantile(norms, 0.97, dim=1).min() > 4 * norms.median(dim=1).values.max()


def test_next_block_info_loss_value_and_gradient_path():
    raw = torch.randn(2, 3, 4)
    delta = torch.ones(2, 3, 4, requires_grad=True)
    loss = next_block_info_loss(raw + delta, raw, lambda t: 2.0 * t)
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    torch.testing.assert_close(delta.grad, torch.full((2, 3, 4), 8.0 / 24))


def test_gram_info_loss_hand_value():
    a = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])        # cosine Gram = identity
    b = torch.tensor([[[1.0, 0.0], [5.0, 0.0]]])        # cosine Gram = all ones
    assert gram_info_loss(a, b).item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_teacher():
    torch.manual_seed(0)
    return load_backbone("vit_tiny_patch16_224", depth=3, embed_dim=16, num_heads=2, img_size=32
                         ).requires_grad_(False)


def _taps(teacher, layers):
    with torch.no_grad():
        return teacher.forward_taps(torch.randn(2, 3, 32, 32), layers)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_singer_loss_combines_terms(tiny_teacher, variant):
    layers = [0, 2]
    cfg = SingerConfig(preset="published", rank=4, alpha=0.5, info_variant=variant, w_out=0.5, w_info=2.0)
    refiner = Refiner.from_teacher(tiny_teacher, layers, rank=4)
    layout = TokenLayout.of(tiny_teacher)
    aligner = TokenAligner(layout, layout)
    raw = _taps(tiny_teacher, layers)
    refined = {layer: refiner(layer, raw[layer]) for layer in layers}
    student = {layer: aligner.teacher(raw[layer]) for layer in layers}          # student == raw teacher
    loss = SingerLoss(cfg, layers, tiny_teacher, aligner)
    terms = loss(student, refined, raw)
    for layer in layers:
        assert terms[f"kd@{layer}"].item() == pytest.approx(kd_loss(student[layer], refined[layer]).item())
    expected_info0 = next_block_info_loss(refined[0], raw[0], lambda t: tiny_teacher.run_blocks(t, 1, 2))
    reference = refined[0] if variant == "reference" else raw[2]
    expected_info2 = gram_info_loss(refined[2][:, 1:], reference[:, 1:])
    assert terms["info@0"].item() == pytest.approx(expected_info0.item(), rel=1e-5)
    assert terms["info@2"].item() == pytest.approx(expected_info2.item(), rel=1e-5)
    assert terms["info"].item() == pytest.approx((expected_info0 + expected_info2).item() / 2, rel=1e-5)
    total = 1.0 * terms["kd"] + 0.5 * terms["out"] + 2.0 * terms["info"]
    assert terms["total"].item() == pytest.approx(total.item())
    terms["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refiner.trainable_parameters())
    assert set(loss.trap_checks) == {0, 2}


def test_trap_warning_from_the_loss_names_the_layer(tiny_teacher):
    layout = TokenLayout.of(tiny_teacher)
    raw = _taps(tiny_teacher, [2])
    patches = raw[2][:, 1:].clone()
    patches[:, :1] *= 20.0                                          # 1 of 4 patches: 25% > 1 - alpha = 3%
    raw = {2: torch.cat([raw[2][:, :1], patches], dim=1)}
    loss = SingerLoss(SingerConfig(preset="published", rank=4), [2], tiny_teacher, TokenAligner(layout, layout))
    with pytest.warns(UserWarning, match=r"quantile trap at layer 2: 25\.0% of its patch tokens"):
        loss(raw, raw, raw)
    assert loss.trap_checks[2].fired


def test_single_layer_uses_paper_gram(tiny_teacher):
    refiner = Refiner.from_teacher(tiny_teacher, [2], rank=4)
    layout = TokenLayout.of(tiny_teacher)
    raw = _taps(tiny_teacher, [2])
    refined = {2: refiner(2, raw[2])}
    terms = SingerLoss(SingerConfig(preset="published", rank=4), [2], tiny_teacher, TokenAligner(layout, layout))(refined, refined, raw)
    assert terms["kd"].item() == 0.0
    assert terms["info"].item() == pytest.approx(gram_info_loss(refined[2][:, 1:], raw[2][:, 1:]).item())


class _ScalingTeacher:
    """Stand-in teacher: block b multiplies tokens by b + 1, so every block term has a hand value."""

    num_prefix_tokens, depth = 1, 3

    def run_blocks(self, tokens, start, stop):
        for block in range(start, stop):
            tokens = (block + 1) * tokens
        return tokens


@pytest.mark.parametrize(("layers", "block_gain"), [([0, 2], 1.0), ([0, 1], 3.0)])
def test_last_block_info_holds_the_next_block_or_at_the_last_block_the_tokens(layers, block_gain):
    # One image, CLS + 2 patches, width 2. The refined patches are 2x the raw ones: the cosine Gram term is exactly
    # 0 (scale-invariant: the blind spot this option covers). The final layer's reader: block 2 (gain 3) for layer 1;
    # none for layer 2, the teacher's last block, so its tokens themselves (gain 1). Patch difference 1 per element
    # times the gain: MSE over 3 tokens x 2 channels = (4 elements * gain^2) / 6. The raw taps are the teacher's:
    # raw[1] is block 1 (gain 2) of raw[0], which the intermediate layer's term reads instead of running block 1 again.
    final = layers[-1]
    raw = {layer: torch.ones(1, 3, 2) * (2.0 if layer == 1 else 1.0) for layer in layers}
    level = float(raw[final][0, 0, 0])
    refined = {layer: torch.cat([raw[layer][:, :1], 2.0 * raw[layer][:, 1:]], dim=1) for layer in layers}
    layout = TokenLayout(1, True, (1, 2))
    aligner = TokenAligner(layout, layout)
    published = SingerConfig(preset="published", rank=1, info_variant="paper")
    plain = SingerLoss(published, layers, _ScalingTeacher(), aligner)
    held = SingerLoss(replace(published, last_block_info=True), layers, _ScalingTeacher(), aligner)
    assert plain(refined, refined, raw)[f"info@{final}"].item() == pytest.approx(0.0, abs=1e-6)
    terms = held(refined, refined, raw)
    assert terms[f"info@{final}"].item() == pytest.approx(4 * (block_gain * level) ** 2 / 6, rel=1e-5)
    # The intermediate layer is unchanged: block 1 (gain 2) -> 4 * 2^2 / 6.
    assert terms["info@0"].item() == pytest.approx(4 * 4.0 / 6, rel=1e-5)


def test_presets_fill_what_is_left_unset():
    faithful, published = SingerConfig(), SingerConfig(preset="published")
    assert (faithful.outlier_target, faithful.info_tokens, faithful.adapter_init, faithful.detach_target,
            faithful.info_variant, faithful.last_block_info, faithful.stream) == ("subspace", "normal", "subspace",
                                                                                 True, "paper", True, "raw")
    assert (published.outlier_target, published.info_tokens, published.adapter_init, published.detach_target,
            published.info_variant, published.last_block_info, published.stream) == ("quantile", "all", "nullspace",
                                                                                     False, "reference", False, "raw")
    mixed = SingerConfig(preset="published", info_tokens="normal")     # an explicit value wins over the preset
    assert (mixed.outlier_target, mixed.info_tokens) == ("quantile", "normal")
    with pytest.raises(ConfigError, match="only outlier_target 'subspace' estimates"):
        SingerConfig(preset="published", adapter_init="subspace")     # no subspace to start from


def test_config_validation_names_the_key():
    assert SingerConfig().rank == 64 and SingerConfig().rule == "smallest"
    for key, value in (("rank", 0), ("tau", -1.0), ("alpha", 1.0), ("w_out", float("nan")),
                       ("rule", "largest"), ("outlier_target", "mean"), ("outlier_target", "direction"),
                       ("info_variant", "gram"), ("last_block_info", 1), ("detach_target", "yes"),
                       ("preset", "paper"), ("stream", "merged")):
        with pytest.raises(ConfigError, match=f"SingerConfig.{key}"):
            SingerConfig(**{key: value})


def test_tokens_in_the_band_below_the_selection_are_neither_held_nor_pushed():
    """docs/method.md "Token selection", the band: a token whose component in the artifact subspace is above
    BAND_SHARE of the threshold but not above it is in neither L_out group and out of L_info (here the last layer's
    Gram pairs); a normal token is held by both, a selected token pushed by L_out."""
    teacher = load_backbone("vit_tiny_patch16_224", depth=3, embed_dim=16, num_heads=2, img_size=32, patch_size=4
                            ).requires_grad_(False)
    layout = TokenLayout.of(teacher)
    torch.manual_seed(0)
    raw = _taps(teacher, [2])
    patches = raw[2][:, 1:]
    direction = torch.zeros(16)
    direction[0] = 1.0
    mean = patches.mean((0, 1))
    patches = patches - ((patches - mean) @ direction)[..., None] * direction       # no component along it ...
    median = float(patches[0].norm(dim=-1).median())
    patches[0, 0] += 3.0 * median * direction                                         # ... but an artifact's
    patches[0, 1] += 0.8 * median * direction                                         # and the band's (0.5-1)
    raw = {2: torch.cat([raw[2][:, :1], patches], dim=1)}
    subspace = ArtifactSubspace(direction[None], {}, 1.0, 1, 100, torch.zeros(3, 16), layer_mean=mean, threshold=1.0)
    selected, band = subspace.token_groups(raw[2][:, 1:])
    assert selected.nonzero().tolist() == [[0, 0]] and band.nonzero().tolist() == [[0, 1]]
    aligner = TokenAligner(layout, layout)
    loss = SingerLoss(SingerConfig(rank=4, last_block_info=False), [2], teacher, aligner, subspaces={2: subspace})

    def terms_with(token: int) -> tuple[float, float]:
        """L_out and L_info with one patch token of image 0 moved off its raw value, every other token at it."""
        refined = raw[2].clone()
        refined[0, 1 + token] += 5.0
        terms = loss({2: aligner.teacher(raw[2])}, {2: refined}, raw)
        return terms["out@2"].item(), terms["info@2"].item()

    assert all(value > 0 for value in terms_with(10))           # a normal token moved: both terms see it
    assert terms_with(1) == pytest.approx((0.0, 0.0), abs=1e-6)  # the band token moved: neither does
    assert terms_with(0)[0] > 0                                 # the selected token: its target is the counterfactual


def test_a_token_selected_at_a_shallower_layer_stays_selected_deeper():
    """docs/method.md "Refined stream": the deeper layer reads a stream whose shallower artifact is gone, so its own
    selection misses those tokens; they stay selected there (and leave its band)."""
    shallow = (torch.tensor([[True, False, False, False]]), torch.tensor([[False, True, False, False]]))
    deep = (torch.tensor([[False, False, True, False]]), torch.tensor([[True, False, False, True]]))
    carried = carry_selection({7: deep, 4: shallow})
    assert carried[4][0].tolist() == shallow[0].tolist() and carried[4][1].tolist() == shallow[1].tolist()
    assert carried[7][0].tolist() == [[True, False, True, False]]
    assert carried[7][1].tolist() == [[False, False, False, True]]


def test_the_next_block_reading_is_held_to_what_it_computes_from_the_target():
    """L_info of an intermediate layer under the faithful target compares the next block's reading of the normal
    tokens with what that block computes from the L_out target, not from the raw layer: the refined layer equal to
    its target pays nothing in either term, although the next block's normal outputs moved (they read the artifact
    token through attention, as a trained teacher's do)."""
    teacher = load_backbone("vit_tiny_patch16_224", depth=3, embed_dim=16, num_heads=2, img_size=32, patch_size=4
                            ).requires_grad_(False)
    layout = TokenLayout.of(teacher)
    torch.manual_seed(0)
    raw = _taps(teacher, [0, 1, 2])
    direction = torch.zeros(16)
    direction[0] = 1.0
    mean = raw[1][:, 1:].mean((0, 1))
    median = float(raw[1][0, 1:].norm(dim=-1).median())
    raw[1][0, 1:9] += 20.0 * median * direction                # block 1 writes an artifact on patches 0-7 of image 0
    subspace = ArtifactSubspace(direction[None], {1: 1.0}, 1.0, 1, 100, torch.zeros(2, 16), layer_mean=mean,
                                threshold=5.0)
    selected, band = subspace.token_groups(raw[1][:, 1:])
    assert selected.nonzero().tolist() == [[0, token] for token in range(8)]
    target = subspace.counterfactual(raw, 1, selected, teacher.run_block_rows, 1)
    aligner = TokenAligner(layout, layout)
    loss = SingerLoss(SingerConfig(rank=4), [1, 2], teacher, aligner, subspaces={1: subspace, 2: None})
    terms = loss({layer: aligner.teacher(raw[layer]) for layer in (1, 2)}, {1: target, 2: raw[2]}, raw)
    assert terms["out@1"].item() == pytest.approx(0.0, abs=1e-9)
    assert terms["info@1"].item() == 0.0
    # Held to the raw reading instead, the same refined layer would pay: the normal tokens' next-block outputs moved.
    keep = ~torch.cat([torch.zeros_like(selected[:, :1]), selected | band], 1)
    reading_moved = next_block_info_loss(target, raw[1], lambda t: teacher.run_blocks(t, 2, 3), keep)
    assert reading_moved.item() > 1e-7
