"""One self-contained HTML report of a run: figures as base64 PNG, inline CSS, no scripts, no external links.

Every section is optional: a partial run (training crashed, a backend missing) still gets a report, and a section
without data says "not run" instead of vanishing, so a reader can tell "not measured" from "forgot to look".
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from singer_deploy import __version__
from singer_deploy.reporting import plots
from singer_deploy.errors import DataError
from singer_deploy.io import atomic_write_text

Rows = Sequence[Mapping[str, Any]]


@dataclass
class ReportData:
    """Everything a report can show; leave a field None when that part of the pipeline did not run.

    Arrays may be numpy arrays or CPU torch tensors. Image-indexed arrays share the first axis (n images) and only
    the first `max_images` are drawn.
    """

    title: str = "singer-deploy report"
    summary: Mapping[str, Any] | None = None         # headline numbers; nested mappings are flattened to "a.b"
    config: Any = None                               # mapping or dataclass, shown as collapsible YAML
    versions: Mapping[str, Any] | None = None        # library versions, device, git hash ...
    images: Any = None                               # (n, H, W, 3) or (n, 3, H, W); uint8 or float 0..1
    norm_maps: Mapping[str, Any] | None = None       # source -> (n, gh, gw) per-patch L2 norms
    norm_histograms: Mapping[str, Any] | None = None  # source -> patch-token norms, any shape (flattened)
    pca_tokens: Mapping[str, Any] | None = None      # source -> (n, N, D) with square N, or (n, gh, gw, D)
    metrics: str | Path | Rows | None = None         # JSON-lines file of training records, or the records
    parity: Rows | None = None                       # ParityReport.table_rows(): one per artifact and output
    latency: Rows | None = None                      # export.bench.benchmark_runners rows: one per runner
    comparison: Rows | None = None                   # one row per method
    max_images: int = 6


@dataclass(frozen=True)
class _NotRun:
    reason: str


# Column order and readable headers for the keys the export code writes (ParityReport.table_rows and
# export.bench.benchmark_runners, taken as they are); any other key still shows, after these.
_PARITY_COLUMNS = {"candidate": "artifact", "precision": "precision", "output": "output",
                   "token_cos_min": "token cosine min", "token_cos_p1": "token cosine p1",
                   "image_cos_min": "image cosine min", "max_abs": "max abs diff", "max_abs_rel": "max abs / scale",
                   "rel_err_p99": "rel. error p99", "knn_overlap": "kNN overlap", "norm_corr": "norm-map corr",
                   "norm_rel_err_max": "norm rel. error max", "nonfinite": "NaN/Inf", "passed": "passed"}
_LATENCY_COLUMNS = {"runner": "runner", "realised_precision": "realised precision", "parity": "parity",
                    "p50_ms": "p50 ms", "p90_ms": "p90 ms", "p99_ms": "p99 ms",
                    "min_ms": "min ms", "throughput_ips": "throughput img/s", "throughput_batch": "at batch",
                    "size_mb": "size MB", "build_s": "build s", "load_s": "load s", "peak_rss_mb": "peak RSS MB",
                    "iters": "timed calls", "speedup_vs_pytorch/fp32": "speed-up vs eager"}
_COMPARISON_COLUMNS = {"method": "method", "hnr_4": "HNR_4", "e_out": "E_out", "knn_acc": "kNN acc",
                       "linear_acc": "linear acc", "miou": "mIoU"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; } section { margin-top: 2em; border-top: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.pass td { background: #eaf7ea; } tr.fail td { background: #fbeaea; }
td.pass { color: #1a7f1a; font-weight: bold; } td.fail { color: #b30000; font-weight: bold; }
td.skip { color: #777; }
.not-run { color: #8a6d00; background: #fff8e1; padding: 0.4em 0.8em; border-left: 4px solid #e0b000; }
.caption { color: #555; font-size: 0.9em; max-width: 60em; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def write_report(out_path: str | Path, data: ReportData) -> Path:
    """Write one self-contained HTML report and return its path.

    `out_path` is the HTML file, or an existing directory (then `report.html` inside it). The file is written to a
    temporary sibling and moved into place, so a reader never sees half a report.
    """
    path = Path(out_path)
    if path.is_dir():
        path = path / "report.html"
    bodies = [(anchor, heading, render(data)) for anchor, heading, render in _SECTIONS]
    document = _document(data.title, bodies)
    atomic_write_text(path, document)
    return path


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines metrics file (one dict per line), skipping blank lines.

    A malformed last line is dropped, since a run killed mid-write leaves one; a malformed line elsewhere means the
    file is not what the report expects and raises DataError.
    """
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise DataError(f"metrics file {path} has a malformed line {number}", expected="one JSON object per line",
                            found=f"{line[:80]!r} ({err.msg})",
                            fix="point the report at the run's metrics.jsonl") from err
        if not isinstance(record, dict):
            raise DataError(f"metrics file {path} line {number} is not a JSON object", expected="a dict per line",
                            found=type(record).__name__, fix="log one dict of scalars per step")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Sections: each takes the ReportData and returns HTML, or _NotRun with the reason.


