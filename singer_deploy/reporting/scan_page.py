"""The `singer-deploy scan` page: one offline HTML file, the verdict first (it is the page's first heading), then
the suggestions, a norm-map picture for a few images, the per-block table and each block's norm histogram.

Takes plain data only: scan.json's dict (evaluation/scan.py, ScanResult.to_dict) and numpy arrays (norm maps,
display images). Styles, figures, tables and the number format are the run report's (report.py, plots.py,
numbers.py), so the two pages read alike.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from singer_deploy.io import atomic_write_text
from singer_deploy.method.metrics import DEFAULT_K
from singer_deploy.reporting import plots
from singer_deploy.reporting.report import _document, _figure, _key_value_table, _NotRun, _table

_BLOCK_COLUMNS = {"block": "block", "artifact_percent": "artifact tokens %", "artifact_ratio": "artifact / median norm",
                  "threshold": "threshold", "rank": "subspace rank", "left_out": "directions left out",
                  "writers": "writer blocks (share)", "high_norm_percent": f"tokens above {DEFAULT_K:g}x median %",
                  "untreated_percent": "of which not selected %"}


def writers_text(writers: Mapping[str, float]) -> str:
    """"2 (100%), 5 (3%)", or "none" (an empty list is a word, never a blank)."""
    return ", ".join(f"{block} ({share:.0%})" for block, share in writers.items()) or "none"


def list_text(items: Sequence[Any]) -> str:
    return ", ".join(str(item) for item in items) or "none"


def write_scan_page(path: str | Path, scan: Mapping[str, Any], *, norm_maps: Mapping[int, np.ndarray] | None = None,
                    images: np.ndarray | None = None, shown_blocks: Sequence[int] = ()) -> Path:
    """Write the page to `path` (atomically). `norm_maps`: block -> (n, gh, gw) per-patch norms of the first images,
    drawn for `shown_blocks` beside `images` (n, H, W, 3) in 0..1."""
    title = f"singer-deploy scan of {scan['teacher']}: {scan['verdict']}"
    bodies = [("verdict", "Verdict", _verdict_body(scan)),
              ("norm-maps", "Norm maps", _norm_maps_body(norm_maps, images, shown_blocks)),
              ("blocks", "Per block", _blocks_body(scan)),
              ("histograms", "Norm histograms per block", _histograms_body(scan)),
              ("subspaces", "Artifact subspace per block", _subspaces_body(scan))]
    document = _document(title, bodies, None)
    path = Path(path)
    atomic_write_text(path, document)
    return path


def _verdict_body(scan: Mapping[str, Any]) -> str:
    suggested = scan["suggested"]
    rank = suggested["singer.rank"]
    items = {"verdict": scan["verdict"], "notes": scan["notes"] or "none",
             "suggested layers": f"{list_text(suggested['layers'])} (distils {list_text(suggested['distilled_layers'])}"
                                 ": the last block is always added)",
             "suggested singer.rank": "keep the configured rank" if rank is None else rank,
             "why": suggested["why"],
             "scanned": f"{scan['images']} images, {scan['depth']} blocks, {scan['seconds']} s"}
    override = " ".join([f"layers=[{','.join(map(str, suggested['layers']))}]"]
                        + ([] if rank is None else [f"singer.rank={rank}"]))
    return (_key_value_table(items) + '<p class="caption">As overrides for <code>singer-deploy run</code>: '
            f"<code>{html.escape(override)}</code></p>")


def _norm_maps_body(norm_maps: Mapping[int, np.ndarray] | None, images: np.ndarray | None,
                    shown_blocks: Sequence[int]) -> str | _NotRun:
    if not norm_maps or not shown_blocks:
        return _NotRun("no norm maps were given")
    png = plots.norm_maps_png({f"block {b}": norm_maps[b] for b in shown_blocks}, images)
    return _figure(png, "per-patch norm maps", "Rows are images, columns the raw teacher's blocks (the first with "
                   "artifacts and the suggested distilled layers); one colour scale per row. Artifacts show as a "
                   "few bright patches; under each map its max/median norm ratio.")


def _blocks_body(scan: Mapping[str, Any]) -> str:
    rows = [{"block": b["block"], "artifact_percent": 100 * b["artifact_share"], "artifact_ratio": b["artifact_ratio"],
             "threshold": b["threshold"], "rank": b["rank"], "left_out": b["left_out"],
             "writers": writers_text(b["writers"]), "high_norm_percent": 100 * b["high_norm_share"],
             "untreated_percent": 100 * b["untreated_high_norm_share"]} for b in scan["blocks"]]
    caption = ("artifact tokens: the share the data-driven selection picks (docs/method.md, \"Token selection\"); "
               "artifact / median norm: their median norm over their image's median (0 when none); threshold: a "
               "token's component in the block's artifact subspace over its image's median norm above which it is "
               "an artifact (the norm ratio under singer.select_k; a dash: nothing to select with); subspace rank and "
               "writer blocks: the estimate with this block as a distilled layer; the last two columns: tokens "
               f"above {DEFAULT_K:g}x their image's median norm (HNR_{DEFAULT_K:g}) and the part of them the "
               "selection did not pick.")
    return f'<p class="caption">{html.escape(caption)}</p>' + _table(rows, _BLOCK_COLUMNS, strict=True)


def _histograms_body(scan: Mapping[str, Any]) -> str:
    counts = {f"block {b['block']}": b["histogram"] for b in scan["blocks"]}
    marks = {f"block {b['block']}": b["artifact_ratio"] for b in scan["blocks"] if b["artifact_ratio"]}
    png = plots.ratio_histograms_png(np.asarray(scan["histogram_edges_log10"]), counts, marks=marks)
    return _figure(png, "norm histograms per block", "A row per block: its patch-token norms over their image's "
                   "median, in fixed bins on a log axis (ratios beyond 0.1x-100x counted in the end bins), the share "
                   "of tokens per bin as a colour on a log scale (white: no token). Red marker: the selected "
                   "artifact tokens' median ratio. An artifact mode is a separate patch to the right of the bulk.")


def _subspaces_body(scan: Mapping[str, Any]) -> str:
    return _key_value_table({f"block {b['block']}": b["subspace"] for b in scan["blocks"]})
