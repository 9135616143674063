"""Figures for the HTML report: each function takes plain arrays and returns PNG bytes.

Only matplotlib's object-oriented API with the Agg canvas is used, so nothing here touches pyplot's global state or
needs a display (reports are written on headless training machines and in CI).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from singer_deploy.errors import DataError

_DPI = 90
_CELL_INCHES = 2.0  # side of one image / map panel


def figure_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def as_display_images(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) or (n, 3, H, W), uint8 or float in 0..1 -> float (n, H, W, 3) in 0..1."""
    array = np.asarray(images)
    if array.ndim == 4 and array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)  # channel-first, as the data pipeline yields tensors
    if array.ndim != 4 or array.shape[-1] != 3:
        raise DataError("report images have the wrong shape", expected="(n, H, W, 3) or (n, 3, H, W)",
                        found=str(tuple(array.shape)), fix="pass a batch of RGB images")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < -1e-3 or array.max() > 1 + 1e-3:
        raise DataError("report images are not displayable", expected="uint8 or float values in 0..1",
                        found=f"float values in {np.nanmin(array):.3g}..{np.nanmax(array):.3g}",
                        fix="undo the mean/std normalisation (x * std + mean) before passing the images")
    return np.clip(array, 0.0, 1.0)


def _input_rows(images: np.ndarray | None, n: int) -> np.ndarray | None:
    """The first n display images, or None when no images were given."""
    if images is None:
        return None
    shown = as_display_images(images)
    if shown.shape[0] < n:
        raise DataError("fewer input images than feature maps", expected=f"at least {n} images",
                        found=str(shown.shape[0]), fix="pass the images the maps were computed from")
    return shown[:n]


def _peak_to_median(norm_map: np.ndarray) -> float:
    median = float(np.median(norm_map))
    return float(norm_map.max()) / median if median > 0 else math.inf


