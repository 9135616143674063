"""Latency / throughput benchmark of runners on the same inputs, as rows, a markdown table and JSON.

Every runner is timed with the same batch: warm-up runs first (first-call allocation and kernel selection are not
latency), then per-call wall time at the latency batch (p50/p90/p99/min) and images/s at a larger batch. How many calls is
set by a time budget per runner (a 5 ms runner gets many more calls than a 500 ms one, within bounds), not by a fixed
count. Peak memory is the process's peak RSS (`resource.getrusage`) right after each runner is loaded; it only
grows, so compare the increase between rows, not the absolute value of later rows.

Each row also carries what it measured: the precision the runtime really executed (`realised_precision`, read back
by the runner, see realised_runtime.py) and the artifact's parity result when the caller passes it. An OpenVINO IR is
timed at the f32 hint parity uses and at the plugin's deployment default (`with_deployment_defaults`); the eager
baseline runs on the device the runtimes use (`eager_device`).
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


# Bounds on the budgeted number of timed latency calls: enough for a p90 even for slow runners, and a cap so a
# sub-millisecond runner does not spin for minutes.
MIN_ITERS, MAX_ITERS = 10, 2000


def calls_for_budget(budget_s: float, call_s: float, lower: int = MIN_ITERS, upper: int = MAX_ITERS) -> int:
    """How many calls of `call_s` seconds fit a `budget_s` budget, within [lower, upper]."""
    return int(min(max(np.ceil(budget_s / max(call_s, 1e-6)), lower), upper))


def benchmark_runners(runners: dict[str, Runner], images: np.ndarray, *, warmup: int = 5, iters: int | None = None,
                      budget_s: float = 3.0, rounds: int = 3, throughput_batch: int = 8,
                      throughput_iters: int | None = None, artifacts: dict[str, str | Path] | None = None,
                      build_seconds: dict[str, float] | None = None,
                      parity: dict[str, bool | None] | None = None, batch: int = 1) -> list[dict]:
    """Time runners on the same inputs: latency percentiles (ms) per call of `batch` images (default 1) and
    throughput (images/s) at `throughput_batch`.

    Each runner gets `budget_s` seconds of timed latency calls (estimated from its warm-up calls; `iters` fixes the
    count instead) and half that for throughput (`throughput_iters` fixes it). Timed calls run in `rounds` blocks
    per runner, interleaved (A A A, B B B, C C C, A A A ...), so that load from other processes on a shared machine
    falls on every runner alike instead of on whichever ran during a busy spell; blocks rather than single calls
    because runtimes keep their thread pools spinning briefly after a call, which would tax the next runner.
    `min_ms` is the least disturbed call. `parity` ({label: passed}) is copied into the rows ("pass" / "FAIL").
    """
    if images.ndim != 4 or len(images) < 1:
        raise ConfigError("Benchmark images must be a (B, C, H, W) batch", expected="B >= 1",
                          found=str(images.shape), fix="pass at least one image")
    artifacts, build_seconds, parity = artifacts or {}, build_seconds or {}, parity or {}
    one, big = tile_batch(images, batch), tile_batch(images, throughput_batch)
    loaded: dict[str, dict] = {}
    calls: dict[str, tuple[int, int]] = {}
    for label, runner in runners.items():
        start = time.perf_counter()
        runner.load()
        loaded[label] = {"load_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
        runner.run(one)   # the first call allocates and selects kernels: not part of the estimate
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):
            runner.run(one)
        call_s = (time.perf_counter() - t0) / max(warmup, 1)
        runner.run(big)   # first call at the larger shape allocates
        calls[label] = (iters or calls_for_budget(budget_s, call_s),
                        throughput_iters or calls_for_budget(budget_s / 2, call_s * throughput_batch / batch, 2, 200))
    latencies: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(max(rounds, 1)):
        for label, runner in runners.items():
            for _ in range(int(np.ceil(calls[label][0] / max(rounds, 1)))):
                t0 = time.perf_counter()
                runner.run(one)
                latencies[label].append((time.perf_counter() - t0) * 1000)
    spent = {label: 0.0 for label in runners}
    for label, runner in runners.items():
        for _ in range(calls[label][1]):
            t0 = time.perf_counter()
            runner.run(big)
            spent[label] += time.perf_counter() - t0
    rows = []
    for label, runner in runners.items():
        p50, p90, p99 = np.percentile(latencies[label], [50, 90, 99])
        passed = parity.get(label)
        rows.append({"runner": label, "batch": batch, "realised_precision": runner.info.get("realised_precision"),
                     "parity": None if passed is None else ("pass" if passed else "FAIL"),
                     "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
                     "min_ms": float(min(latencies[label])), "iters": len(latencies[label]),
                     "throughput_ips": throughput_batch * calls[label][1] / spent[label],
                     "throughput_batch": throughput_batch, "size_mb": artifact_size_mb(artifacts.get(label)),
                     "build_s": build_seconds.get(label), **loaded[label], "info": dict(runner.info)})
    return rows


DEFAULT_HINT_SUFFIX = "@default"


def with_deployment_defaults(runners: dict[str, Runner]) -> dict[str, Runner]:
    """`runners` plus, for every OpenVINO runner pinned to a precision hint (parity's f32), the same IR at the CPU
    plugin's own default hint ("<label>@default"): what a deployment that sets no hint gets (bf16 on CPUs with
    native BF16). Its realised precision says which it was. An IR that several runners open at different hints
    ("openvino/fp32" and "openvino/bf16" share the FP32 IR) gets one such row."""
    from singer_deploy.export.openvino import OpenVINORunner

    out = dict(runners)
    seen: set[Path] = set()
    for label, runner in runners.items():
        if isinstance(runner, OpenVINORunner) and runner.hint is not None and runner.path not in seen:
            seen.add(runner.path)
            out[label + DEFAULT_HINT_SUFFIX] = OpenVINORunner(runner.path, device=runner.device,
                                                              inference_precision=None,
                                                              num_threads=runner.num_threads,
                                                              performance_hint=runner.performance_hint)
    return out


_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def eager_device(runners: dict[str, Runner]) -> str:
    """The device the eager baseline should run on: "cuda" when any loaded runner executes on an NVIDIA GPU (an ONNX
    Runtime CUDA / TensorRT provider, a TensorRT engine), else "cpu", so ratios compare like with like."""
    for runner in runners.values():
        info = runner.info or {}
        if info.get("provider") in _GPU_PROVIDERS or runner.name in ("tensorrt", "torch_tensorrt") or \
                str(info.get("device", "")).startswith("cuda"):
            return "cuda"
    return "cpu"


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
