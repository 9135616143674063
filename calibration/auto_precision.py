"""`precision: auto`: which precision each CPU format ships, and a table that says why every other one was not.

Per format, the candidates are the precisions the format carries that the target CPU computes natively (FP32
always, INT8 on every AVX2-class target, BF16 with AVX512-BF16 / AMX-BF16, FP16 only with AVX512-FP16 / AMX-FP16; see
export/hardware.py). For OpenVINO a candidate is an IR and the inference precision hint it runs at: "openvino/bf16"
is the FP32 IR executed in bf16, gated with the bf16 gate. A built candidate whose runtime reports another realised
precision than the one asked for (an FP16 ONNX graph whose MatMuls ONNX Runtime runs in FP32 on a CPU) is not native
either: "native" follows what runs, not the label. Each native candidate is gated against eager PyTorch; when the
target is this host, each passing one is timed at every deployment batch size and the fastest at the first batch
size ships; the others get a ranking. When the target is another CPU nothing here can time it, so the target's rule
decides: INT8 where the target has VNNI / AMX (its INT8 kernels are both exact and fast there), else native BF16,
else native FP16, else FP32.

Every candidate gets one row: realised precision (read back from the artifact and its runtime), gate, latency at
each batch size, whether it ships, and the reason ("failed gate: ...", "slower: ...", "not native: ...").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from singer_deploy.config import CPU_FORMATS, FORMAT_PRECISIONS, format_name
from singer_deploy.errors import ConfigError
from singer_deploy.export.hardware import CpuCapabilities

CPU_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
# Realised-precision labels list the lowest precision first ("int8 12/14 + fp32", realised_runtime.label).
_UNREAD = ("unknown", "")


def native_reason(precision: str, target: CpuCapabilities) -> str | None:
    """None when `target` computes `precision` natively, else why not."""
    if precision in target.native_precisions():
        return None
    where = target.isa if target.name == "host" else target.name
    if precision == "fp16":
        return f"not native: {where} has no AVX512-FP16 / AMX-FP16 (FP16 weights would be computed in FP32)"
    if precision == "bf16":
        return f"not native: {where} has no AVX512-BF16 / AMX-BF16"
    return f"not native on {target.name}"


def realised_reason(precision: str, realised: str | None) -> str | None:
    """None when the runtime computes the products in `precision` (its realised label starts with it, or could not
    be read), else why the candidate is not native although the target's instructions would allow it."""
    if realised is None or realised in _UNREAD or realised.split()[0] == precision:
        return None
    return f"not native: realised {realised} on this host (the runtime does not compute this {precision} " \
           "artifact's products in " + precision + ")"


def auto_candidates(formats: list[str], target: CpuCapabilities) -> list[tuple[str, str, str | None]]:
    """(format, precision, reason it is not native or None) for every CPU format and precision it carries."""
    rows = []
    for name in formats:
        fmt = format_name(name)
        if fmt not in CPU_FORMATS:
            raise ConfigError(f"precision 'auto' chooses among CPU artifacts; {fmt} runs on a GPU",
                              expected="formats onnx and/or openvino with precision auto",
                              found=f"format {fmt}", fix=f"name the {fmt} precision (fp16, int8 ...) "
                              "in a separate export, or drop it from formats")
        rows += [(fmt, p, native_reason(p, target)) for p in CPU_PRECISIONS if p in FORMAT_PRECISIONS[fmt]]
    return rows


@dataclass
class Candidate:
    """One built (or skipped) candidate with what the run measured about it."""

    format: str
    precision: str
    not_native: str | None = None       # why it was not built
    gate_passed: bool | None = None     # None: not built
    gate_failures: list[str] = field(default_factory=list)
    p50_ms: float | None = None         # at the first deployment batch size; None: not benchmarked
    realised: str | None = None         # realised precision, read back
    runner_options: dict = field(default_factory=dict)        # e.g. the OpenVINO inference precision hint
    p50_ms_at: dict[int, float] = field(default_factory=dict)  # batch size -> p50, every timed batch size

    @property
    def key(self) -> str:
        return f"{self.format}/{self.precision}"


@dataclass
class AutoDecision:
    target: str
    benchmarked: bool                    # False when the target is not this host
    chosen: dict[str, str]               # format -> shipped key
    rows: list[dict]                     # one per candidate, with "chosen" and "reason"
    batch_sizes: tuple[int, ...] = (1,)  # the first decides; the others are ranked
    rankings: dict[int, dict[str, list[str]]] = field(default_factory=dict)   # batch -> format -> keys, fastest first

    @property
    def fastest(self) -> str | None:
        """The fastest shipped artifact over all formats (None when not benchmarked)."""
        timed = [r for r in self.rows if r["chosen"] and r["p50_ms"] is not None]
        return min(timed, key=lambda r: r["p50_ms"])["key"] if timed else None

    def to_dict(self) -> dict:
        return {"target": self.target, "benchmarked": self.benchmarked, "chosen": dict(self.chosen),
                "fastest": self.fastest, "batch_sizes": list(self.batch_sizes),
                "rankings": {str(b): r for b, r in self.rankings.items()}, "ranking_lines": self.ranking_lines(),
                "table": list(self.rows)}

    def ranking_lines(self) -> list[str]:
        """One line per format and further batch size: its passing candidates fastest first, and how the shipped
        one compares there ("1.00x" when it is the fastest there too)."""
        p50 = {row["key"]: row for row in self.rows}
        lines = []
        for batch in self.batch_sizes[1:]:
            for fmt, keys in self.rankings.get(batch, {}).items():
                shipped = self.chosen.get(fmt)
                if not keys or shipped is None:
                    continue
                column = f"p50_ms@{batch}"
                order = " < ".join(f"{k} {p50[k][column]:.2f} ms" for k in keys)
                lines.append(f"batch {batch}, {fmt}: {order}; shipped {shipped} is "
                             f"{p50[keys[0]][column] / p50[shipped][column]:.2f}x the fastest")
        return lines


