"""precision 'auto': candidates per target, the fastest passing one ships, and every other row says why not."""

from __future__ import annotations

import pytest

from singer_deploy.calibration.auto_precision import Candidate, auto_candidates, decide, slower_int8_warnings
from singer_deploy.errors import ConfigError
from singer_deploy.export.hardware import TARGETS


def test_candidates_follow_the_target():
    avx2 = auto_candidates(["onnx", "openvino"], TARGETS["avx2"])
    assert [(f, p) for f, p, why in avx2 if why is None] == [("onnx", "fp32"), ("onnx", "int8"),
                                                              ("openvino", "fp32"), ("openvino", "int8")]
    assert all("not native" in why for f, p, why in avx2 if p == "fp16")
    amx_fp16 = auto_candidates(["openvino"], TARGETS["amx_fp16"])
    assert all(why is None for _, _, why in amx_fp16)
    with pytest.raises(ConfigError, match="CPU artifacts"):
        auto_candidates(["tensorrt"], TARGETS["avx2"])


def _avx2_run(int8_ms: float, int8_passes: bool = True) -> list[Candidate]:
    return [Candidate("openvino", "fp32", gate_passed=True, p50_ms=90.0, realised="f32"),
            Candidate("openvino", "fp16", not_native="not native: no FP16"),
            Candidate("openvino", "int8", gate_passed=int8_passes, p50_ms=int8_ms, realised="int8+f32",
                      gate_failures=[] if int8_passes else ["cls: token_cos_min 0.98 < 0.99"])]


def test_benchmarked_host_ships_the_fastest_passing_candidate_with_reasons():
    slow_int8 = decide(_avx2_run(116.0), TARGETS["avx2"], benchmarked=True)
    assert slow_int8.chosen == {"openvino": "openvino/fp32"} and slow_int8.fastest == "openvino/fp32"
    reasons = {r["key"]: r["reason"] for r in slow_int8.rows}
    assert reasons["openvino/int8"].startswith("slower: 116.00 ms vs openvino/fp32 90.00 ms")
    assert reasons["openvino/fp16"].startswith("not native")
    fast_int8 = decide(_avx2_run(40.0), TARGETS["avx2"], benchmarked=True)
    assert fast_int8.chosen == {"openvino": "openvino/int8"}
    failed = decide(_avx2_run(40.0, int8_passes=False), TARGETS["avx2"], benchmarked=True)
    assert failed.chosen == {"openvino": "openvino/fp32"}
    assert next(r for r in failed.rows if r["key"] == "openvino/int8")["reason"].startswith("failed gate: cls")


@pytest.mark.parametrize("target, shipped", [("avx2", "openvino/fp32"), ("avx512", "openvino/fp32"),
                                             ("avx512_vnni", "openvino/int8"), ("amx", "openvino/int8")])
def test_a_target_that_is_not_this_host_is_decided_by_its_rule(target, shipped):
    candidates = [c for c in _avx2_run(116.0) if c.not_native is None]
    for c in candidates:
        c.p50_ms = None
    decision = decide(candidates, TARGETS[target], benchmarked=False)
    assert decision.chosen == {"openvino": shipped} and decision.fastest is None
    assert "target rule" in next(r for r in decision.rows if r["chosen"])["reason"]


def test_slower_int8_is_named_in_a_warning():
    rows = [{"runner": "openvino/fp32", "p50_ms": 94.0}, {"runner": "openvino/int8", "p50_ms": 116.0},
            {"runner": "onnx/fp32", "p50_ms": 95.0}, {"runner": "onnx/int8", "p50_ms": 60.0}]
    (warning,) = slower_int8_warnings(rows)
    assert warning.startswith("openvino/int8 is slower than openvino/fp32") and "0.81x" in warning
