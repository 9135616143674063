import math

import pytest
import torch

from singer_deploy.method.metrics import (ArtifactStats, artifact_metrics, artifacts_remain, cosine_summary,
                                          high_norm_mask, mask_precision_recall, token_cosines)


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
    torch.testing.assert_close(token_cosines(a, 3 * a), torch.ones(2, 10))
    torch.testing.assert_close(token_cosines(a, -a), -torch.ones(2, 10))
    normal = torch.ones(2, 10, dtype=torch.bool)
    normal[:, 0] = False
    b = a.clone()
    b[:, 0] = -b[:, 0]
    assert cosine_summary(token_cosines(a, b)[normal])["mean"] == pytest.approx(1.0)


def _planted_tokens(ratio: float, n_tokens: int = 50, n_art: int = 2, seed: int = 0):
    """Unit-norm normal tokens; the first n_art tokens `ratio` x longer along one fixed artifact direction."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(1, n_tokens, 16, generator=g), dim=-1)
    artifacts = torch.zeros(1, n_tokens, dtype=torch.bool)
    artifacts[0, :n_art] = True
    return tokens, artifacts


def test_a_3x_residual_is_reported_as_a_residual_not_as_zero():
    clean, artifacts = _planted_tokens(1.0)
    raw, shrunk = clean.clone(), clean.clone()
    raw[artifacts] *= 10.0
    shrunk[artifacts] *= 3.0                     # a refinement that shrank the artifacts 10x -> 3x, not away
    stats = ArtifactStats()
    stats.add(shrunk, artifacts, raw=raw, clean=clean)
    result = stats.result()
    assert result["hnr_4"] == 0.0                # the literature's threshold count says "gone" ...
    assert result["hnr_2"] == pytest.approx(2 / 50)   # ... the lower thresholds do not ...
    assert result["artifact_ratio"] == pytest.approx(3.0, rel=1e-5)   # ... and the ratio reads the residual
    assert artifacts_remain(result) is True and artifacts_remain(result, limit=3.5) is False
    assert result["normal_cos"] == pytest.approx(1.0) and result["artifact_cos_clean"] == pytest.approx(1.0)
    assert result["artifact_tokens"] == 2


def test_normal_tokens_are_judged_against_the_clean_twin_too():
    """A teacher whose other tokens read the artifact: its clean twin's normal tokens differ from the raw ones, and a
    refinement that reaches the twin's shows normal_cos (to raw) below 1 and normal_cos_clean at 1."""
    clean, artifacts = _planted_tokens(1.0)
    raw = clean.clone()
    raw[artifacts] *= 10.0
    raw[~artifacts] += 0.5 * raw[artifacts].mean(0)       # every other token reads the artifact
    stats = ArtifactStats()
    stats.add(clean, artifacts, raw=raw, clean=clean)
    result = stats.result()
    assert result["normal_cos_clean"] == pytest.approx(1.0) and result["normal_cos"] < 0.99


def test_artifact_stats_accumulate_batches_and_report_the_cosine_tail():
    clean, artifacts = _planted_tokens(1.0, n_tokens=100)
    rotated = clean.clone()
    rotated[0, 50:52] = -rotated[0, 50:52]       # two flipped normal tokens: the mean barely moves, p1 shows them
    stats = ArtifactStats()
    for half in (slice(0, 50), slice(50, 100)):
        stats.add(rotated[:, half], artifacts[:, half], raw=clean[:, half], next_out=rotated[:, half],
                  raw_next_out=clean[:, half])
    result = stats.result()
    assert result["normal_cos"] == pytest.approx(1.0 - 4 / 98, rel=1e-5)
    assert result["normal_cos_p1"] < 0.0 and result["next_cos_p1"] < 0.0
    assert math.isnan(result["artifact_ratio"]) is False and result["artifact_tokens"] == 2
    summary = cosine_summary(torch.tensor([1.0, 1.0, -1.0]))
    assert summary["min"] == -1.0 and summary["mean"] == pytest.approx(1 / 3)
    assert math.isnan(cosine_summary(torch.tensor([]))["mean"])


def test_without_known_artifacts_the_verdict_falls_back_to_hnr_4():
    tokens, _ = _planted_tokens(1.0)
    stats = ArtifactStats()
    stats.add(tokens, torch.zeros(1, 50, dtype=torch.bool))
    result = stats.result()
    assert math.isnan(result["artifact_ratio"]) and artifacts_remain(result) is False
    assert artifacts_remain({}) is None
