import pytest
import timm
import torch
from safetensors.torch import save_file

from singer_deploy.models.backbone import Backbone, load_backbone
from singer_deploy.errors import ModelError

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("vit_tiny_patch16_224", **TINY)


def test_taps_equal_timm_intermediates(tiny):
    x = torch.randn(2, 3, 32, 32)
    taps = tiny.forward_taps(x, [1, 3])
    ref = tiny.model.forward_intermediates(x, indices=[1, 3], norm=False, output_fmt="NLC",
                                           intermediates_only=True, return_prefix_tokens=True)
    for (patches, prefix), layer in zip(ref, [1, 3]):  # timm yields (spatial, prefix)
        torch.testing.assert_close(taps[layer], torch.cat([prefix, patches], 1), rtol=0, atol=0)


def test_last_tap_is_forward_features_before_the_final_norm(tiny):
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tiny.model.norm(tiny.forward(x)), tiny.model.forward_features(x), rtol=0, atol=0)


def test_truncation_is_exact_and_skips_later_blocks(tiny):
    x = torch.randn(2, 3, 32, 32)
    calls = []
    hook = tiny.model.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        truncated = tiny.forward_taps(x, [1])[1]
    finally:
        hook.remove()
    assert calls == []
    full = tiny.forward_taps(x, [1, 3])[1]
    torch.testing.assert_close(truncated, full, rtol=0, atol=0)


def test_an_edit_feeds_the_blocks_after_it_and_each_tap_is_taken_before_its_edit(tiny):
    x = torch.randn(2, 3, 32, 32)
    raw = tiny.forward_taps(x, [0, 1, 2, 3])
    halve = {1: lambda tokens: tokens * 0.5, 3: lambda tokens: tokens * 0.0}   # an edit at the deepest tap: no effect
    taps = tiny.forward_taps(x, [0, 1, 3], halve)
    assert sorted(taps) == [0, 1, 3]
    torch.testing.assert_close(taps[0], raw[0], rtol=0, atol=0)
    torch.testing.assert_close(taps[1], raw[1], rtol=0, atol=0)
    torch.testing.assert_close(taps[3], tiny.run_blocks(raw[1] * 0.5, 2, 4))
    assert not torch.allclose(taps[3], raw[3])
    torch.testing.assert_close(tiny.forward_taps(x, [3], halve)[3], taps[3], rtol=0, atol=0)
    torch.testing.assert_close(tiny.forward_taps(x, [1], halve)[1], raw[1], rtol=0, atol=0)


def test_layout_facts(tiny):
    assert (tiny.num_prefix_tokens, tiny.grid_size, tiny.embed_dim, tiny.depth) == (1, (4, 4), 48, 4)
    assert tiny.forward(torch.randn(1, 3, 32, 32)).shape == (1, 17, 48)


def test_register_model_keeps_registers_out_of_patches():
    backbone = load_backbone("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=48, depth=2, num_heads=2)
    assert backbone.num_prefix_tokens == 5
    prefix, patches = backbone.split(backbone.forward(torch.randn(2, 3, 28, 28)))
    assert prefix.shape == (2, 5, 48) and patches.shape == (2, 4, 48)


def test_model_without_prefix_tokens_taps_patches_only():
    torch.manual_seed(0)
    backbone = load_backbone("vit_tiny_patch16_224", class_token=False, global_pool="avg", **TINY)
    x = torch.randn(2, 3, 32, 32)
    assert backbone.num_prefix_tokens == 0
    torch.testing.assert_close(backbone.model.norm(backbone.forward(x)), backbone.model.forward_features(x),
                               rtol=0, atol=0)
    assert backbone.forward_taps(x, [1])[1].shape == (2, 16, 48)


def test_negative_and_out_of_range_layers(tiny):
    assert tiny.check_layer(-1) == 3
    with pytest.raises(ModelError, match="out of range"):
        tiny.forward_taps(torch.randn(1, 3, 32, 32), [4])


def test_wrong_input_shape(tiny):
    with pytest.raises(ModelError, match="wrong shape"):
        tiny.forward_taps(torch.randn(1, 3, 40, 40), [0])


def test_local_safetensors_weights_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = load_backbone("vit_tiny_patch16_224", weights=path, **TINY)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.forward(x), tiny.forward(x))


