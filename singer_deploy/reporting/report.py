"""One self-contained HTML report of a run: figures as base64 PNG, inline CSS, no scripts, no external links.

Read top-down: the verdict first (reporting/verdict.py: parity, artifacts per layer, what ships, warnings), then the
pictures, then the tables (one artifact matrix per distilled layer, parity, latency, run details), then the
configuration, collapsed. Every table sits in its own scroll box, so the page never gets wider than the window.

Every section is optional: a partial run (training crashed, a backend missing) still gets a report, and a section
without data says "not run" instead of vanishing, so a reader can tell "not measured" from "forgot to look".
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from singer_deploy import __version__
from singer_deploy.errors import DataError
from singer_deploy.io import atomic_write_text
from singer_deploy.reporting import plots
from singer_deploy.reporting.numbers import fmt, fmt_cosine, fmt_short, is_number
from singer_deploy.reporting.verdict import (PARITY_COSINES, PARITY_LABELS, SPEEDUP, cosine_text, headline,
                                             latency_text, ratio_text, state, worst_text)

Rows = Sequence[Mapping[str, Any]]


@dataclass
class ReportData:
    """Everything a report can show; leave a field None when that part of the pipeline did not run.

    Arrays may be numpy arrays or CPU torch tensors. Image-indexed arrays share the first axis (n images) and only
    the first `max_images` are drawn.
    """

    title: str = "singer-deploy report"
    verdict: Mapping[str, Any] | None = None         # reporting.verdict.build_verdict: the first screen
    summary: Mapping[str, Any] | None = None         # run details; a nested mapping shows as "key: value, ..."
    config: Any = None                               # mapping or dataclass, shown as collapsible YAML
    versions: Mapping[str, Any] | None = None        # library versions, device, git hash ...
    images: Any = None                               # (n, H, W, 3) or (n, 3, H, W); uint8 or float 0..1
    norm_maps: Mapping[str, Any] | None = None       # source -> (n, gh, gw) per-patch L2 norms
    norm_histograms: Mapping[str, Any] | None = None  # source -> patch-token norms, any shape (flattened)
    pca_tokens: Mapping[str, Any] | None = None      # source -> (n, N, D) with square N, or (n, gh, gw, D)
    metrics: str | Path | Rows | None = None         # JSON-lines file of training records, or the records
    parity: Rows | None = None                       # ParityReport.table_rows(): one per artifact and output
    latency: Rows | None = None                      # export.bench.benchmark_runners rows: one per runner
    artifacts: Rows | None = None                    # artifact analysis rows: one per (source "method", "layer")
    comparison: Rows | None = None                   # one row per method
    probes: Mapping[str, Any] | str | None = None    # a run's probe table (evaluation/probe_table.py) or why none
    max_images: int = 6


@dataclass(frozen=True)
class _NotRun:
    reason: str


# Column order and readable headers for the keys the export code writes (ParityReport.table_rows and
# export.bench.benchmark_runners, taken as they are); any other key still shows, after these.
_PARITY_COLUMNS = {"candidate": "artifact", "precision": "precision", "output": "output",
                   **{key: PARITY_LABELS[key] for key in ("token_cos_min", "token_cos_p1", "image_cos_min", "max_abs",
                                                          "max_abs_rel", "rel_err_p99", "knn_overlap", "norm_corr",
                                                          "norm_rel_err_max", "nonfinite")},
                   "passed": "passed"}
_LATENCY_COLUMNS = {"runner": "runner", "realised_precision": "realised precision", "parity": "parity",
                    "p50_ms": "p50 ms", "p90_ms": "p90 ms", "p99_ms": "p99 ms",
                    "min_ms": "min ms", "throughput_ips": "throughput img/s", "throughput_batch": "at batch",
                    "size_mb": "size MB", "build_s": "build s", "load_s": "load s", "peak_rss_mb": "peak RSS MB",
                    "iters": "timed calls", SPEEDUP: "speed-up vs eager"}
_COMPARISON_COLUMNS = {"method": "method", "hnr_4": "HNR_4", "e_out": "E_out", "knn_acc": "kNN acc",
                       "linear_acc": "linear acc", "miou": "mIoU"}
_PROBE_COLUMNS = {"model": "features of", "features": "read at", "linear_acc": "linear CLS acc",
                  "linear_pooled_acc": "linear mean-patch acc", "knn_acc": "kNN CLS acc (k=20)",
                  "miou": "dense mIoU", "max_score_diff": "max score diff vs PyTorch student"}
# The artifact matrix (one per distilled layer, a row per source): the figures that say whether artifacts are gone
# and what it cost, in this order. Any figure the analysis adds that is not named here shows after them; the
# secondary ones go to a collapsed table under the matrix.
_ARTIFACT_COLUMNS = {"artifact_ratio": "artifact / normal norm", "artifact_cos_clean": "artifact cos to clean twin",
                     "normal_cos": "normal cos", "normal_cos_p1": "normal cos p1",
                     "normal_cos_clean": "normal cos to clean twin", "next_cos": "next-block cos",
                     "hnr_2": "HNR_2", "hnr_4": "HNR_4"}
_ARTIFACT_SECONDARY = {"artifact_ratio_p90": "artifact / normal p90", "artifact_cos_clean_p1": "artifact cos p1",
                       "normal_cos_clean_p1": "normal cos to clean twin p1", "next_cos_p1": "next-block cos p1",
                       "hnr_3": "HNR_3", "e_out": "E_out", "r_max": "max / median norm",
                       "artifact_tokens": "artifact tokens"}
_ROW_KEYS = ("method", "layer", "student_block")   # identify an artifact row, not figures
# Summary keys the verdict or a table already shows in full.
SHOWN_ELSEWHERE = ("verdict", "artifacts", "artifacts remain", "parity", "latency_p50_ms", "shipped", "warnings",
                   "probes")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin: 0 0 0.1em; font-size: 1.5em; } .meta { color: #666; font-size: 0.85em; margin: 0; }
nav { font-size: 0.9em; margin: 0.3em 0; } nav a { margin-right: 0.8em; }
section { margin-top: 1.5em; border-top: 1px solid #ddd; } h2 { font-size: 1.25em; } h3 { font-size: 1.05em; }
.box { max-width: 100%; overflow-x: auto; margin: 0.4em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; } thead th { max-width: 9em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.pass td { background: #eaf7ea; } tr.fail td { background: #fbeaea; }
td.pass { color: #1a7f1a; font-weight: bold; } td.fail { color: #b30000; font-weight: bold; }
td.skip { color: #777; } td.num.fail { background: #fbeaea; }
.not-run { color: #8a6d00; background: #fff8e1; padding: 0.4em 0.8em; border-left: 4px solid #e0b000; }
.caption { color: #555; font-size: 0.85em; max-width: 60em; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
#verdict { border-top: none; margin-top: 0.6em; padding: 0.3em 1em 0.6em; border-left: 6px solid #999;
           background: #fafafa; }
#verdict.PASS { border-color: #1a7f1a; } #verdict.FAIL { border-color: #b30000; }
#verdict.WARN { border-color: #e0b000; }
#verdict h2 { margin: 0.3em 0 0.1em; } #verdict .headline { margin: 0 0 0.5em; font-size: 1.05em; }
#verdict table { width: 100%; } #verdict th { width: 7em; background: #eee; }
td.remain, td.warning { color: #8a5a00; font-weight: bold; }
details { margin: 0.3em 0; } table.kv td.num { text-align: left; }
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
    document = _document(data.title, bodies, state(data.verdict) if data.verdict else None)
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


def _verdict_section(data: ReportData) -> str | _NotRun:
    if not data.verdict:
        return _NotRun("no verdict was given (the run did not finish its analysis)")
    verdict = data.verdict
    rows: list[tuple[str, str, str, str, str]] = []     # part, item, status, status class, details
    for item in verdict["parity"]:
        status = {True: "pass", False: "fail", None: "skip"}[item["passed"]]
        rows.append(("parity", item["artifact"], {"skip": "n/a"}.get(status, status.upper()), status,
                     "worst: " + worst_text(item["worst"])))
    for item in verdict["artifacts"]:
        status = {True: ("REMAIN", "remain"), False: ("removed", "pass"), None: ("unknown", "skip")}[item["remain"]]
        details = f"artifact / normal norm: {ratio_text(item)} (limit {fmt_short(item['limit'])}x)"
        if cosine_text(item):
            details += f"<br>artifact cosine to the clean twin: {cosine_text(item)}"
        rows.append(("artifacts", f"layer {item['layer']}", *status, details))
    for item in verdict["shipped"]:
        rows.append(("shipped", item["format"], item["artifact"], "", latency_text(item)
                     + (f"<br>precision auto: {item['auto']}" if item["auto"] else "")))
    rows += [("warnings", "", "", "", text) for text in verdict["warnings"]] or [("warnings", "", "none", "", "")]
    body = []
    for part, grouped in groupby(rows, key=lambda row: row[0]):
        group = list(grouped)
        for index, (_, item, status, css, details) in enumerate(group):
            head = f'<th rowspan="{len(group)}">{html.escape(part)}</th>' if index == 0 else ""
            lines = "<br>".join(html.escape(line) for line in details.split("<br>"))
            css_attr = f' class="{css}"' if css else ""
            body.append(f"<tr>{head}<td>{html.escape(item)}</td><td{css_attr}>{html.escape(status)}</td>"
                        f"<td>{lines}</td></tr>")
    return (f'<p class="headline">{html.escape(headline(verdict))}</p>'
            f'<div class="box"><table><tbody>{"".join(body)}</tbody></table></div>')


def _artifacts_section(data: ReportData) -> str | _NotRun:
    if not data.artifacts:
        return _NotRun("no artifact analysis was given")
    limit = data.verdict["artifacts"][0]["limit"] if data.verdict and data.verdict["artifacts"] else None
    parts = []
    for layer in sorted({row["layer"] for row in data.artifacts}, key=int):
        rows = [{"source": row["method"], **{k: v for k, v in row.items() if k not in _ROW_KEYS}}
                for row in data.artifacts if row["layer"] == layer]
        main = {"source": "source", **_ARTIFACT_COLUMNS}
        main.update({key: key for row in rows for key in row if key not in main and key not in _ARTIFACT_SECONDARY})
        secondary = {"source": "source", **{k: label for k, label in _ARTIFACT_SECONDARY.items()
                                            if any(k in row for row in rows)}}
        parts.append(f"<h3>Layer {html.escape(str(layer))}</h3>"
                     + _table(rows, main, strict=True, flag_above={"artifact_ratio": limit})
                     + f"<details><summary>more figures at layer {html.escape(str(layer))}</summary>"
                     + _table(rows, secondary, strict=True) + "</details>")
    limit_text = f", {fmt_short(limit)}x" if limit is not None else ""
    caption = ("Per distilled layer, a row per source. Artifact tokens are the planted teacher's ground truth, else "
               "the raw teacher's high-norm tokens: one fixed set for every source. artifact / normal norm: their "
               f"norm over the normal tokens' median (artifacts remain above the limit{limit_text}); cosines of "
               "normal tokens and of the next teacher block's output are to the raw teacher, the columns named "
               "\"to clean twin\" to the clean twin's tokens (docs/method.md, \"Metrics\").")
    return f'<p class="caption">{html.escape(caption)}</p>' + "".join(parts)


def _details_section(data: ReportData) -> str | _NotRun:
    shown = {key: value for key, value in (data.summary or {}).items() if key not in SHOWN_ELSEWHERE}
    if not shown:
        return _NotRun("no run details were given")
    return _key_value_table(shown)


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
    """A run's probe table when its data carries labels, else a method comparison when given, else why neither."""
    if isinstance(data.probes, Mapping):
        return _probe_section(data.probes)
    if not data.comparison:
        return _NotRun(data.probes if isinstance(data.probes, str) else "no method comparison was given")
    return _table(data.comparison, _COMPARISON_COLUMNS)


