"""The verdict of a run, the first thing the report and the CLI summary show: parity per exported artifact (with its
worst metric against its gate), artifacts per distilled layer (removed / remain, with the ratio and cosine figures),
the artifact shipped per format (latency, speed-up, the `precision: auto` decision) and every warning the run
recorded.

`build_verdict` turns the run's objects into plain JSON (it is stored in the summary and so in manifest.json);
`verdict_lines` prints it for a terminal, report.py draws it as HTML. Warnings are a plain list of sentences: any
stage adds its own (pipeline/api.py collects them) and they show here without a change to this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from singer_deploy.method.metrics import REMAIN_RATIO, artifacts_remain
from singer_deploy.reporting.numbers import fmt, fmt_cosine, fmt_short

# Readable names of the parity metrics (ParityReport.table_rows keys and its checks' metric names).
PARITY_LABELS = {"max_abs": "max abs diff", "max_abs_rel": "max abs / scale", "rel_err_p99": "rel. error p99",
                 "token_cos_min": "token cosine min", "token_cos_p1": "token cosine p1",
                 "image_cos_min": "image cosine min", "knn_overlap": "kNN overlap", "norm_corr": "norm-map corr",
                 "norm_rel_err_max": "norm rel. error max", "nonfinite": "NaN/Inf"}
# Parity cosines: their gates sit within 1e-5 of 1, so they print as their distance to 1 (numbers.fmt_cosine).
PARITY_COSINES = ("token_cos_min", "token_cos_p1", "image_cos_min")
EAGER = "pytorch/fp32"        # the latency table's eager PyTorch row (pipeline.api.EAGER)
SPEEDUP = f"speedup_vs_{EAGER}"


def build_verdict(*, parity: Mapping[str, Any] | None = None, artifact_rows: Sequence[Mapping[str, Any]] = (),
                  judged: Sequence[str] = (), remain_limit: float = REMAIN_RATIO,
                  shipped: Mapping[str, str] | None = None, decision: Sequence[Mapping[str, Any]] = (),
                  latency_rows: Sequence[Mapping[str, Any]] = (), warnings: Sequence[str] = ()) -> dict:
    """`parity`: artifact key -> export.parity.ParityReport (None: not checked); `artifact_rows`: the artifact
    analysis rows (one per source and layer, "method" and "layer" keys); `judged`: the sources whose artifacts decide
    "remain" (the others are shown as references); `shipped`: format -> artifact key (None: every artifact ships);
    `decision`: the precision-auto table rows (key, chosen, reason)."""
    parity = dict(parity or {})
    parity_items = [_parity_item(key, report) for key, report in parity.items()]
    checked = [item["passed"] for item in parity_items if item["passed"] is not None]
    return {"passed": all(checked) if checked else None,
            "parity": parity_items,
            "artifacts": _artifact_items(artifact_rows, judged, remain_limit),
            "shipped": _shipped_items(parity, shipped, decision, latency_rows),
            "warnings": list(warnings)}


def headline(verdict: Mapping[str, Any]) -> str:
    """One sentence: parity over all artifacts, then the artifact state over all layers."""
    parts = []
    items = verdict["parity"]
    if items:
        failed = [item["artifact"] for item in items if item["passed"] is False]
        parts.append(f"parity FAILED for {', '.join(failed)}" if failed else
                     f"all {len(items)} exported artifacts pass their parity gates")
    else:
        parts.append("nothing exported")
    layers = verdict["artifacts"]
    remain = [item["layer"] for item in layers if item["remain"]]
    if layers:
        parts.append(f"artifacts REMAIN at layer {', '.join(remain)}" if remain else
                     f"no artifacts remain at layer {', '.join(item['layer'] for item in layers)}")
    if verdict["warnings"]:
        parts.append(f"{len(verdict['warnings'])} warning{'s' if len(verdict['warnings']) > 1 else ''}")
    return "; ".join(parts)


def state(verdict: Mapping[str, Any]) -> str:
    """PASS, FAIL or WARN (passed, with warnings or remaining artifacts); "NO EXPORT" when nothing was checked."""
    if verdict["passed"] is False:
        return "FAIL"
    if verdict["warnings"] or any(item["remain"] for item in verdict["artifacts"]):
        return "WARN"
    return "PASS" if verdict["passed"] else "NO EXPORT"


def worst_text(worst: Mapping[str, Any] | None) -> str:
    """'patch_tokens token cosine min 1 - 7.0e-06 (gate >= 1 - 1.0e-05)' or the structural problem."""
    if not worst:
        return "not checked"
    if "problem" in worst:
        return worst["problem"]
    show = fmt_cosine if worst["metric"] in PARITY_COSINES else fmt
    label = PARITY_LABELS.get(worst["metric"], worst["metric"])
    return (f"{worst['output']} {label} {show(worst['value'])} "
            f"(gate {worst['op']} {show(float(worst['threshold']))})")


def ratio_text(item: Mapping[str, Any]) -> str:
    """'raw teacher 10.43x, clean twin 0.713x, ...' for one layer's artifact item."""
    return ", ".join(f"{s['source']} {fmt_short(s['ratio'])}x" for s in item["sources"] if s["ratio"] is not None)