def test_pth_weights_are_loaded_without_unpickling_objects(tiny, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny.model.state_dict(), "payload": object()}, path)
    with pytest.raises(ModelError, match="Refused to load .*nothing in it was executed"):
        load_backbone("vit_tiny_patch16_224", weights=path, **TINY)


@pytest.mark.parametrize("problem, kwargs, message", [
    ("missing file", dict(weights="/nonexistent/w.safetensors"), "does not exist"),
    ("unknown name", dict(), "no model named"),
])
def test_bad_inputs_raise_clear_errors(problem, kwargs, message):
    name = "vit_tinny_patch16_224" if problem == "unknown name" else "vit_tiny_patch16_224"
    with pytest.raises(ModelError, match=message):
        load_backbone(name, **kwargs)


def test_state_dict_for_another_architecture(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ModelError, match="does not fit"):
        load_backbone("vit_tiny_patch16_224", weights=path, **TINY)


def test_non_vit_model_is_rejected():
    with pytest.raises(ModelError, match="not a timm Vision Transformer"):
        Backbone(timm.create_model("resnet18", num_classes=0))


@pytest.mark.parametrize(("name", "kwargs", "rows_path"), [
    ("vit_tiny_patch16_224", {}, True),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "embed_dim": 48, "depth": 2, "num_heads": 2}, True),
    ("vit_tiny_patch16_224", {"qk_norm": True, "init_values": 0.1, "qkv_bias": False}, True),
    ("vit_tiny_patch16_224", {"block_fn": timm.models.vision_transformer.ResPostBlock}, False),
])
def test_run_block_rows_equals_the_whole_block_at_the_rows(name, kwargs, rows_path):
    """The block's own output at the rows (their attention reads every token). From the second call on, timm's
    pre-norm Block computes only the rows' part (its MLP sees the rows alone); any other block runs whole."""
    torch.manual_seed(0)
    backbone = load_backbone(name, **({**TINY, **kwargs} if name.startswith("vit_tiny") else kwargs))
    size = backbone.img_size[0]
    tokens = backbone.forward_taps(torch.randn(3, 3, size, size), [0])[0]
    block = backbone.model.blocks[1]
    whole = block(tokens)
    for seed in (1, 2):
        rows = torch.rand(tokens.shape[:2], generator=torch.Generator().manual_seed(seed)) < 0.3
        rows[0, 1] = True
        mlp_rows = []
        hook = block.mlp.register_forward_hook(lambda _m, args, _o: mlp_rows.append(args[0].shape[0]))
        try:
            out = backbone.run_block_rows(tokens, 1, rows)
        finally:
            hook.remove()
        torch.testing.assert_close(out, whole[rows], rtol=1e-5, atol=1e-5)
    assert (mlp_rows == [int(rows.sum())]) is rows_path


def test_run_block_rows_runs_the_whole_block_where_the_rows_path_disagrees(monkeypatch):
    """A timm version whose Block computes something else than block_rows: the first call's check sees it and every
    call runs the whole block."""
    from singer_deploy.models import block_rows
    backbone = load_backbone("vit_tiny_patch16_224", **TINY)
    right = block_rows.block_rows
    monkeypatch.setattr(block_rows, "block_rows", lambda *args: right(*args) * 1.001)
    tokens = backbone.forward_taps(torch.randn(2, 3, 32, 32), [0])[0]
    rows = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    rows[:, 2:5] = True
    whole = backbone.model.blocks[1](tokens)
    for _ in range(2):
        torch.testing.assert_close(backbone.run_block_rows(tokens, 1, rows), whole[rows], rtol=0, atol=0)
    assert backbone.run_block_rows(tokens, 1, torch.zeros_like(rows)).shape == (0, 48)


