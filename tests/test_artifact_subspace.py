"""The "subspace" outlier target: each layer's artifact subspace estimated from the blocks that write it, on every
planted family (one mechanism, two mechanisms in two blocks, a grown artifact, an image-dependent one), its explained
share, the loss on hand-made tokens, and a distillation run that records the estimate."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from singer_deploy.config import PlantedConfig, SingerConfig, TrainConfig
from singer_deploy.errors import ConfigError, ModelError
from singer_deploy.method.alignment import TokenAligner, TokenLayout
from singer_deploy.method.artifact_subspace import (CONTEXT_TOLERANCE, LOW_SHARE, ArtifactSubspace, SubspaceEstimator,
                                                    describe_subspace, estimate_artifact_subspaces, subspace_loss)
from singer_deploy.method.losses import SingerLoss
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import build_planted_teacher
from singer_deploy.train.loop import distill

LAYERS = [2, 3]
# Width 64, 6 blocks: room for a writer two blocks before the last distilled layer.
FAMILY_BASE = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, artifact_layer=2, null_dim=6)
WIDE_LAYERS = [2, 4]


def _batches(share: float, n: int = 64) -> list[torch.Tensor]:
    return list(stack_images(SyntheticShapes(n, 32, 8, flat_share=share, seed=3)).split(16))


def _captured(basis: torch.Tensor, direction: torch.Tensor) -> float:
    """Share of a unit planted direction inside the estimated subspace."""
    return float((basis.double() @ direction.double()).square().sum())


def _planted_directions(planted) -> list[torch.Tensor]:
    rows = [w.direction for w in planted.writers]
    return rows + [v for w in planted.writers if w.varying is not None for v in w.varying]


def test_one_mechanism_gives_one_direction_at_its_writer(small_planted):
    found = estimate_artifact_subspaces(small_planted.backbone, _batches(0.08), LAYERS, select_k=4.0)
    for layer in LAYERS:
        subspace = found[layer]
        assert subspace.rank == 1 and set(subspace.writers) == {small_planted.artifact_layer}
        assert _captured(subspace.basis, small_planted.u) > 0.9999
        assert subspace.explained_share > 0.99 and subspace.complete
        assert subspace.artifact_tokens > 0 and subspace.normal_tokens > subspace.artifact_tokens


@pytest.mark.parametrize("family, layer_writers", [
    (dict(second_layer=4), {2: {2}, 4: {2, 4}}),                       # content at block 2, position at block 4
    (dict(grow_blocks=3), {2: {2}, 4: {2, 3, 4}}),                     # one cluster over blocks 2, 3, 4
    (dict(varying_dims=2), {2: {2}, 4: {2}}),                          # a fixed part + a part varying per token
    (dict(grow_blocks=2, varying_dims=2, second_layer=4), {2: {2}, 4: {2, 3, 4}}),   # all of them in one teacher
])
def test_every_written_direction_is_found_with_the_blocks_that_write_it(family, layer_writers):
    planted = build_planted_teacher(PlantedConfig(**FAMILY_BASE, position_share=0.08, **family))
    found = estimate_artifact_subspaces(planted.backbone, _batches(0.08, 96), WIDE_LAYERS, select_k=4.0, max_rank=6)
    for layer, writers in layer_writers.items():
        subspace = found[layer]
        assert set(subspace.writers) == writers, (layer, subspace.writers)
        written = [w for w in planted.writers if w.block <= layer]
        directions = [w.direction for w in written] + [v for w in written if w.varying is not None
                                                        for v in w.varying]
        assert all(_captured(subspace.basis, d) > 0.999 for d in directions), layer
        assert subspace.explained_share > 0.99


def test_an_estimate_capped_below_the_artifact_reports_a_low_explained_share():
    """The image-dependent family needs 3 directions; capped at 1 (the mean direction, as the single-direction
    estimate kept), the token-by-token share shows what is left, and the summary line says so."""
    planted = build_planted_teacher(PlantedConfig(**FAMILY_BASE, varying_dims=2))
    subspace = estimate_artifact_subspaces(planted.backbone, _batches(0.08, 96), [4], select_k=4.0,
                                           max_rank=1)[4]
    assert subspace.rank == 1 and subspace.explained_share < LOW_SHARE and not subspace.complete
    assert "below 95%" in subspace.describe() and "part of the artifact is outside it" in subspace.describe()
    assert subspace.left_out == 2 and "2 more artifact directions did not fit the adapter rank 1" in subspace.describe()
    # What the mean gap would say: the mean difference of the artifact tokens lies almost entirely in that direction.
    full = estimate_artifact_subspaces(planted.backbone, _batches(0.08, 96), [4], select_k=4.0)[4]
    assert full.rank == 3 and full.complete


def _hand_made_taps(generator: torch.Generator, images: int = 8, tokens: int = 64, width: int = 16) -> dict:
    """Raw taps of blocks 0-3 (no prefix token) where block 2 writes, on tokens 0-3 of every image, a fixed direction
    (e0, 10x a token) plus two parts that vary from token to token (e1, e2: about 8 and 6 units of block 2's normal
    update spread, below EXCESS_LIMIT), and block 3, not a writer, adds a varying part of its own on them (e3, about 3
    units: what a later block computes differently on an artifact token). Every block's update has spread 1 unit."""
    noise = 0.1                                                   # per coordinate: a unit is width x noise^2
    unit = width * noise ** 2
    axes = torch.eye(width)
    taps = {0: torch.randn(images, tokens, width, generator=generator)}
    for block in (1, 2, 3):
        update = noise * torch.randn(images, tokens, width, generator=generator)
        varying = lambda units: (units * unit) ** 0.5 * torch.randn(images, 4, 1, generator=generator)
        if block == 2:
            update[:, :4] += 10 * width ** 0.5 * axes[0] + varying(8) * axes[1] + varying(6) * axes[2]
        if block == 3:
            update[:, :4] += varying(3) * axes[3]
        taps[block] = taps[block - 1] + update
    return taps