def _summary_section(data: ReportData) -> str | _NotRun:
    if not data.summary:
        return _NotRun("no summary was given")
    return _key_value_table(_flatten(data.summary))


def _norm_maps_section(data: ReportData) -> str | _NotRun:
    if not data.norm_maps:
        return _NotRun("no per-patch norm maps were given")
    return _per_image_figure(data, data.norm_maps, plots.norm_maps_png, "per-patch L2 norm maps",
                             "Rows are images; the maps in one row share a colour scale (the bar on the right), so "
                             "a bright patch in the raw teacher that is dark in the refined teacher is an outlier the "
                             "refinement removed. Under each map: its max/median norm ratio.")


def _norm_histograms_section(data: ReportData) -> str | _NotRun:
    if not data.norm_histograms:
        return _NotRun("no patch-token norms were given")
    png, notes = plots.norm_histogram_png({name: np.asarray(v) for name, v in data.norm_histograms.items()})
    caption = ("Share of patch tokens per norm bin, log-log. High-norm artifacts show as a separate bump or long tail "
               "to the right of the bulk.")
    return _figure(png, "patch-token norm histograms", caption) + "".join(
        f'<p class="not-run">{html.escape(note)}</p>' for note in notes)


def _pca_section(data: ReportData) -> str | _NotRun:
    if not data.pca_tokens:
        return _NotRun("no patch tokens were given for PCA")
    return _per_image_figure(data, data.pca_tokens, plots.pca_png, "PCA feature maps",
                             "Top-3 principal components of each source's patch tokens as RGB (one PCA per source, "
                             "fitted on all its images). Clean features follow object layout; artifact tokens show "
                             "as isolated saturated patches.")


def _training_section(data: ReportData) -> str | _NotRun:
    if data.metrics is None:
        return _NotRun("no training metrics were given")
    if isinstance(data.metrics, (str, Path)):
        if not Path(data.metrics).is_file():
            return _NotRun(f"the metrics file {data.metrics} does not exist")
        records = load_metrics(data.metrics)
    else:
        records = list(data.metrics)
    series = plots.metric_series(records)
    if not series:
        return _NotRun("the training metrics hold no numeric terms")
    return _figure(plots.training_curves_png(series), "training curves",
                   f"{len(records)} logged records; one panel per term.")


def _parity_section(data: ReportData) -> str | _NotRun:
    if not data.parity:
        return _NotRun("no parity checks were given")
    return _table(data.parity, _PARITY_COLUMNS)


def _latency_section(data: ReportData) -> str | _NotRun:
    if not data.latency:
        return _NotRun("no latency benchmarks were given")
    return _table(data.latency, _LATENCY_COLUMNS)


def _comparison_section(data: ReportData) -> str | _NotRun:
    if not data.comparison:
        return _NotRun("no method comparison was given")
    return _table(data.comparison, _COMPARISON_COLUMNS)