def _probe_section(table: Mapping[str, Any]) -> str:
    target = "the masks' classes" if table["dense"] == "mask" else "the image's class on its foreground"
    dense = f"; dense mIoU: a per-patch linear probe of {target}, background included" if table["dense"] else ""
    caption = (f"Probes on the held-out images: fitted on {table['n_train']}, scored on {table['n_test']} (one "
               f"stratified split, the same for every row). {table['classes']} classes: chance = 1 / "
               f"{table['classes']} = {fmt(table['chance'])}. The probes measure what the features know about these "
               f"labels. Linear: ridge on the class token or the mean patch token; kNN: cosine, k = 20{dense}. "
               "Exported rows read the student through each artifact's runtime.")
    return f'<p class="caption">{html.escape(caption)}</p>' + _table(table["rows"], _PROBE_COLUMNS, strict=True)


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
    return _key_value_table(data.versions)


_SECTIONS: tuple[tuple[str, str, Callable[[ReportData], str | _NotRun]], ...] = (
    ("verdict", "Verdict", _verdict_section),
    ("norm-maps", "Norm maps", _norm_maps_section),
    ("norm-histograms", "Norm histograms", _norm_histograms_section),
    ("pca", "PCA feature maps", _pca_section),
    ("training", "Training curves", _training_section),
    ("artifacts", "Artifacts per distilled layer", _artifacts_section),
    ("parity", "Parity", _parity_section),
    ("latency", "Latency", _latency_section),
    ("details", "Run details", _details_section),
    ("comparison", "Comparison", _comparison_section),
    ("config", "Configuration", _config_section),
    ("environment", "Environment", _versions_section),
)