def test_a_writers_weaker_varying_part_joins_and_a_later_blocks_part_does_not():
    """Below EXCESS_LIMIT, a direction joins only when the strong directions' writer writes it (WRITTEN_LIMIT): a
    trained teacher's register-like content at its writer, not what a later block adds."""
    generator = torch.Generator().manual_seed(0)
    estimator = SubspaceEstimator([3], None, 0, max_rank=8)
    for _ in range(8):
        estimator.add(_hand_made_taps(generator))
    subspace = estimator.result()[3]
    assert set(subspace.writers) == {2}
    axes = torch.eye(16)
    assert subspace.rank == 3
    assert all(_captured(subspace.basis, axes[i]) > 0.99 for i in (0, 1, 2))
    assert _captured(subspace.basis, axes[3]) < 0.01
    assert 2 < subspace.next_excess < 4 and subspace.summary()["next_excess"] == round(subspace.next_excess, 3)


def test_a_teacher_without_artifacts_has_no_subspace_and_a_zero_loss(small_planted):
    teacher = small_planted.clean
    found = estimate_artifact_subspaces(teacher, _batches(0.08), LAYERS, select_k=4.0)
    assert found == {2: None, 3: None}
    layout = TokenLayout.of(teacher)
    loss = SingerLoss(SingerConfig(rank=4), LAYERS, teacher, TokenAligner(layout, layout), subspaces=found)
    raw = teacher.forward_taps(_batches(0.08)[0], loss.taps_needed())
    refined = {layer: raw[layer].clone().requires_grad_(True) for layer in LAYERS}
    terms = loss(raw, refined, raw)
    assert terms["out"].item() == 0.0
    terms["total"].backward()                                           # a graph, so the step still runs


def test_a_block_that_damps_the_artifact_is_not_a_writer():
    """Block 1 writes 10 e_0 onto 4 tokens per image, block 2 takes 2 e_0 back off them (a trained teacher's later
    blocks damp the artifact: 4% of the update energy along e_0, which the energy rule counted as a writer). Block
    1 builds 10/8 of the component at layer 2, block 2 -2/8: only block 1 is a writer, so the counterfactual leaves
    block 2's update as the block computes it."""
    generator = torch.Generator().manual_seed(0)
    images, tokens, width = 8, 64, 16
    written = torch.zeros(images, 1 + tokens, dtype=torch.bool)
    written[:, 1:5] = True
    stream = [torch.randn(images, 1 + tokens, width, generator=generator)]
    stream[0][..., 0] = 0.0
    for write in (10.0, -2.0):
        update = 0.3 * torch.randn(images, 1 + tokens, width, generator=generator)
        update[..., 0][written] += write
        stream.append(stream[-1] + update)
    estimator = SubspaceEstimator([2], None, 1)
    estimator.add(dict(enumerate(stream)))
    found = estimator.result()[2]
    assert found.rank == 1 and _captured(found.basis, torch.eye(width)[0]) > 0.999
    assert list(found.writers) == [1] and found.writers[1] == pytest.approx(1.25, abs=0.05)