def _target_rank(precision: str, target: CpuCapabilities) -> int:
    """Lower is preferred when nothing can be timed: INT8 only where it is exact and fast (VNNI / AMX)."""
    order = (["int8"] if target.int8_without_saturation else []) + ["bf16", "fp16", "fp32", "int8"]
    return order.index(precision)


def decide(candidates: list[Candidate], target: CpuCapabilities, *, benchmarked: bool,
           batch_sizes: tuple[int, ...] = (1,)) -> AutoDecision:
    """Per format, ship the fastest passing native candidate at the first of `batch_sizes` (or the target rule's
    pick when not benchmarked); rank the passing native candidates at every batch size."""
    chosen: dict[str, Candidate] = {}
    for fmt in dict.fromkeys(c.format for c in candidates):
        passing = _passing(candidates, fmt)
        if not passing:
            continue
        if benchmarked:
            chosen[fmt] = min(passing, key=lambda c: (c.p50_ms if c.p50_ms is not None else float("inf")))
        else:
            chosen[fmt] = min(passing, key=lambda c: _target_rank(c.precision, target))
    rows = []
    for c in candidates:
        winner = chosen.get(c.format)
        rows.append({"key": c.key, "format": c.format, "precision": c.precision, "realised": c.realised,
                     "runner_options": dict(c.runner_options), "native": c.not_native is None,
                     "gate": _gate_cell(c), "p50_ms": c.p50_ms,
                     **{f"p50_ms@{b}": c.p50_ms_at.get(b) for b in batch_sizes[1:]},
                     "chosen": winner is c, "reason": _reason(c, winner, benchmarked, target)})
    rankings = {b: {fmt: [c.key for c in sorted((c for c in _passing(candidates, fmt) if b in c.p50_ms_at),
                                                 key=lambda c: c.p50_ms_at[b])]
                    for fmt in chosen} for b in batch_sizes} if benchmarked else {}
    return AutoDecision(target.isa if target.name == "host" else target.name, benchmarked,
                        {fmt: c.key for fmt, c in chosen.items()}, rows, tuple(batch_sizes), rankings)


def _passing(candidates: list[Candidate], fmt: str) -> list[Candidate]:
    return [c for c in candidates if c.format == fmt and c.not_native is None and c.gate_passed]


def _gate_cell(c: Candidate) -> str:
    if c.gate_passed is None:
        return "not built"
    return "pass" if c.gate_passed else "FAIL"


def _reason(c: Candidate, winner: Candidate | None, benchmarked: bool, target: CpuCapabilities) -> str:
    if c.not_native is not None:
        return c.not_native
    if not c.gate_passed:
        return "failed gate: " + ("; ".join(c.gate_failures) or "see parity table") if c.gate_passed is False \
            else "not built"
    if winner is c:
        if benchmarked:
            return "fastest passing candidate on this host"
        return f"target {target.name} is not this host, so not timed here: chosen by the target rule " \
               f"({'INT8 on VNNI/AMX' if target.int8_without_saturation else 'no VNNI/AMX: BF16, FP16, FP32'})"
    if benchmarked and c.p50_ms is not None and winner is not None and winner.p50_ms is not None:
        return f"slower: {c.p50_ms:.2f} ms vs {winner.key} {winner.p50_ms:.2f} ms " \
               f"({winner.p50_ms / c.p50_ms:.2f}x its speed)"
    return f"not preferred for {target.name} (not timed: the target is not this host)"


def slower_int8_warnings(rows: list[dict]) -> list[str]:
    """Explicit INT8 that is slower than FP32 of the same format on this host, one message per format.
    `rows` are benchmark rows with "runner" keys "<format>/<precision>" and "p50_ms"."""
    by_key = {r["runner"]: r for r in rows}
    warnings = []
    for key, row in by_key.items():
        fmt, _, precision = key.partition("/")
        fp32 = by_key.get(f"{fmt}/fp32")
        if precision == "int8" and fp32 is not None and row["p50_ms"] > fp32["p50_ms"]:
            warnings.append(f"{key} is slower than {fmt}/fp32 on this host ({row['p50_ms']:.2f} ms vs "
                            f"{fp32['p50_ms']:.2f} ms, {fp32['p50_ms'] / row['p50_ms']:.2f}x): shipped because "
                            "int8 was asked for; precision 'auto' would ship the faster one")
    return warnings