def _config_section(data: ReportData) -> str | _NotRun:
    if data.config is None:
        return _NotRun("no configuration was given")
    config = dataclasses.asdict(data.config) if dataclasses.is_dataclass(data.config) else data.config
    # A JSON round trip turns Paths, tuples and enums into plain values that safe_dump accepts.
    plain = json.loads(json.dumps(config, default=str))
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
    return f"<details><summary>configuration (YAML)</summary><pre>{html.escape(text)}</pre></details>"


def _versions_section(data: ReportData) -> str | _NotRun:
    if not data.versions:
        return _NotRun("no versions or environment were recorded")
    return _key_value_table(_flatten(data.versions))


_SECTIONS: tuple[tuple[str, str, Callable[[ReportData], str | _NotRun]], ...] = (
    ("summary", "Summary", _summary_section),
    ("norm-maps", "Norm maps", _norm_maps_section),
    ("norm-histograms", "Norm histograms", _norm_histograms_section),
    ("pca", "PCA feature maps", _pca_section),
    ("training", "Training curves", _training_section),
    ("parity", "Parity", _parity_section),
    ("latency", "Latency", _latency_section),
    ("comparison", "Comparison", _comparison_section),
    ("config", "Configuration", _config_section),
    ("environment", "Environment", _versions_section),
)


# ---------------------------------------------------------------------------------------------------------------
# HTML helpers


def _document(title: str, bodies: Sequence[tuple[str, str, str | _NotRun]]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    not_run = [heading for _, heading, body in bodies if isinstance(body, _NotRun)]
    nav = " ".join(f'<a href="#{anchor}">{html.escape(heading)}</a>' for anchor, heading, _ in bodies)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>',
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">singer-deploy {html.escape(__version__)}, generated {stamp}</p>',
        f"<nav>{nav}</nav>",
    ]
    if not_run:
        parts.append(f'<p class="not-run">Sections not run: {html.escape(", ".join(not_run))}.</p>')
    for anchor, heading, body in bodies:
        content = (f'<p class="not-run">Not run: {html.escape(body.reason)}.</p>' if isinstance(body, _NotRun)
                   else body)
        parts.append(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{content}</section>')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _figure(png: bytes, alt: str, caption: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'
            f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>')


def _table(rows: Rows, known: Mapping[str, str]) -> str:
    """Rows of dicts -> table; known keys first in their order, then any other key; a "passed" key colours rows."""
    keys = [key for key in known if any(key in row for row in rows)]
    for row in rows:
        keys += [key for key in row if key not in keys]
    header = "".join(f"<th>{html.escape(known.get(key, key))}</th>" for key in keys)
    body = []
    for row in rows:
        verdict = _verdict(row.get("passed")) if "passed" in row else None
        cells = "".join(_cell(key, row.get(key)) for key in keys)
        row_class = f' class="{verdict}"' if verdict in ("pass", "fail") else ""
        body.append(f"<tr{row_class}>{cells}</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _verdict(passed: Any) -> str:
    if passed is None:
        return "skip"
    return "pass" if bool(passed) else "fail"


def _cell(key: str, value: Any) -> str:
    if key == "passed":
        verdict = _verdict(value)
        label = {"pass": "PASS", "fail": "FAIL", "skip": "n/a"}[verdict]
        return f'<td class="{verdict}">{label}</td>'
    numeric = isinstance(_plain(value), (int, float)) and not isinstance(_plain(value), bool)
    css = ' class="num"' if numeric else ""
    return f"<td{css}>{html.escape(_fmt(value))}</td>"


def _key_value_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(key))}</th>{_cell(str(key), value)}</tr>"
                   for key, value in items.items())
    return f"<table><tbody>{rows}</tbody></table>"


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _fmt(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def _first(array: Any, count: int) -> np.ndarray | None:
    return None if array is None else np.asarray(array)[:count]


def _per_image_figure(data: ReportData, sources: Mapping[str, Any],
                      plot: Callable[[dict[str, np.ndarray], np.ndarray | None], bytes], title: str,
                      caption: str) -> str:
    """A figure of per-source arrays over the first `max_images` images, drawn beside those images."""
    png = plot({name: _first(array, data.max_images) for name, array in sources.items()},
               _first(data.images, data.max_images))
    return _figure(png, title, caption)