def _subspace(basis, update_means, writers) -> ArtifactSubspace:
    return ArtifactSubspace(torch.tensor(basis), writers, 1.0, 1, 2,
                            torch.tensor(update_means))


def test_counterfactual_removes_the_write_where_it_happens_and_lets_later_blocks_compute():
    """Block 1 writes 10 e_1 onto patch 3; blocks 2 and 3 add to every token the mean e_1 component of the tokens
    they read (an attention-like mix). The counterfactual of layer 3 removes the write at block 1 (its update set to
    the normal mean update along e_1) and runs blocks 2 and 3 on the cleaned token, which reads the other tokens as
    the raw teacher has them; the unselected tokens and the prefix token keep their raw values."""
    def mix(tokens):
        return tokens + tokens[..., 1:].mean(1, keepdim=True)

    def block(tokens, index, rows):
        assert index in (2, 3)
        return mix(tokens)[rows]

    before = torch.tensor([[[5.0, 5.0], [1.0, 0.2], [2.0, 0.4], [3.0, 0.6]]])     # prefix + 3 patches, D = 2
    after = before + torch.tensor([0.0, 0.1]) + torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 10.0]]])
    taps = {0: before, 1: after, 2: mix(after)}
    taps[3] = mix(taps[2])
    subspace = _subspace([[0.0, 1.0]], [[0.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]], {1: 1.0})
    assert subspace.taps_needed(3) == [0, 1, 2, 3] and subspace.taps_needed(1) == [0, 1]
    selected = torch.tensor([[False, False, True]])
    kept = {index: tap.clone() for index, tap in taps.items()}
    out = subspace.counterfactual(taps, 3, selected, block, prefix=1)
    assert all(torch.equal(taps[index], tap) for index, tap in kept.items())     # its inputs are left as they were
    # Patch 3 without the write: (3, 0.7) after block 1. Block 2 reads e_1 parts 5.1, 0.3, 0.5 and its own 0.7:
    # + 1.65 -> (4.65, 2.35). Block 3 reads the raw block-2 tokens (raw mean 4.15 added: 9.25, 4.45, 4.65) and its own
    # 2.35: + 5.175 -> (9.825, 7.525). Others: raw block-3 values.
    torch.testing.assert_close(out[0, 3], torch.tensor([9.825, 7.525]))
    torch.testing.assert_close(out[:, :3], taps[3][:, :3])
    # At the writer's own layer nothing runs: the update's excess along e_1 is gone, the input's e_1 part stays.
    torch.testing.assert_close(subspace.counterfactual(taps, 1, selected, block, prefix=1)[0, 3],
                               torch.tensor([3.0, 0.7]))


