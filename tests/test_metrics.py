import math

import pytest
import torch

from singer_deploy.method.metrics import (artifact_metrics, high_norm_mask, mask_precision_recall,
                                          normal_token_cosine)


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
    assert math.isnan(normal_token_cosine(a, b, torch.zeros_like(normal)))