# ---------------------------------------------------------------------------------------------------------------
# HTML helpers


def _document(title: str, bodies: Sequence[tuple[str, str, str | _NotRun]], verdict_state: str | None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    not_run = [heading for _, heading, body in bodies if isinstance(body, _NotRun)]
    nav = " ".join(f'<a href="#{anchor}">{html.escape(heading)}</a>' for anchor, heading, _ in bodies)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">singer-deploy {html.escape(__version__)}, generated {stamp}</p>',
        f"<nav>{nav}</nav>",
    ]
    for anchor, heading, body in bodies:
        content = (f'<p class="not-run">Not run: {html.escape(body.reason)}.</p>' if isinstance(body, _NotRun)
                   else body)
        if anchor == "verdict":
            heading = f"Verdict: {verdict_state}" if verdict_state else heading
            parts.append(f'<section id="verdict" class="{verdict_state or "none"}"><h2>{html.escape(heading)}</h2>'
                         f"{content}</section>")
            if not_run:   # after the verdict, so the first screen stays the verdict
                parts.append(f'<p class="not-run">Sections not run: {html.escape(", ".join(not_run))}.</p>')
            continue
        parts.append(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{content}</section>')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _figure(png: bytes, alt: str, caption: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'
            f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>')


def _table(rows: Rows, known: Mapping[str, str], *, strict: bool = False,
           flag_above: Mapping[str, float | None] | None = None) -> str:
    """Rows of dicts -> a table in its own scroll box; known keys first in their order, then any other key (none
    with `strict`); a "passed" key colours rows; a value above `flag_above[key]` is marked. A column of mappings
    (e.g. a runner's `info`) would make every row many lines tall: it goes to a collapsed table under this one."""
    keys = [key for key in known if any(key in row for row in rows)]
    if not strict:
        for row in rows:
            keys += [key for key in row if key not in keys]
    nested = [key for key in keys if any(isinstance(row.get(key), Mapping) for row in rows)]
    keys = [key for key in keys if key not in nested]
    header = "".join(f"<th>{html.escape(known.get(key, key))}</th>" for key in keys)
    body = []
    for row in rows:
        verdict = _verdict(row.get("passed")) if "passed" in row else None
        cells = "".join(_cell(key, row.get(key), (flag_above or {}).get(key)) for key in keys)
        row_class = f' class="{verdict}"' if verdict in ("pass", "fail") else ""
        body.append(f"<tr{row_class}>{cells}</tr>")
    table = f'<div class="box"><table><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    for key in nested:
        label = known.get(key, key)
        items = {f"{fmt(row.get(keys[0]))}": inline_text(row[key]) for row in rows if key in row}
        table += f"<details><summary>{html.escape(label)} per row</summary>{_key_value_table(items)}</details>"
    return table


def _verdict(passed: Any) -> str:
    if passed is None:
        return "skip"
    return "pass" if bool(passed) else "fail"


def cell_text(key: str, value: Any) -> str:
    """The text of a table cell: a parity cosine as numbers.fmt_cosine (its distance to 1 near 1, where the gates
    sit), else numbers.fmt."""
    if key == "passed":
        return {"pass": "PASS", "fail": "FAIL", "skip": "n/a"}[_verdict(value)]
    return fmt_cosine(value) if key in PARITY_COSINES else fmt(value)


def _cell(key: str, value: Any, limit: float | None = None) -> str:
    if key == "passed":
        return f'<td class="{_verdict(value)}">{cell_text(key, value)}</td>'
    classes = (["num"] if is_number(value) else []) + (
        ["fail"] if limit is not None and is_number(value) and value > limit else [])
    css = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{css}>{html.escape(cell_text(key, value))}</td>"


def _key_value_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(key))}</th>"
                   f"{_cell(str(key), inline_text(value) if isinstance(value, (Mapping, list, tuple)) else value)}</tr>"
                   for key, value in items.items())
    return f'<div class="box"><table class="kv"><tbody>{rows}</tbody></table></div>'


def inline_text(value: Any, key: str = "") -> str:
    """A value on one line, numbers formatted: a mapping as 'key: value; key: value' (not as dotted keys), a list
    as 'a, b', an empty one as 'none'."""
    if isinstance(value, (Mapping, list, tuple)) and not value:
        return "none"
    if isinstance(value, Mapping):
        return "; ".join(f"{inner_key}: {inline_text(inner, str(inner_key))}" for inner_key, inner in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(inline_text(item, key) for item in value)
    return cell_text(key, value)


def _first(array: Any, count: int) -> np.ndarray | None:
    return None if array is None else np.asarray(array)[:count]


def _per_image_figure(data: ReportData, sources: Mapping[str, Any],
                      plot: Callable[[dict[str, np.ndarray], np.ndarray | None], bytes], title: str,
                      caption: str) -> str:
    """A figure of per-source arrays over the first `max_images` images, drawn beside those images."""
    png = plot({name: _first(array, data.max_images) for name, array in sources.items()},
               _first(data.images, data.max_images))
    return _figure(png, title, caption)