def test_a_prefix_token_the_writer_writes_is_cleaned_as_context_and_left_raw_in_the_target():
    """The teacher of the test above, whose block 1 also writes 10 e_1 onto the prefix token, which blocks 2 and 3
    read. With a prefix limit below that write the counterfactual cleans the prefix token at block 1 and the selected
    token reads it clean; the target's prefix token itself stays raw (the adapters pass it as it is)."""
    def mix(tokens):
        return tokens + tokens[..., 1:].mean(1, keepdim=True)

    def block(tokens, index, rows):
        return mix(tokens)[rows]

    before = torch.tensor([[[5.0, 5.0], [1.0, 0.2], [2.0, 0.4], [3.0, 0.6]]])
    write = torch.tensor([[[0.0, 10.0], [0.0, 0.0], [0.0, 0.0], [0.0, 10.0]]])
    taps = {0: before, 1: before + torch.tensor([0.0, 0.1]) + write}
    taps[2] = mix(taps[1])
    taps[3] = mix(taps[2])
    subspace = _subspace([[0.0, 1.0]], [[0.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]], {1: 1.0})
    selected = torch.tensor([[False, False, True]])
    cleaned = replace(subspace, prefix_limits={1: 5.0})
    assert cleaned.written_prefix(taps, 1).tolist() == [[True]]
    assert replace(subspace, prefix_limits={1: 20.0}).written_prefix(taps, 1).tolist() == [[False]]
    # Block 1: prefix (5, 5.1), patch 3 (3, 0.7). Block 2 reads e_1 parts 5.1, 0.3, 0.5, 0.7 (+ 1.65): prefix
    # (6.65, 6.75), patch 3 (4.65, 2.35). Block 3 reads those two and the raw block-2 patches 1, 2 (6.95, 7.15):
    # + 5.8 -> (10.45, 8.15).
    out = cleaned.counterfactual(taps, 3, selected, block, prefix=1)
    torch.testing.assert_close(out[0, 3], torch.tensor([10.45, 8.15]))
    torch.testing.assert_close(out[:, :3], taps[3][:, :3])
    # Without the prefix limits the raw prefix (e_1 part 15.1, then 21.75) is read: + 4.15, then + 10.175.
    torch.testing.assert_close(subspace.counterfactual(taps, 3, selected, block, prefix=1)[0, 3],
                               torch.tensor([17.325, 15.025]))


def test_prefix_limits_clean_the_class_token_a_planted_writer_writes_and_not_the_clean_twins(small_planted):
    """The planted writer writes its artifact on the class token too (docs/results.md, "The refined teacher on
    trained teachers"): the estimate's prefix limit at the writer flags the raw teacher's class token on every image,
    the clean twin's on none."""
    layer = LAYERS[-1]
    found = estimate_artifact_subspaces(small_planted.backbone, _batches(0.08), [layer], select_k=None)[layer]
    assert set(found.prefix_limits) == set(found.writers) == {small_planted.artifact_layer}
    assert found.prefix_written == 1.0 and found.summary()["context"]["prefix_written"] == 1.0
    assert "cleans the prefix tokens the writers write too (100%" in found.describe()
    images = _batches(0.08)[1]
    blocks = found.taps_needed(layer)
    assert found.written_prefix(small_planted.backbone.forward_taps(images, blocks), 1).all()
    assert not found.written_prefix(small_planted.clean.forward_taps(images, blocks), 1).any()


def test_whole_context_counterfactual_is_the_teacher_that_never_wrote_and_is_chosen_when_others_read_it():
    """The same teacher as above, whose blocks 2 and 3 make every token read the others (the trained teachers'
    case). With whole_context the counterfactual re-runs every token on the cleaned patch 3, which gives exactly the
    teacher without the write; on the selected tokens alone it differs, so with_context chooses the whole re-run."""
    def mix(tokens):                    # every token's e_1 part gets the mean e_1 part of all tokens
        return tokens + tokens.mean(1, keepdim=True) * torch.tensor([0.0, 1.0])

    def block(tokens, index, rows):
        return mix(tokens)[rows]

    before = torch.tensor([[[5.0, 5.0], [1.0, 0.2], [2.0, 0.4], [3.0, 0.6]]])
    clean = before + torch.tensor([0.0, 0.1])
    after = clean + torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 10.0]]])
    taps = {0: before, 1: after, 2: mix(after)}
    taps[3] = mix(taps[2])
    subspace = _subspace([[0.0, 1.0]], [[0.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]], {1: 1.0})
    selected = torch.tensor([[False, False, True]])
    whole = replace(subspace, whole_context=True).counterfactual(taps, 3, selected, block, prefix=1)
    # Block 2 adds the mean e_1 part 1.65 of (5.1, 0.3, 0.5, 0.7); block 3 the mean 3.3 of (6.75, 1.95, 2.15, 2.35).
    torch.testing.assert_close(whole[0, 3], torch.tensor([3.0, 5.65]))
    # The selected token alone reads the raw block-2 tokens at block 3 (9.25, 4.45, 4.65 and its own 2.35): + 5.175.
    alone = subspace.counterfactual(taps, 3, selected, block, prefix=1)
    torch.testing.assert_close(alone[0, 3], torch.tensor([3.0, 7.525]))
    torch.testing.assert_close(whole[0, 3], mix(mix(clean))[0, 3])
    torch.testing.assert_close(whole[:, :3], taps[3][:, :3])           # the other tokens' targets stay raw
    # Raw layer-3 components along e_1 over the median patch norm: 0.97, 0.99 and 1.77; a threshold of 1.5 picks
    # patch 3. The two counterfactuals' cosine there is 0.994.
    facts = replace(subspace, layer_mean=torch.zeros(2), threshold=1.5)
    chosen = facts.with_context(taps, 3, block, prefix=1)
    assert chosen.whole_context and chosen.context_change > CONTEXT_TOLERANCE
    assert chosen.summary()["context"]["whole"] is True
    assert "re-runs every token" in chosen.describe() and "re-runs every token" not in facts.describe()
    # Blocks that read only their own token: both counterfactuals agree and the selected tokens alone are re-run.
    own = facts.with_context(taps, 3, lambda tokens, index, rows: (tokens + 1.0)[rows], prefix=1)
    assert not own.whole_context and own.context_change == pytest.approx(0.0, abs=1e-6)


