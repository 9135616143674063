"""The run's verdict (reporting/verdict.py) from real parity reports and artifact rows, and the number format the
report, the summary and the verdict share (reporting/numbers.py)."""

import re

import numpy as np
import pytest

from singer_deploy.export.parity import compare_outputs
from singer_deploy.reporting.numbers import fmt, fmt_cosine, fmt_short
from singer_deploy.reporting.verdict import build_verdict, headline, state, verdict_lines

JUDGED = ("refined teacher", "student (projected)")
ROWS = [{"method": "raw teacher", "layer": 4, "artifact_ratio": 10.43, "artifact_cos_clean": 0.091},
        {"method": "clean twin", "layer": 4, "artifact_ratio": 0.713, "artifact_cos_clean": 1.0},
        {"method": "refined teacher", "layer": 4, "artifact_ratio": 0.71, "artifact_cos_clean": 0.997},
        {"method": "student (projected)", "layer": 4, "artifact_ratio": 0.81, "artifact_cos_clean": 0.84},
        {"method": "raw teacher", "layer": 7, "artifact_ratio": 10.27, "artifact_cos_clean": 0.095},
        {"method": "refined teacher", "layer": 7, "artifact_ratio": 2.96, "artifact_cos_clean": 0.3},
        {"method": "student (projected)", "layer": 7, "artifact_ratio": 1.2, "artifact_cos_clean": 0.5}]


@pytest.fixture(scope="module")
def reports():
    rng = np.random.default_rng(0)
    reference = {"patch_tokens": rng.normal(size=(8, 16, 8)), "cls": rng.normal(size=(8, 8))}
    close = {k: v + rng.normal(scale=1e-6, size=v.shape) for k, v in reference.items()}
    noisy = {k: v + rng.normal(scale=0.3, size=v.shape) for k, v in reference.items()}
    return {"onnx/fp32": compare_outputs(reference, close, "fp32", candidate_name="onnx/fp32"),
            "openvino/int8": compare_outputs(reference, noisy, "int8", candidate_name="openvino/int8"),
            "tensorrt/fp16": None}


def test_parity_names_the_worst_check_of_each_artifact_against_its_gate(reports):
    verdict = build_verdict(parity=reports)
    items = {item["artifact"]: item for item in verdict["parity"]}
    assert verdict["passed"] is False and state(verdict) == "FAIL"
    assert items["onnx/fp32"]["passed"] is True and items["openvino/int8"]["passed"] is False
    assert items["tensorrt/fp16"] == {"artifact": "tensorrt/fp16", "passed": None, "worst": None}
    for key in ("onnx/fp32", "openvino/int8"):
        worst = items[key]["worst"]
        checks = [check for output in reports[key].outputs.values() for check in output.checks]
        # The worst is a real check of the report, and the one that uses the largest share of its gate.
        assert (worst["metric"], worst["threshold"]) in {(c.metric, c.threshold) for c in checks}
        failed = [c for c in checks if not c.passed]
        assert (worst["budget_used"] is None or worst["budget_used"] > 1) == bool(failed)
    failing = {c.metric for output in reports["openvino/int8"].outputs.values() for c in output.checks if not c.passed}
    assert items["openvino/int8"]["worst"]["metric"] in failing
    assert "parity FAILED for openvino/int8" in headline(verdict)


def test_artifacts_per_layer_remain_only_where_a_judged_source_is_above_the_limit():
    verdict = build_verdict(artifact_rows=ROWS, judged=JUDGED, remain_limit=1.5)
    four, seven = verdict["artifacts"]
    assert (four["layer"], four["remain"], seven["layer"], seven["remain"]) == ("4", False, "7", True)
    assert [s["source"] for s in four["sources"]] == ["raw teacher", "clean twin", "refined teacher",
                                                      "student (projected)"]
    assert state(verdict) == "WARN" and "artifacts REMAIN at layer 7" in headline(verdict)
    lines = verdict_lines(verdict)
    assert any("layer 4" in line and "removed" in line and "raw teacher 10.4x" in line and "(limit 1.5x)" in line
               for line in lines)
    # The cosine to the clean twin is shown for the judged sources only (the raw teacher's is a reference).
    assert any("cosine to the clean twin: refined teacher 0.997, student (projected) 0.84" in line for line in lines)