def norm_maps_png(maps: Mapping[str, np.ndarray], images: np.ndarray | None = None) -> bytes:
    """Grid of per-patch L2 norm maps: rows = images, columns = input (optional) + one per source.

    All maps in a row share one colour scale (and one colour bar), so a raw teacher's outliers and the refined
    teacher's flat map are read on the same numbers. Each panel is labelled with its max/median norm ratio (R_max).
    """
    names = list(maps)
    arrays = [np.asarray(maps[name], dtype=np.float32) for name in names]
    n = arrays[0].shape[0]
    for name, array in zip(names, arrays):
        if array.ndim != 3 or array.shape[0] != n:
            raise DataError(f"norm map '{name}' has the wrong shape", expected=f"(n_images={n}, gh, gw)",
                            found=str(tuple(array.shape)), fix="pass one (gh, gw) map per image for every source")
    shown = _input_rows(images, n)
    columns = names if shown is None else ["input", *names]
    fig = Figure(figsize=(_CELL_INCHES * len(columns) + 0.8, _CELL_INCHES * n), layout="constrained")
    axes = fig.subplots(n, len(columns), squeeze=False)
    offset = 0 if shown is None else 1
    for row in range(n):
        row_maps = [array[row] for array in arrays]
        finite = np.concatenate([m[np.isfinite(m)].ravel() for m in row_maps])
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if shown is not None:
            axes[row, 0].imshow(shown[row])
        for col, norm_map in enumerate(row_maps):
            ax = axes[row, col + offset]
            mappable = ax.imshow(norm_map, cmap="inferno", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xlabel(f"max/median {_peak_to_median(norm_map):.2f}", fontsize=8)
        fig.colorbar(mappable, ax=list(axes[row, offset:]), shrink=0.9, label="patch L2 norm (row scale)")
    for col, name in enumerate(columns):
        axes[0, col].set_title(name, fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return figure_png(fig)


def norm_histogram_png(norms: Mapping[str, np.ndarray]) -> tuple[bytes, list[str]]:
    """Overlaid histograms of flattened patch-token norms per source, log-spaced bins on a log x axis.

    Returns the PNG and notes about dropped values (non-finite or non-positive norms cannot sit on a log axis and
    usually mean a broken run, so the report says so instead of hiding them).
    """
    notes: list[str] = []
    kept: dict[str, np.ndarray] = {}
    for name, values in norms.items():
        flat = np.asarray(values, dtype=np.float64).ravel()
        good = flat[np.isfinite(flat) & (flat > 0)]
        if good.size < flat.size:
            notes.append(f"{name}: {flat.size - good.size} of {flat.size} norms were non-finite or <= 0 and left out")
        if good.size:
            kept[name] = good
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    if kept:
        low = min(v.min() for v in kept.values())
        high = max(v.max() for v in kept.values())
        bins = np.geomspace(low, high * 1.0001 if high > low else low * 2, 60)
        for name, values in kept.items():
            # Weights make sources with different token counts comparable: y is the share of that source's tokens.
            ax.hist(values, bins=bins, weights=np.full(values.size, 1.0 / values.size), histtype="step",
                    linewidth=1.6, label=f"{name} (n={values.size}, max/median {values.max() / np.median(values):.2f})")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")  # the artifact tail is a few tokens in a thousand; a linear y axis hides it
    ax.set_xlabel("patch-token L2 norm")
    ax.set_ylabel("share of tokens")
    return figure_png(fig), notes


def _as_token_grid(tokens: np.ndarray, name: str) -> np.ndarray:
    """(n, N, D) with square N, or (n, gh, gw, D) -> (n, gh, gw, D)."""
    array = np.asarray(tokens, dtype=np.float64)
    if array.ndim == 4:
        return array
    side = math.isqrt(array.shape[1]) if array.ndim == 3 else 0
    if array.ndim != 3 or side * side != array.shape[1]:
        raise DataError(f"PCA tokens '{name}' cannot be laid out on a patch grid",
                        expected="(n, gh, gw, D), or (n, N, D) with a square N",
                        found=str(tuple(array.shape)), fix="reshape the patch tokens to (n, gh, gw, D)")
    return array.reshape(array.shape[0], side, side, array.shape[2])


def pca_rgb(tokens: np.ndarray, name: str = "tokens") -> np.ndarray:
    """Top-3 PCA components of patch tokens as RGB in 0..1, shape (n, gh, gw, 3).

    One PCA is fitted on all tokens of the source (all images together), so colours mean the same thing across
    images. Each component is scaled by its 1st..99th percentile so a handful of outliers do not wash out the rest.
    """
    grid = _as_token_grid(tokens, name)
    n, gh, gw, dim = grid.shape
    flat = grid.reshape(-1, dim)
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:3]
    # SVD signs are arbitrary; pin each so its largest loading is positive, making colours reproducible.
    signs = np.sign(components[np.arange(components.shape[0]), np.abs(components).argmax(axis=1)])
    projected = centred @ (components * signs[:, None]).T
    low, high = np.percentile(projected, [1, 99], axis=0)
    scaled = np.clip((projected - low) / np.where(high > low, high - low, 1.0), 0.0, 1.0)
    if scaled.shape[1] < 3:  # D < 3: pad the missing channels with black
        scaled = np.pad(scaled, ((0, 0), (0, 3 - scaled.shape[1])))
    return scaled.reshape(n, gh, gw, 3)


def pca_png(tokens: Mapping[str, np.ndarray], images: np.ndarray | None = None) -> bytes:
    """Grid of PCA-RGB feature maps: rows = images, columns = input (optional) + one per source."""
    rgb = {name: pca_rgb(array, name) for name, array in tokens.items()}
    n = next(iter(rgb.values())).shape[0]
    if any(array.shape[0] != n for array in rgb.values()):
        raise DataError("PCA token sources hold different numbers of images",
                        expected="the same n for every source",
                        found=str({name: array.shape[0] for name, array in rgb.items()}),
                        fix="compute every source's tokens on the same images")
    shown = _input_rows(images, n)
    panels: list[tuple[str, np.ndarray]] = ([("input", shown)] if shown is not None else []) + list(rgb.items())
    fig = Figure(figsize=(_CELL_INCHES * len(panels), _CELL_INCHES * n), layout="constrained")
    axes = fig.subplots(n, len(panels), squeeze=False)
    for col, (name, stack) in enumerate(panels):
        axes[0, col].set_title(name, fontsize=10)
        for row in range(n):
            axes[row, col].imshow(stack[row], interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return figure_png(fig)


def metric_series(records: Sequence[Mapping[str, object]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per numeric term (every key but "step"): (steps, values), in the order terms first appear."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(records):
        step = record.get("step", index)
        for key, value in record.items():
            # bool is an int subclass but a flag, not a curve
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(float(step))
            values.append(float(value))
    return {key: (np.asarray(s), np.asarray(v)) for key, (s, v) in series.items()}


def training_curves_png(series: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """One subplot per logged term against step; log y where a positive term spans over two decades."""
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, (steps, values)) in zip(axes, series.items()):
        ax.plot(steps, values, marker="o" if values.size <= 30 else None, markersize=3, linewidth=1.2)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    return figure_png(fig)



def ratio_histograms_png(edges: np.ndarray, counts: Mapping[str, Sequence[int]], *,
                         marks: Mapping[str, float] | None = None) -> bytes:
    """Histograms of several sources (e.g. one per block) as the rows of one picture: token counts in fixed bins of
    log10(norm / image median) (`edges`) along a log x axis, each row's share of tokens per bin as a colour on a
    log scale (the artifact mode is a few tokens in a hundred; empty bins stay white). One axes however many rows,
    so a 40-block teacher draws as fast as a 4-block one. `marks`: a marker per row at a ratio (e.g. the selected
    tokens' median)."""
    from matplotlib.colors import LogNorm

    edges = np.asarray(edges, dtype=np.float64)
    names = list(counts)
    values = np.asarray([counts[name] for name in names], dtype=np.float64)
    totals = values.sum(axis=1, keepdims=True)
    shares = np.where(values > 0, values / np.where(totals > 0, totals, 1.0), np.nan)
    fig = Figure(figsize=(7.5, 0.9 + 0.22 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    low = np.nanmin(shares) if np.isfinite(shares).any() else 1e-6
    mappable = ax.imshow(shares, aspect="auto", cmap="viridis", norm=LogNorm(vmin=low, vmax=1.0),
                         extent=(edges[0], edges[-1], len(names) - 0.5, -0.5), interpolation="nearest")
    for row, name in enumerate(names):
        if marks and marks.get(name):
            ax.plot(math.log10(marks[name]), row, marker="v", color="#d62728", markersize=5)
    ticks = np.arange(math.ceil(edges[0]), math.floor(edges[-1]) + 1)
    ax.set_xticks(ticks, [f"{10.0 ** t:g}x" for t in ticks])
    ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 16 else 8)
    ax.set_xlabel("patch-token norm / image median norm (log axis)")
    fig.colorbar(mappable, ax=ax, label="share of tokens", shrink=0.9)
    return figure_png(fig)