def test_subspace_loss_hand_values():
    refined = torch.tensor([[[1.0, 0.5], [2.0, 0.5], [1.0, 10.0]]])
    target = torch.tensor([[[1.0, 0.5], [1.0, 0.5], [1.0, 0.5]]])
    selected = torch.tensor([[False, False, True]])
    # Selected tokens and the others are averaged apart: 9.5^2 / 1.25 for the artifact token, plus the normal
    # tokens' mean (0 and 1 / 1.25).
    expected = 9.5 ** 2 / 1.25 + (1.0 / 1.25) / 2
    assert subspace_loss(refined, target, selected).item() == pytest.approx(expected)
    assert subspace_loss(target, target, selected).item() == pytest.approx(0.0)
    # Relative: the same picture at 10x the scale gives the same loss.
    assert subspace_loss(refined * 10, target * 10, selected).item() == pytest.approx(expected)
    # Nothing selected: only the normal tokens count, with a graph.
    none = subspace_loss(refined.requires_grad_(True), target, torch.zeros_like(selected))
    assert none.item() == pytest.approx((1.0 + 9.5 ** 2) / 1.25 / 3) and none.requires_grad


def test_describe_reads_the_recorded_facts():
    facts = {"rank": 2, "writers": {"4": 0.6, "6": 0.4}, "explained_share": 0.998, "complete": True,
             "artifact_tokens": 10, "normal_tokens": 90}
    assert describe_subspace(facts) == ("2 directions written by blocks 4 (60%), 6 (40%); explains 99.8% of the "
                                        "candidate tokens' excess energy (10 candidate / 90 normal tokens)")
    facts["selection"] = {"rule": "subspace component", "threshold": 0.3712, "share": 0.0781, "strength": 2.52}
    assert describe_subspace(facts).endswith("; selects 7.8% of tokens (component in the subspace above 0.371x the "
                                             "median norm), 2.5x the median norm")
    facts["selection"]["band_share"] = 0.0042     # tokens the losses neither hold nor push are said, when there are any
    assert describe_subspace(facts).endswith("2.5x the median norm; 0.4% in the band below it, held by no term")
    # No direction above the limit: said in words, never an empty list of blocks.
    empty = {**facts, "rank": 0, "writers": {}, "explained_share": 0.0, "complete": False}
    assert describe_subspace(empty).startswith("no artifact direction: no direction's excess reaches 10 units")


def test_singer_loss_without_subspaces_is_a_clear_error(small_planted):
    teacher = small_planted.backbone
    layout = TokenLayout.of(teacher)
    raw = teacher.forward_taps(_batches(0.08)[0], LAYERS)
    loss = SingerLoss(SingerConfig(rank=4), LAYERS, teacher, TokenAligner(layout, layout))
    with pytest.raises(ModelError, match="artifact subspace of every distilled layer"):
        loss(raw, raw, raw)


def test_estimate_batches_is_validated():
    with pytest.raises(ConfigError, match="estimate_batches"):
        SingerConfig(estimate_batches=0)