def test_shipped_artifacts_carry_latency_speedup_and_the_auto_decision():
    latency = [{"runner": "pytorch/fp32", "p50_ms": 4.29}, {"runner": "onnx/int8", "p50_ms": 1.2,
                                                             "speedup_vs_pytorch/fp32": 3.575},
               {"runner": "openvino/fp32", "p50_ms": 1.7, "speedup_vs_pytorch/fp32": 2.52},
               {"runner": "openvino/fp32@default", "p50_ms": 1.44}]
    decision = [{"key": "onnx/int8", "chosen": True, "reason": "fastest passing (1.2 ms vs fp32 1.6 ms)"},
                {"key": "onnx/fp32", "chosen": False, "reason": "slower"},
                {"key": "openvino/fp32", "chosen": True, "reason": "int8 slower here"}]
    verdict = build_verdict(shipped={"onnx": "onnx/int8", "openvino": "openvino/fp32"}, decision=decision,
                            latency_rows=latency)
    onnx, openvino = verdict["shipped"]
    assert (onnx["artifact"], onnx["p50_ms"], onnx["speedup"], onnx["auto"]) == (
        "onnx/int8", 1.2, 3.575, "fastest passing (1.2 ms vs fp32 1.6 ms)")
    assert openvino["default_p50_ms"] == 1.44
    lines = verdict_lines(verdict)
    assert any(line.split()[:3] == ["shipped", "onnx", "onnx/int8"] and "1.2 ms p50, 3.58x eager" in line
               and "auto: fastest passing" in line for line in lines)


def test_any_warning_shows_without_a_change_to_the_verdict():
    new_kind = "layer 7: the estimate explains only 41% of the artifact tokens' excess energy (below 95%)"
    verdict = build_verdict(warnings=["quantile trap at layer 4: ...", new_kind])
    assert verdict["warnings"][1] == new_kind and state(verdict) == "WARN"
    assert f"  warning  {new_kind}" in verdict_lines(verdict) and "2 warnings" in headline(verdict)


@pytest.mark.parametrize("value, text", [
    (0.000976562, "9.77e-04"), (1.1376e-05, "1.14e-05"), (2.67557, "2.676"), (10.4349, "10.43"), (117.44, "117.4"),
    (0.11940001, "0.1194"), (0.5, "0.5000"), (12345.6, "12346"), (0.0, "0"), (3, "3"), (None, "—"), (True, "yes"),
    (float("nan"), "n/a"), (np.float32(0.25), "0.2500")])
def test_numbers_have_3_to_4_significant_digits_and_an_exponent_only_when_tiny(value, text):
    assert fmt(value) == text


def test_no_formatted_number_has_more_than_4_decimals_or_an_unneeded_exponent():
    for value in np.concatenate([np.logspace(-8, 6, 400), -np.logspace(-8, 6, 50)]):
        text = fmt(float(value))
        assert not re.search(r"\.\d{5,}", text), (value, text)
        assert ("e" in text) == (abs(value) < 1e-3), (value, text)


def test_cosines_near_one_keep_the_digits_that_decide_a_gate():
    assert fmt_cosine(0.999993) == "1 - 7.0e-06" and fmt_cosine(0.99999) == "1 - 1.0e-05"
    assert fmt_cosine(0.9123) == "0.9123" and fmt_cosine(1.0) == "1" and fmt_cosine(None) == "—"
    assert fmt_short(0.713) == "0.713" and fmt_short(10.4349) == "10.4" and fmt_short(1.5) == "1.5"
