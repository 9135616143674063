"""Refinement adapters: peft LoRA maths, nullspace init, prefix tokens, merge, save/load."""

from __future__ import annotations

import contextlib

import pytest
import torch

from singer_deploy.config import SingerConfig
from singer_deploy.models.backbone import load_backbone
from singer_deploy.errors import ModelError
from singer_deploy.method.alignment import resolve_teacher_layers
from singer_deploy.method.nullspace import block_nullspace
from singer_deploy.method.refine import RefinedTeacher, Refiner

RANK = 4


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    backbone = load_backbone("vit_small_patch14_reg4_dinov2", depth=3, embed_dim=48, num_heads=2, img_size=28)
    return backbone.requires_grad_(False)


@pytest.fixture()
def refiner(teacher):
    return Refiner.from_teacher(teacher, resolve_teacher_layers([0], teacher.depth), rank=RANK, rule="smallest")


def _factors(refiner: Refiner, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_d (d x r), W_u (r x d)) read from the peft LoRA layer: W_d = lora_A.weight^T, W_u = lora_B.weight^T."""
    adapter = refiner.adapter(layer)
    (a,), (b,) = adapter.lora_A.values(), adapter.lora_B.values()
    return a.weight.T, b.weight.T


def _perturb(refiner: Refiner, seed: int = 1) -> None:
    """Stand-in for training: move the factors away from the nullspace init."""
    g = torch.Generator().manual_seed(seed)
    for layer in refiner.layers:
        refiner.set_factors(layer, down=torch.randn(refiner.dim, RANK, generator=g),
                            up=torch.randn(RANK, refiner.dim, generator=g))


def test_init_uses_next_block_and_own_block_for_the_last(teacher, refiner):
    assert refiner.layers == (0, 2)
    blocks = teacher.model.blocks
    for layer, source in ((0, 1), (2, 2)):
        expected = block_nullspace(blocks[source], RANK).basis.float()
        w_down, w_up = _factors(refiner, layer)
        torch.testing.assert_close(w_up, expected)
        torch.testing.assert_close(w_down, expected.T)
        assert refiner.init_report[layer].k >= 0


def test_adapter_output_is_f_plus_f_wd_wu(teacher, refiner):
    tokens = torch.randn(2, teacher.num_prefix_tokens + 4, 48)
    patches = tokens[:, teacher.num_prefix_tokens:]
    n = _factors(refiner, 0)[1]
    torch.testing.assert_close(refiner(0, tokens)[:, teacher.num_prefix_tokens:], patches + patches @ n.T @ n)
    _perturb(refiner)
    wd, wu = _factors(refiner, 2)
    torch.testing.assert_close(refiner(2, tokens)[:, teacher.num_prefix_tokens:], patches + (patches @ wd) @ wu)


def test_only_lora_factors_train(refiner):
    params = refiner.trainable_parameters()
    assert sum(p.numel() for p in params) == 2 * RANK * 48 * 2
    assert all(p.requires_grad for p in params) and len(params) == 4


def test_prefix_and_register_tokens_are_never_refined(teacher, refiner):
    assert teacher.num_prefix_tokens == 5                       # CLS + 4 registers
    images = torch.randn(2, 3, 28, 28)
    taps = teacher.forward_taps(images, refiner.layers)
    _perturb(refiner)
    for layer in refiner.layers:
        refined = refiner(layer, taps[layer])
        torch.testing.assert_close(refined[:, :5], taps[layer][:, :5], rtol=0, atol=0)
        assert not torch.allclose(refined[:, 5:], taps[layer][:, 5:])
        refined[:, :5].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in refiner.trainable_parameters())


def test_merged_refined_teacher_matches_adapter_path(teacher, refiner):
    _perturb(refiner)
    images = torch.randn(2, 3, 28, 28)
    merged = RefinedTeacher.from_refiner(teacher, refiner)
    assert not any("lora" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        taps = teacher.forward_taps(images, refiner.layers)
        refined = merged.forward_taps(images, refiner.layers)
        for layer in refiner.layers:
            assert (refined[layer] - refiner(layer, taps[layer])).abs().max() <= 1e-5
        assert (merged(images) - refined[2]).abs().max() == 0
    assert refiner.adapter(0).lora_A["default"].weight.requires_grad   # merging worked on a copy
    with pytest.raises(ModelError, match="no refinement adapter"):
        merged.forward_taps(images, [1])


def test_the_refined_stream_feeds_each_refined_layer_to_the_blocks_after_it(teacher):
    """docs/method.md "Refined stream": under stream "refined" layer 2's adapter reads blocks 1-2 run on the refined
    layer 0, in training (stream_edits), in the merged teacher and in taps_from; "raw" refines each tap on its own."""
    images = torch.randn(2, 3, 28, 28)
    layers = resolve_teacher_layers([0], teacher.depth)
    streams = {name: Refiner.from_teacher(teacher, layers, rank=RANK, stream=name) for name in ("raw", "refined")}
    for refiner in streams.values():
        _perturb(refiner)
    assert streams["raw"].stream_edits() is None and sorted(streams["refined"].stream_edits()) == [0]
    with torch.no_grad():
        raw = teacher.forward_taps(images, layers)
        fed = teacher.run_blocks(streams["refined"](0, raw[0]), 1, 3)
        torch.testing.assert_close(teacher.forward_taps(images, layers, streams["refined"].stream_edits())[2], fed)
        for name, refiner in streams.items():
            merged = RefinedTeacher.from_refiner(teacher, refiner)
            deeper = refiner(2, fed if name == "refined" else raw[2])
            for taps in (merged.forward_taps(images, layers), merged.taps_from(images, raw)):
                torch.testing.assert_close(taps[2], deeper, rtol=1e-4, atol=1e-4)    # merged: float rounding only
                torch.testing.assert_close(taps[0], refiner(0, raw[0]), rtol=1e-4, atol=1e-4)
            # The deepest layer alone runs the stream too.
            torch.testing.assert_close(merged(images), deeper, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fed, raw[2])
    with pytest.raises(ModelError, match="Unknown refiner stream"):
        Refiner(layers, 48, RANK, 5, stream="merged")


def test_save_and_load_round_trip(tmp_path, teacher, refiner):
    _perturb(refiner)
    path = refiner.save(tmp_path / "adapters" / "refiner.safetensors")
    loaded = Refiner.load(path)
    assert loaded.layers == refiner.layers and loaded.num_prefix_tokens == 5 and loaded.rank == RANK
    assert loaded.stream == "raw"
    refined_stream = Refiner.from_teacher(teacher, refiner.layers, rank=RANK, stream="refined")
    assert Refiner.load(refined_stream.save(tmp_path / "refined.safetensors")).stream == "refined"
    tokens = torch.randn(1, 9, 48)
    for layer in refiner.layers:
        torch.testing.assert_close(loaded(layer, tokens), refiner(layer, tokens))
    with pytest.raises(ModelError, match="does not exist"):
        Refiner.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("init, sign", [("nullspace", 1.0), ("remove", -1.0), ("zero", 0.0)])
def test_adapter_inits_start_from_doubling_removing_or_keeping_the_null_component(teacher, init, sign):
    refiner = Refiner.from_teacher(teacher, [0], rank=RANK, init=init)
    basis = refiner.init_report[0].basis.float()
    tokens = torch.randn(2, teacher.num_prefix_tokens + 4, teacher.embed_dim)
    patches = tokens[:, teacher.num_prefix_tokens:]
    expected = patches + sign * patches @ basis.T @ basis                  # F + s F N^T N
    with torch.no_grad():
        torch.testing.assert_close(refiner(0, tokens)[:, teacher.num_prefix_tokens:], expected, atol=1e-5,
                                   rtol=1e-5)


def test_subspace_start_takes_the_artifact_component_out_and_keeps_the_rest(teacher):
    """adapter_init "subspace": zero start until the estimate, then F - F S^T S on the layers that have one."""
    refiner = Refiner.from_teacher(teacher, [0, 1], rank=RANK, init="subspace")
    tokens = torch.randn(2, teacher.num_prefix_tokens + 4, teacher.embed_dim)
    p = teacher.num_prefix_tokens
    with torch.no_grad():
        torch.testing.assert_close(refiner(0, tokens), tokens)
    artifact = torch.linalg.qr(torch.randn(teacher.embed_dim, 2))[0].T           # (2, d) orthonormal
    refiner.start_at_subspaces({0: artifact, 1: None})
    patches = tokens[:, p:]
    with torch.no_grad():
        torch.testing.assert_close(refiner(0, tokens)[:, p:], patches - patches @ artifact.T @ artifact,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(refiner(1, tokens), tokens)                  # no estimate: still the zero start
    reading = refiner.adapter(0).lora_A["default"].weight                       # W_d^T: S first, then N
    torch.testing.assert_close(reading[:2].abs().sum(), (reading[:2] @ artifact.T @ artifact).abs().sum(),
                               atol=1e-4, rtol=1e-4)


def test_random_init_ignores_the_nullspace_but_reports_it(teacher):
    refiner = Refiner.from_teacher(teacher, [0], rank=RANK, init="random")
    null = refiner.init_report[0].basis.float()
    down = _factors(refiner, 0)[0].detach().float()                       # W_d: d x r, orthonormal columns
    torch.testing.assert_close(down.T @ down, torch.eye(RANK), atol=1e-5, rtol=0)
    assert (null @ down).norm() < 0.9 * RANK ** 0.5                        # not the null basis
    with pytest.raises(Exception, match="adapter initialisation"):
        Refiner.from_teacher(teacher, [0], rank=RANK, init="lora")


def test_under_the_refined_stream_each_adapter_and_the_student_are_clipped_on_their_own(teacher):
    """train_step clips DistillStep.clip_groups one by one: under stream "refined" a huge gradient on one adapter
    leaves the other adapter's and the student's steps as they are (one shared clip would scale them down ~1e4-fold
    with it)."""
    from singer_deploy.train.loop import DistillStep, train_step

    student = load_backbone("vit_small_patch14_reg4_dinov2", depth=2, embed_dim=24, num_heads=2, img_size=28)
    shared = DistillStep(teacher, student, [0, 2], [0, 1], SingerConfig(rank=RANK), "singer")
    assert len(shared.clip_groups()) == 1      # stream "raw" (the presets): one clip over everything trained
    step = DistillStep(teacher, student, [0, 2], [0, 1], SingerConfig(rank=RANK, stream="refined"), "singer")
    groups = step.clip_groups()
    trained = [p for p in step.parameters() if p.requires_grad]
    assert len(groups) == 3 and sorted(map(id, trained)) == sorted(id(p) for group in groups for p in group)
    student_group, shallow, deep = groups

    def runner(images):     # grad norms: student and layer 0 below the clip of 1, layer 2 far above it
        total = sum(p.sum() for p in deep) * 1e4 + sum(p.sum() for p in shallow) * 1e-3
        return {"total": total + sum(p.sum() for p in student_group) * 1e-5}

    before = [p.detach().clone() for p in shallow + student_group]
    optimizer = torch.optim.SGD(trained, lr=1.0)
    train_step(runner, None, optimizer, None, groups, 1.0, contextlib.nullcontext())
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(shallow + student_group, before)]
    assert moved[:len(shallow)] == pytest.approx([1e-3] * len(shallow), rel=0.02)   # float32 steps on ~1 weights
    assert moved[len(shallow):] == pytest.approx([1e-5] * len(student_group), rel=0.02)
    assert all(p.grad.norm() <= 1.0 + 1e-4 for p in deep)