def test_distillation_estimates_and_records_the_subspace(small_planted, tmp_path):
    torch.manual_seed(0)
    student = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    singer = SingerConfig(rank=4, estimate_batches=2)          # the default preset: "faithful"
    train = TrainConfig(steps=3, batch_size=8, warmup_steps=1, log_every=1, device="cpu")
    result = distill(small_planted.backbone, student, SyntheticShapes(32, 32, 8, flat_share=0.08, seed=1), tmp_path,
                     layers=[2], singer=singer, train=train, progress=False)
    recorded = json.loads(result.files["distill_config"].read_text())["diagnostics"]["artifact_subspace"]
    assert set(recorded) == {"2", "3"}
    assert all(entry["writers"].keys() == {str(small_planted.artifact_layer)} and entry["artifact_tokens"] > 0
               and entry["complete"] for entry in recorded.values())



def test_the_training_step_reuses_the_raw_projections_and_keeps_the_target_and_l_info():
    """DistillStep records the raw forward's queries, keys and values of the blocks the counterfactual re-runs and of
    the block after the intermediate layer; the target computed with them is the one computed from the whole blocks,
    and so is L_info's next block on it (docs/results.md, "The method at the paper's scale")."""
    from singer_deploy.method.alignment import map_layers
    from singer_deploy.train.loop import DistillStep

    planted = build_planted_teacher(PlantedConfig(artifact_layer=3, grow_blocks=3))   # three writers
    teacher, layers = planted.backbone, [4, 7]
    images = stack_images(SyntheticShapes(32, 64, 8, flat_share=0.08, seed=4))
    student = load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    step = DistillStep(teacher, student, layers, map_layers(layers, 8, 2, force_last=True), SingerConfig(rank=8),
                       "singer")
    loss = step.singer_loss
    loss.subspaces = estimate_artifact_subspaces(step.teacher, [images[16:]], layers, loss.config.select_k,
                                                 max_rank=8)
    first = min(s.first_block for s in loss.subspaces.values())
    assert loss.qkv_blocks() == list(range(first + 1, 8))
    recorded = {}
    original = step.teacher.record_qkv

    def spy(blocks):
        recorded["blocks"] = list(blocks)
        return original(blocks)

    step.teacher.record_qkv = spy
    batch = images[:16]
    with torch.no_grad():
        terms = step(batch)
        raw = step.teacher.forward_taps(batch, loss.taps_needed())
        with step.teacher.record_qkv(loss.qkv_blocks()) as qkv:
            step.teacher.forward_taps(batch, loss.taps_needed())
    assert recorded["blocks"] == loss.qkv_blocks() and sorted(qkv) == loss.qkv_blocks()
    p = teacher.num_prefix_tokens
    for layer in layers:
        subspace = loss.subspaces[layer]
        selected = subspace.select(raw[layer][:, p:])
        blocks = step.teacher.model.blocks
        whole = subspace.counterfactual(raw, layer, selected, lambda t, b, rows: blocks[b](t)[rows], p)
        reused = subspace.counterfactual(
            raw, layer, selected, lambda t, b, rows: step.teacher.run_block_rows(t, b, rows, qkv[b]), p)
        assert (reused - whole).norm() <= 1e-5 * whole.norm()           # float32 rounding apart
        assert torch.nn.functional.cosine_similarity(reused, whole, dim=-1).min() > 1 - 1e-5
        assert torch.isfinite(terms[f"out@{layer}"]) and torch.isfinite(terms[f"info@{layer}"])
    refined = {layer: step.refiner(layer, raw[layer]).detach() for layer in layers}
    mlp_inputs = []
    hook = step.teacher.model.blocks[5].mlp.register_forward_hook(lambda _m, args, _o: mlp_inputs.append(args[0]))
    try:
        fast = loss(refined, refined, raw, qkv)
    finally:
        hook.remove()
    assert any(x.ndim == 2 and x.shape[0] == batch.shape[0] * raw[4].shape[1] for x in mlp_inputs)   # the row path
    slow = loss(refined, refined, raw)
    assert slow["info@4"] > 0 and abs(fast["info@4"] - slow["info@4"]) <= 1e-5 * slow["info@4"]
