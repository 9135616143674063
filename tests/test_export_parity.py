import numpy as np
import pytest

from singer_deploy.errors import ConfigError, ParityError
from singer_deploy.config import PRECISION_GATES, ParityPolicy
from singer_deploy.export.parity import compare_outputs


def _outputs(seed=0, b=16, n=9, d=32):
    rng = np.random.default_rng(seed)
    patches = rng.standard_normal((b, n, d)).astype(np.float32)
    patches[:, 3] *= 6.0   # a high-norm token, like a ViT artifact
    return {"cls": rng.standard_normal((b, d)).astype(np.float32), "patch_tokens": patches}


def _noisy(outputs, rel, seed=1):
    rng = np.random.default_rng(seed)
    return {k: (v + rel * np.abs(v).max() * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in outputs.items()}


def test_identical_outputs_pass_every_gate():
    ref = _outputs()
    report = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, "fp32")
    assert report.passed
    m = report.outputs["patch_tokens"].metrics
    assert m["max_abs"] == 0 and m["token_cos_min"] == pytest.approx(1.0) and m["knn_overlap"] == 1.0
    assert m["norm_corr"] == pytest.approx(1.0)


def test_fp16_sized_noise_fails_fp32_but_passes_fp16():
    ref = _outputs()
    cand = _noisy(ref, 3e-4)
    assert not compare_outputs(ref, cand, "fp32").passed
    assert compare_outputs(ref, cand, "fp16").passed


def test_large_noise_fails_int8_gate():
    ref = _outputs()
    report = compare_outputs(ref, _noisy(ref, 0.3), "int8")
    assert not report.passed
    assert any("token_cos_min" in f for f in report.failures())


def test_missing_output_shape_mismatch_and_nan_fail():
    ref = _outputs()
    assert not compare_outputs(ref, {"cls": ref["cls"]}, "fp32").passed
    bad_shape = {"cls": ref["cls"], "patch_tokens": ref["patch_tokens"][:, :4]}
    assert "shape" in compare_outputs(ref, bad_shape, "fp32").problems[0]
    nan = {k: v.copy() for k, v in ref.items()}
    nan["cls"][0, 0] = np.nan
    report = compare_outputs(ref, nan, "int8")
    assert report.outputs["cls"].metrics["nonfinite"] == 1 and not report.passed


def test_knn_overlap_sees_shuffled_images():
    ref = _outputs()
    shuffled = {k: v[np.random.default_rng(3).permutation(len(v))] for k, v in ref.items()}
    report = compare_outputs(ref, shuffled, "int8")
    assert report.outputs["cls"].metrics["knn_overlap"] < 0.9


def test_norm_map_agreement_sees_a_moved_artifact_token():
    ref = _outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["patch_tokens"][:, [3, 5]] = cand["patch_tokens"][:, [5, 3]]   # artifact moved to another token
    report = compare_outputs(ref, cand, "int8")
    metrics = report.outputs["patch_tokens"].metrics
    assert metrics["norm_corr"] < 0.5 and not report.passed


def test_policy_overrides_report_and_raise():
    ref = _outputs()
    cand = _noisy(ref, 3e-4)
    loose = ParityPolicy.for_precision("fp32", max_abs_rel=1e-2, token_cos_min=0.999, image_cos_min=0.999,
                                       rel_err_p99=1e-2, norm_rel_err_max=1e-2, norm_corr_min=0.99)
    assert compare_outputs(ref, cand, "fp32", loose).passed
    with pytest.raises(ConfigError):
        ParityPolicy.for_precision("fp32", cosine=0.5)
    report = compare_outputs(ref, cand, "fp32")
    with pytest.raises(ParityError) as err:
        report.raise_if_failed()
    assert err.value.report["passed"] is False and err.value.report["failures"]
    rows = report.table_rows()
    assert {r["output"] for r in rows} == {"cls", "patch_tokens"}
    assert "FAIL" in report.markdown()


def test_policy_round_trips_through_dict():
    for policy in PRECISION_GATES.values():
        assert ParityPolicy.from_dict(policy.to_dict()) == policy
