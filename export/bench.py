"""Latency / throughput benchmark of runners on the same inputs, as rows, a markdown table and JSON.

Every runner is timed with the same batch: warm-up runs first (first-call allocation and kernel selection are not
latency), then per-call wall time at batch 1 (p50/p90/p99/min) and images/s at a larger batch. Peak memory is the
process's peak RSS (`resource.getrusage`) right after each runner is loaded; it only grows, so compare the increase
between rows, not the absolute value of later rows.
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


def tile_batch(images: np.ndarray, size: int) -> np.ndarray:
    """`size` images, repeating the given ones when there are fewer."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError("Benchmark batch sizes must be positive integers", expected="ints >= 1",
                          found=repr(size), fix="e.g. --batch-sizes 1 8")
    return np.concatenate([images] * int(np.ceil(size / len(images))))[:size]


def benchmark_runners(runners: dict[str, Runner], images: np.ndarray, *, warmup: int = 5, iters: int = 30,
                      rounds: int = 3, throughput_batch: int = 8, throughput_iters: int = 5,
                      artifacts: dict[str, str | Path] | None = None,
                      build_seconds: dict[str, float] | None = None, batch: int = 1) -> list[dict]:
    """Time runners on the same inputs: latency percentiles (ms) per call of `batch` images (default 1) and
    throughput (images/s) at `throughput_batch`.

    Timed calls run in `rounds` blocks per runner, interleaved (A A A, B B B, C C C, A A A ...), so that load
    from other processes on a shared machine falls on every runner alike instead of on whichever ran during a
    busy spell; blocks rather than single calls because runtimes keep their thread pools spinning briefly after
    a call, which would tax the next runner. `min_ms` is the least disturbed call.
    """
    if images.ndim != 4 or len(images) < 1:
        raise ConfigError("Benchmark images must be a (B, C, H, W) batch", expected="B >= 1",
                          found=str(images.shape), fix="pass at least one image")
    artifacts, build_seconds = artifacts or {}, build_seconds or {}
    one, big = tile_batch(images, batch), tile_batch(images, throughput_batch)
    loaded: dict[str, dict] = {}
    for label, runner in runners.items():
        start = time.perf_counter()
        runner.load()
        loaded[label] = {"load_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
        for _ in range(warmup):
            runner.run(one)
        runner.run(big)   # first call at the larger shape allocates
    latencies: dict[str, list[float]] = {label: [] for label in runners}
    per_block = int(np.ceil(iters / max(rounds, 1)))
    for _ in range(max(rounds, 1)):
        for label, runner in runners.items():
            for _ in range(per_block):
                t0 = time.perf_counter()
                runner.run(one)
                latencies[label].append((time.perf_counter() - t0) * 1000)
    spent = {label: 0.0 for label in runners}
    for _ in range(throughput_iters):
        for label, runner in runners.items():
            t0 = time.perf_counter()
            runner.run(big)
            spent[label] += time.perf_counter() - t0
    rows = []
    for label, runner in runners.items():
        p50, p90, p99 = np.percentile(latencies[label], [50, 90, 99])
        rows.append({"runner": label, "batch": batch, "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
                     "min_ms": float(min(latencies[label])),
                     "throughput_ips": throughput_batch * throughput_iters / spent[label],
                     "throughput_batch": throughput_batch, "size_mb": artifact_size_mb(artifacts.get(label)),
                     "build_s": build_seconds.get(label), **loaded[label], "info": dict(runner.info)})
    return rows


def add_ratios(rows: list[dict], baseline: str) -> list[dict]:
    """Speed-up of every row's p50 over the baseline row's p50 (same run, same inputs)."""
    base = next((r for r in rows if r["runner"] == baseline), None)
    if base is None:
        raise ConfigError("Benchmark baseline row missing", expected=baseline,
                          found=", ".join(r["runner"] for r in rows), fix="name a benchmarked runner")
    return [{**r, "speedup_vs_" + baseline: base["p50_ms"] / r["p50_ms"]} for r in rows]


def _cell(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    """Rows as a Markdown table; floats with `digits` significant digits (parity cosines need about 6)."""
    columns = columns or [k for k in rows[0] if k != "info"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)
