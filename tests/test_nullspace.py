"""Nullspace basis: orientation, both selection rules, padding, gated MLPs, errors."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.layers.mlp import GatedMlp, GluMlp, SwiGLU, SwiGLUPacked
from torch import nn

from singer_deploy.errors import ConfigError, ModelError
from singer_deploy.method.nullspace import block_nullspace, nullspace_basis, surrogate_block, surrogate_matrix


def _matrix_with_spectrum(sigmas: list[float], seed: int = 0) -> torch.Tensor:
    d = len(sigmas)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T


def _orthonormal(basis: torch.Tensor) -> bool:
    return torch.allclose(basis @ basis.T, torch.eye(basis.shape[0], dtype=basis.dtype), atol=1e-10)


def test_surrogate_orientation_matches_fc2_fc1_transposed():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48, num_heads=2)
    mlp = model.blocks[1].mlp
    m = surrogate_matrix(model.blocks[1])
    assert m.dtype == torch.float64 and m.shape == (48, 48)
    torch.testing.assert_close(m, (mlp.fc2.weight.double() @ mlp.fc1.weight.double()).T)
    # Row convention: x M is the linear FFN path fc2(fc1(x)) without biases.
    x = torch.randn(3, 48, dtype=torch.float64)
    expected = (x @ mlp.fc1.weight.double().T) @ mlp.fc2.weight.double().T
    torch.testing.assert_close(x @ m, expected)


def test_smallest_rule_is_orthonormal_and_nearly_annihilated():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48, num_heads=2)
    m = surrogate_matrix(model.blocks[1])
    result = nullspace_basis(m, 8, rule="smallest", tau=0.05)
    assert result.basis.shape == (8, 48) and _orthonormal(result.basis)
    sigmas = torch.linalg.svdvals(m)
    torch.testing.assert_close(result.sigmas.sort().values, sigmas[-8:].sort().values)
    gains = (result.basis @ m).norm(dim=1)
    assert torch.all(gains <= result.sigmas + 1e-10)
    assert gains.max() <= sigmas[-8] + 1e-10          # never above the 8th smallest singular value
    assert result.rule == "smallest" and result.num_padded == 0


def test_official_rule_keeps_the_largest_below_tau():
    spectrum = [2.0, 1.5, 1.0, 0.5, 0.04, 0.03, 0.02, 0.01]
    m = _matrix_with_spectrum(spectrum)
    official = nullspace_basis(m, 2, rule="official", tau=0.05)
    smallest = nullspace_basis(m, 2, rule="smallest", tau=0.05)
    assert official.k == 4 and smallest.k == 4
    torch.testing.assert_close(official.sigmas, torch.tensor([0.04, 0.03], dtype=torch.float64))
    torch.testing.assert_close(smallest.sigmas, torch.tensor([0.01, 0.02], dtype=torch.float64))
    assert _orthonormal(official.basis) and _orthonormal(smallest.basis)


def test_official_rule_pads_with_seeded_orthogonal_rows_and_warns():
    m = _matrix_with_spectrum([3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.01, 0.001])
    with pytest.warns(UserWarning, match="padding with 3 random orthogonal rows"):
        result = nullspace_basis(m, 5, rule="official", tau=0.05, seed=7)
    assert result.k == 2 and result.num_padded == 3 and _orthonormal(result.basis)
    with pytest.warns(UserWarning):
        again = nullspace_basis(m, 5, rule="official", tau=0.05, seed=7)
    torch.testing.assert_close(result.basis, again.basis)


def test_official_rule_warns_when_threshold_is_below_most_sigmas():
    m = _matrix_with_spectrum([0.04 - 0.004 * i for i in range(10)])   # all below tau: the random-init case
    with pytest.warns(UserWarning, match="opposite of a nullspace"):
        result = nullspace_basis(m, 3, rule="official", tau=0.05)
    assert result.k == 10
    assert result.sigmas.min() > 0.03                                    # it picked the largest ones
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nullspace_basis(m, 3, rule="smallest", tau=0.05).sigmas.max() < 0.013       # 0.004, 0.008, 0.012


def test_gated_mlps_use_the_value_branch():
    swiglu = SwiGLU(16, 32)
    torch.testing.assert_close(surrogate_matrix(swiglu), (swiglu.fc2.weight @ swiglu.fc1_x.weight).T.double())
    packed = SwiGLUPacked(16, 64)               # act(x1) * x2: the value is the second half
    value = packed.fc1.weight.chunk(2, dim=0)[1]
    torch.testing.assert_close(surrogate_matrix(packed), (packed.fc2.weight @ value).T.double())
    glu = GluMlp(16, 64)                         # x1 * act(x2): the value is the first half
    value = glu.fc1.weight.chunk(2, dim=0)[0]
    torch.testing.assert_close(surrogate_matrix(glu), (glu.fc2.weight @ value).T.double())


def test_unknown_mlp_and_bad_rank_raise():
    with pytest.raises(ModelError, match="Unsupported MLP"):
        surrogate_matrix(GatedMlp(16, 64, gate_layer=lambda dim, **_: nn.Identity()))
    with pytest.raises(ModelError, match="Unsupported MLP"):
        surrogate_matrix(nn.Sequential(nn.Linear(4, 4)))
    block = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=16, num_heads=2).blocks[0]
    with pytest.raises(ConfigError, match="rank"):
        block_nullspace(block, 17)
    with pytest.raises(ConfigError, match="rule"):
        block_nullspace(block, 4, rule="largest")


def test_the_surrogate_block_is_the_next_one_or_at_the_last_block_the_block_itself():
    assert [surrogate_block(layer, 3) for layer in range(3)] == [1, 2, 2]
