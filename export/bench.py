"""Latency / throughput benchmark of runners on the same inputs, as rows, a markdown table and JSON.

Every runner is timed with the same batch: warm-up runs first (first-call allocation and kernel selection are not
latency), then per-call wall time at batch 1 (p50/p90/p99) and images/s at a larger batch. Peak memory is the
process's peak RSS (`resource.getrusage`), which only grows: it is reported after each runner, so compare the
increase between rows, not the absolute value of later rows.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from singer_deploy.errors import ConfigError
from singer_deploy.export.runner import Runner


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def artifact_size_mb(path: str | Path | None) -> float | None:
    """Size on disk; an OpenVINO IR counts its .xml and .bin."""
    if path is None:
        return None
    path = Path(path)
    parts = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(p.stat().st_size for p in parts if p.is_file()) / (1024 * 1024)


def benchmark_runner(runner: Runner, images: np.ndarray, *, label: str | None = None, warmup: int = 5,
                     iters: int = 30, throughput_batch: int = 8, throughput_iters: int = 5,
                     artifact: str | Path | None = None, build_seconds: float | None = None) -> dict:
    """Time one runner: batch-1 latency percentiles (ms) and throughput (images/s) at `throughput_batch`."""
    if images.ndim != 4 or len(images) < 1:
        raise ConfigError("Benchmark images must be a (B, C, H, W) batch", expected="B >= 1",
                          found=str(images.shape), fix="pass at least one image")
    start = time.perf_counter()
    runner.load()
    load_seconds = time.perf_counter() - start
    one = images[:1]
    for _ in range(warmup):
        runner.run(one)
    latencies = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.run(one)
        latencies.append((time.perf_counter() - t0) * 1000)
    reps = int(np.ceil(throughput_batch / len(images)))
    big = np.concatenate([images] * reps)[:throughput_batch]
    runner.run(big)   # warm-up at the larger shape
    t0 = time.perf_counter()
    for _ in range(throughput_iters):
        runner.run(big)
    throughput = throughput_batch * throughput_iters / (time.perf_counter() - t0)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return {"runner": label or runner.name, "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "throughput_ips": float(throughput), "throughput_batch": throughput_batch,
            "size_mb": artifact_size_mb(artifact), "build_s": build_seconds, "load_s": load_seconds,
            "peak_rss_mb": peak_rss_mb(), "info": dict(runner.info)}


def add_ratios(rows: list[dict], baseline: str) -> list[dict]:
    """Speed-up of every row's p50 over the baseline row's p50 (same run, same inputs)."""
    base = next((r for r in rows if r["runner"] == baseline), None)
    if base is None:
        raise ConfigError("Benchmark baseline row missing", expected=baseline,
                          found=", ".join(r["runner"] for r in rows), fix="name a benchmarked runner")
    return [{**r, "speedup_vs_" + baseline: base["p50_ms"] / r["p50_ms"]} for r in rows]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or [k for k in rows[0] if k != "info"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)
