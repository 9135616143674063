"""precision 'auto': candidates per target, the fastest passing one ships, and every other row says why not."""

from __future__ import annotations

import pytest

from singer_deploy.calibration.auto_precision import (Candidate, auto_candidates, decide, realised_reason,
                                                     slower_int8_warnings)
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


# Synthetic timing tables, one per CPU class: (format, precision) -> (gate passes, realised, p50 ms at batch 1, at 8).
# No timing here: the decision is checked on given tables shaped like each class's measurements (docs/export.md).
AVX2_TABLE = {("onnx", "fp32"): (True, "fp32", 2.0, 11.0), ("onnx", "int8"): (True, "int8 12/14 + fp32", 2.4, 9.0),
              ("openvino", "fp32"): (True, "fp32", 1.8, 10.0),
              ("openvino", "int8"): (True, "int8 8/10 + fp32", 2.1, 8.5)}
VNNI_TABLE = {("onnx", "fp32"): (True, "fp32", 2.0, 11.0), ("onnx", "int8"): (True, "int8 12/14 + fp32", 1.1, 5.0),
              ("openvino", "fp32"): (True, "fp32", 1.8, 10.0),
              ("openvino", "int8"): (True, "int8 8/10 + fp32", 0.9, 4.0)}
AMX_TABLE = {("onnx", "fp32"): (True, "fp32", 2.0, 11.0), ("onnx", "int8"): (True, "int8 12/14 + fp32", 1.1, 5.0),
             ("openvino", "fp32"): (True, "fp32", 1.8, 10.0), ("openvino", "bf16"): (True, "bf16", 0.8, 2.5),
             ("openvino", "int8"): (True, "int8 8/10 + fp32", 0.9, 2.2)}


def _candidates(target: str, table: dict) -> list[Candidate]:
    """What export_auto hands decide(): every planned candidate, the native ones built and timed per the table."""
    out = []
    for fmt, precision, why in auto_candidates(["onnx", "openvino"], TARGETS[target]):
        if why is not None or (fmt, precision) not in table:
            out.append(Candidate(fmt, precision, not_native=why or "not built"))
            continue
        passed, realised, b1, b8 = table[(fmt, precision)]
        out.append(Candidate(fmt, precision, not_native=realised_reason(precision, realised), gate_passed=passed,
                             realised=realised, p50_ms=b1, p50_ms_at={1: b1, 8: b8},
                             gate_failures=[] if passed else ["cls: token_cos_min 0.99 < 0.999"]))
    return out


def _rows(decision) -> dict[str, dict]:
    return {row["key"]: row for row in decision.rows}


def test_avx2_ships_fp32_where_int8_is_slower_and_ranks_batch_8():
    decision = decide(_candidates("avx2", AVX2_TABLE), TARGETS["avx2"], benchmarked=True, batch_sizes=(1, 8))
    assert decision.chosen == {"onnx": "onnx/fp32", "openvino": "openvino/fp32"}
    rows = _rows(decision)
    assert not rows["openvino/bf16"]["native"] and "AVX512-BF16" in rows["openvino/bf16"]["reason"]
    assert not rows["onnx/fp16"]["native"] and rows["onnx/int8"]["reason"].startswith("slower: 2.40 ms")
    # At batch 8 INT8 wins on this table: ranked first there, while batch 1 (the first size) decides what ships.
    assert decision.rankings[8] == {"onnx": ["onnx/int8", "onnx/fp32"], "openvino": ["openvino/int8", "openvino/fp32"]}
    assert rows["openvino/int8"]["p50_ms@8"] == 8.5 and "p50_ms@1" not in rows["openvino/int8"]
    assert "batch 8, openvino: openvino/int8 8.50 ms < openvino/fp32 10.00 ms; shipped openvino/fp32 is 0.85x" \
        in decision.ranking_lines()[1]


def test_vnni_ships_int8_and_has_no_bf16_candidate():
    decision = decide(_candidates("avx512_vnni", VNNI_TABLE), TARGETS["avx512_vnni"], benchmarked=True)
    assert decision.chosen == {"onnx": "onnx/int8", "openvino": "openvino/int8"}
    assert decision.rankings == {1: {"onnx": ["onnx/int8", "onnx/fp32"],
                                     "openvino": ["openvino/int8", "openvino/fp32"]}}
    assert [k for k, r in _rows(decision).items() if r["native"]] == ["onnx/fp32", "onnx/int8", "openvino/fp32",
                                                                       "openvino/int8"]
    assert decision.ranking_lines() == []   # one batch size: nothing else to rank


def test_amx_gates_and_times_bf16_and_ships_whichever_of_bf16_and_int8_wins():
    bf16_wins = decide(_candidates("amx", AMX_TABLE), TARGETS["amx"], benchmarked=True, batch_sizes=(1, 8))
    rows = _rows(bf16_wins)
    assert rows["openvino/bf16"]["native"] and rows["openvino/bf16"]["gate"] == "pass"
    assert bf16_wins.chosen == {"onnx": "onnx/int8", "openvino": "openvino/bf16"}
    assert rows["openvino/int8"]["reason"] == "slower: 0.90 ms vs openvino/bf16 0.80 ms (0.89x its speed)"
    assert bf16_wins.rankings[8]["openvino"][:2] == ["openvino/int8", "openvino/bf16"]
    int8_wins = {**AMX_TABLE, ("openvino", "bf16"): (True, "bf16", 1.0, 2.5)}
    assert decide(_candidates("amx", int8_wins), TARGETS["amx"], benchmarked=True).chosen["openvino"] == \
        "openvino/int8"
    bf16_fails = {**AMX_TABLE, ("openvino", "bf16"): (False, "bf16", 0.8, 2.5)}
    failed = decide(_candidates("amx", bf16_fails), TARGETS["amx"], benchmarked=True)
    assert failed.chosen["openvino"] == "openvino/int8"
    assert _rows(failed)["openvino/bf16"]["reason"].startswith("failed gate: cls")


def test_native_follows_the_realised_precision():
    # amx_fp16 computes FP16 natively, but an FP16 ONNX graph whose MatMuls ONNX Runtime runs in FP32 is not.
    table = {**AMX_TABLE, ("onnx", "fp16"): (True, "fp32", 0.5, 2.0), ("openvino", "fp16"): (True, "fp16", 1.5, 6.0)}
    decision = decide(_candidates("amx_fp16", table), TARGETS["amx_fp16"], benchmarked=True)
    rows = _rows(decision)
    assert not rows["onnx/fp16"]["native"] and rows["onnx/fp16"]["reason"].startswith("not native: realised fp32")
    assert decision.chosen["onnx"] == "onnx/int8"      # the faster but mislabelled FP16 file does not ship
    assert rows["openvino/fp16"]["native"]
    assert realised_reason("int8", "int8 8/10 + fp32") is None and realised_reason("bf16", None) is None
    assert realised_reason("bf16", "fp32").startswith("not native: realised fp32")


@pytest.mark.parametrize("target, shipped", [("avx2", "openvino/fp32"), ("avx512_bf16", "openvino/int8"),
                                             ("amx", "openvino/int8")])
def test_untimed_targets_follow_their_rule_with_bf16_among_the_candidates(target, shipped):
    candidates = [c for c in _candidates(target, AMX_TABLE) if c.format == "openvino" and c.not_native is None]
    for c in candidates:
        c.p50_ms, c.p50_ms_at = None, {}
    decision = decide(candidates, TARGETS[target], benchmarked=False, batch_sizes=(1, 8))
    assert decision.chosen == {"openvino": shipped} and decision.rankings == {}