def cosine_text(item: Mapping[str, Any]) -> str:
    return ", ".join(f"{s['source']} {fmt_short(s['cos_clean'])}" for s in item["sources"]
                     if s["cos_clean"] is not None and s["judged"])


def latency_text(item: Mapping[str, Any]) -> str:
    if item["p50_ms"] is None:
        return "not timed"
    text = f"{fmt_short(item['p50_ms'])} ms p50"
    if item["speedup"] is not None:
        text += f", {fmt_short(item['speedup'])}x eager"
    if item["default_p50_ms"] is not None:
        text += f" ({fmt_short(item['default_p50_ms'])} ms at the plugin's default hint)"
    return text


def verdict_lines(verdict: Mapping[str, Any]) -> list[str]:
    """The verdict for a terminal: a headline, then aligned rows per part."""
    rows: list[tuple[str, str, str, str]] = []
    for item in verdict["parity"]:
        passed = {True: "pass", False: "FAIL", None: "n/a"}[item["passed"]]
        rows.append(("parity", item["artifact"], passed, "worst: " + worst_text(item["worst"])))
    for item in verdict["artifacts"]:
        status = {True: "REMAIN", False: "removed", None: "unknown"}[item["remain"]]
        rows.append(("artifacts", f"layer {item['layer']}", status,
                     f"artifact/normal norm {ratio_text(item)} (limit {fmt_short(item['limit'])}x)"))
        if cosine_text(item):
            rows.append(("", "", "", f"artifact cosine to the clean twin: {cosine_text(item)}"))
    for item in verdict["shipped"]:
        rows.append(("shipped", item["format"], item["artifact"], latency_text(item)
                     + (f"; auto: {item['auto']}" if item["auto"] else "")))
    rows += [("warning", "", "", text) for text in verdict["warnings"]]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    lines = [f"Verdict: {state(verdict)} - {headline(verdict)}"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths) if width]
        lines.append(("  " + "  ".join(cells) + "  " + row[3]).rstrip())
    return lines


# ---------------------------------------------------------------------------------------------------------------


def _parity_item(key: str, report: Any) -> dict:
    if report is None:
        return {"artifact": key, "passed": None, "worst": None}
    return {"artifact": key, "passed": bool(report.passed), "worst": _worst(report)}


def _worst(report: Any) -> dict | None:
    """The check closest to (or furthest past) its gate: the largest share of the allowed budget used."""
    if report.problems:
        return {"problem": "; ".join(report.problems)}
    checks = [(output.name, check) for output in report.outputs.values() for check in output.checks]
    if not checks:
        return None
    name, check = max(checks, key=lambda pair: _budget_used(pair[1]))
    return {"output": name, "metric": check.metric, "value": check.value, "op": check.op,
            "threshold": check.threshold, "budget_used": _finite(_budget_used(check))}


def _budget_used(check: Any) -> float:
    """How much of its gate a check uses: value / threshold for an upper bound; for a lower bound on a score whose
    best is 1 (cosines, overlaps, correlations), its distance to 1 over the threshold's. Above 1 fails."""
    value, threshold = check.value, check.threshold
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    if check.op == "<=":
        return value / threshold if threshold > 0 else (0.0 if value <= 0 else math.inf)
    if threshold < 1 and value <= 1:
        return (1 - value) / (1 - threshold)
    return threshold / value if value > 0 else math.inf


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def _artifact_items(rows: Sequence[Mapping[str, Any]], judged: Sequence[str], limit: float) -> list[dict]:
    items = []
    for layer in sorted({row["layer"] for row in rows}, key=lambda layer: int(layer)):
        at_layer = [row for row in rows if row["layer"] == layer]
        verdicts = [artifacts_remain(row, limit) for row in at_layer if row["method"] in judged]
        known = [remain for remain in verdicts if remain is not None]
        items.append({"layer": str(layer), "remain": any(known) if known else None, "limit": limit,
                      "sources": [{"source": row["method"], "judged": row["method"] in judged,
                                   "ratio": row.get("artifact_ratio"), "cos_clean": row.get("artifact_cos_clean")}
                                  for row in at_layer]})
    return items


def _shipped_items(parity: Mapping[str, Any], shipped: Mapping[str, str] | None,
                   decision: Sequence[Mapping[str, Any]], latency_rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    by_runner: dict[str, Mapping[str, Any]] = {}
    for row in latency_rows:   # several export.batch_sizes: the first is the one the artifact ships for
        by_runner.setdefault(row["runner"], row)
    reasons = {row["key"]: row["reason"] for row in decision if row.get("chosen")}
    keys = list(shipped.values()) if shipped is not None else list(parity)
    items = []
    for key in keys:
        row, default = by_runner.get(key, {}), by_runner.get(f"{key}@default", {})
        items.append({"format": key.split("/")[0], "artifact": key, "p50_ms": row.get("p50_ms"),
                      "speedup": row.get(SPEEDUP), "default_p50_ms": default.get("p50_ms"),
                      "auto": reasons.get(key)})
    return items