def test_run_block_rows_at_every_row_is_the_whole_block(monkeypatch):
    """Every token re-run (a whole-context counterfactual): the block itself, in the order of rows.nonzero(), not
    the row path's gathers."""
    from singer_deploy.models import block_rows
    backbone = load_backbone("vit_tiny_patch16_224", **TINY)
    monkeypatch.setattr(block_rows, "block_rows", lambda *args: pytest.fail("the row path ran"))
    tokens = backbone.forward_taps(torch.randn(2, 3, 32, 32), [0])[0]
    rows = torch.ones(tokens.shape[:2], dtype=torch.bool)
    whole = backbone.model.blocks[1](tokens)
    torch.testing.assert_close(backbone.run_block_rows(tokens, 1, rows), whole[rows], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["no_grad", "graph", "inference"])
@pytest.mark.parametrize("kwargs", [{}, {"qk_norm": True, "init_values": 0.1, "qkv_bias": False}])
def test_run_block_rows_reuses_the_projections_recorded_on_the_raw_stream(kwargs, mode):
    """The counterfactual stream differs from the raw one at the rows only: with the raw forward's queries, keys and
    values recorded, block_rows computes the rows' own and gives the whole block's output on the changed stream, at
    the rows, and at every token when the changed tokens are named apart (L_info's next block on the target). A
    recording made without grad (the training step's) is written in place and put back; one in a graph, or one made
    in inference mode and used outside it, is copied."""
    torch.manual_seed(0)
    backbone = load_backbone("vit_tiny_patch16_224", **{**TINY, **kwargs})
    images = torch.randn(3, 3, 32, 32)
    backbone.requires_grad_(mode == "graph")       # a frozen teacher, as in training, but where the graph is the point
    recording = {"no_grad": torch.no_grad, "graph": torch.enable_grad, "inference": torch.inference_mode}[mode]
    with backbone.record_qkv([1]) as qkv, recording():
        raw = backbone.forward_taps(images, [0, 1])
    assert qkv[1].requires_grad == (mode == "graph") and qkv[1].is_inference() == (mode == "inference")
    raw = {index: tap.clone() for index, tap in raw.items()}
    assert sorted(qkv) == [1] and qkv[1].shape == (3, raw[0].shape[1], 3 * backbone.embed_dim)
    rows = torch.rand(raw[0].shape[:2], generator=torch.Generator().manual_seed(1)) < 0.3
    rows[0, 1] = True
    changed = raw[0].index_put(rows.nonzero(as_tuple=True), 3.0 * torch.randn(int(rows.sum()), backbone.embed_dim))
    whole = backbone.model.blocks[1](changed)
    recorded = qkv[1].clone()
    mlp_rows = []
    hook = backbone.model.blocks[1].mlp.register_forward_hook(lambda _m, args, _o: mlp_rows.append(args[0].shape[0]))
    try:
        for _ in range(2):                     # the first call checks the rows path against the whole block
            out = backbone.run_block_rows(changed, 1, rows, qkv[1])
            torch.testing.assert_close(out, whole[rows], rtol=1e-5, atol=1e-5)
        every = torch.ones_like(rows)
        out = backbone.run_block_rows(changed, 1, every, qkv[1], changed=rows)
    finally:
        hook.remove()
    torch.testing.assert_close(out.reshape(whole.shape), whole, rtol=1e-5, atol=1e-5)
    assert mlp_rows[-1] == every.sum() and mlp_rows[-2] == rows.sum()     # the row path ran, not the whole block
    torch.testing.assert_close(qkv[1], recorded, rtol=0, atol=0)              # the recording is left as it was
    with backbone.record_qkv([1]) as later:
        pass
    backbone.forward_taps(images, [1])                                         # outside the `with`: not recorded
    assert later == {}
