"""Keep the chosen calibration set on disk so every backend (OpenVINO, ONNX Q/DQ, TensorRT) calibrates on the
very same images, and a second run does not redo the selection.

Layout in `cache_dir`: calibration.npz (images, indices) + calibration.json (the manifest). Both are written to a
temporary file and moved into place with os.replace, manifest last, so a crash never leaves a manifest that
points at a half-written array.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import torch

from singer_deploy.calibration.selection import (DEFAULT_CALIBRATION_SIZE, CalibrationSet, EmbedFn, Method,
                                                 select_calibration_set)
from singer_deploy.calibration.source import ImageSource, load_calibration_images
from singer_deploy.hashing import array_sha256, module_sha256
from singer_deploy.io import atomic_savez, atomic_write_bytes

log = logging.getLogger(__name__)

ARRAY_NAME = "calibration.npz"
MANIFEST_NAME = "calibration.json"
FORMAT_VERSION = 1


def embedder_fingerprint(embed_fn: EmbedFn | None) -> str | None:
    """Identify the embedder k-center ran on: a module by its weights, any other callable by its name."""
    if embed_fn is None:
        return None
    if isinstance(embed_fn, torch.nn.Module):
        return f"module:{module_sha256(embed_fn)}"
    return f"callable:{getattr(embed_fn, '__module__', '?')}.{getattr(embed_fn, '__qualname__', repr(embed_fn))}"


def cached_calibration_set(source: ImageSource, cache_dir: str | Path, *, size: int = DEFAULT_CALIBRATION_SIZE,
                           method: Method = "random", seed: int = 0, embed_fn: EmbedFn | None = None,
                           embedder_id: str | None = None) -> CalibrationSet:
    """Load the cached set when its manifest matches this request and source, else select and cache it.

    `embedder_id` names the embedder for k-center when `embed_fn` is neither a module nor stable by name.
    """
    images = load_calibration_images(source)
    wanted = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "seed": int(seed),
        "requested_size": int(size),
        "source_hash": array_sha256(images),
        "source_shape": list(images.shape),
        "embedder": (embedder_id or embedder_fingerprint(embed_fn)) if method == "kcenter" else None,
    }
    cache_dir = Path(cache_dir)
    cached = _load_if_matching(cache_dir, wanted)
    if cached is not None:
        return cached
    chosen = select_calibration_set(images, size=size, method=method, seed=seed, embed_fn=embed_fn)
    save_calibration_set(chosen, cache_dir, wanted)
    return chosen


def save_calibration_set(chosen: CalibrationSet, cache_dir: str | Path, request: dict) -> Path:
    """Write images + manifest atomically; returns the manifest path."""
    cache_dir = Path(cache_dir)
    atomic_savez(cache_dir / ARRAY_NAME, {"images": chosen.images, "indices": chosen.indices})
    manifest = dict(request, size=len(chosen), shape=list(chosen.images.shape), dtype="float32",
                    images_hash=array_sha256(chosen.images), indices=chosen.indices.tolist())
    atomic_write_bytes(cache_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    return cache_dir / MANIFEST_NAME


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The cache manifest, or None when absent or unreadable."""
    path = Path(cache_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_if_matching(cache_dir: Path, wanted: dict) -> CalibrationSet | None:
    manifest = read_manifest(cache_dir)
    if manifest is None or any(manifest.get(key) != value for key, value in wanted.items()):
        return None
    try:
        with np.load(cache_dir / ARRAY_NAME, allow_pickle=False) as stored:
            images, indices = stored["images"], stored["indices"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # A cache is derived data: a damaged one is rebuilt, never trusted and never fatal.
        log.warning("Calibration cache in %s is unreadable (%s); selecting again", cache_dir, err)
        return None
    if array_sha256(images) != manifest.get("images_hash"):
        log.warning("Calibration cache in %s does not match its manifest; selecting again", cache_dir)
        return None
    return CalibrationSet(images=images, indices=indices, method=manifest["method"], seed=manifest["seed"],
                          source_size=manifest["source_shape"][0])
