import math

import pytest
import torch

from singer_deploy.method.metrics import (artifact_metrics, gram_relative_distance, high_norm_mask, linear_cka,
                                   mask_precision_recall, normal_token_cosine, relative_change)


def _tokens_with_outliers(n_tokens=50, n_out=2, ratio=10.0):
    torch.manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(1, n_tokens, 16), dim=-1)
    tokens[0, :n_out] *= ratio
    return tokens


def test_hnr_r_max_and_e_out_on_a_hand_made_case():
    m = artifact_metrics(_tokens_with_outliers())
    assert m["hnr"] == pytest.approx(2 / 50)
    assert m["r_max"] == pytest.approx(10.0, rel=1e-5)
    assert m["e_out"] == pytest.approx(2 * 100 / (2 * 100 + 48), rel=1e-5)


def test_flat_norms_have_no_outliers():
    tokens = torch.nn.functional.normalize(torch.randn(3, 40, 8), dim=-1)
    assert artifact_metrics(tokens) == pytest.approx({"hnr": 0.0, "r_max": 1.0, "e_out": 0.0}, abs=1e-6)


def test_high_norm_mask_and_precision_recall():
    tokens = _tokens_with_outliers()
    truth = torch.zeros(1, 50, dtype=torch.bool)
    truth[0, :3] = True
    assert mask_precision_recall(high_norm_mask(tokens), truth) == pytest.approx((1.0, 2 / 3))


def test_fidelity_metrics():
    a = torch.randn(2, 10, 8)
    assert normal_token_cosine(a, 3 * a) == pytest.approx(1.0)
    assert normal_token_cosine(a, -a) == pytest.approx(-1.0)
    normal = torch.ones(2, 10, dtype=torch.bool)
    normal[:, 0] = False
    b = a.clone()
    b[:, 0] = -b[:, 0]
    assert normal_token_cosine(a, b, normal) == pytest.approx(1.0)
    assert relative_change(1.1 * a, a) == pytest.approx(0.01, rel=1e-4)
    assert gram_relative_distance(a, 2 * a) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(normal_token_cosine(a, b, torch.zeros_like(normal)))


def test_linear_cka_is_invariant_to_rotation_and_scale_but_not_to_noise():
    x = torch.randn(200, 12, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert linear_cka(x, 5 * x @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(200, 12, dtype=torch.float64)) < 0.3
