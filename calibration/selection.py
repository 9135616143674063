"""Pick the calibration subset: plain random, or feature-diverse greedy k-center on student embeddings.

Quantization ranges are set by the extremes the calibration images produce, so a subset that covers the feature
space (k-center, the coreset rule of Sener & Savarese 2018) is steadier than a random draw of the same size when the
distillation set is dominated by a few kinds of image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from singer_deploy.calibration.source import ImageSource, load_calibration_images
from singer_deploy.errors import ConfigError

# NNCF's own default subset_size (nncf.quantize), a size its authors found enough for PTQ statistics.
DEFAULT_CALIBRATION_SIZE = 300
METHODS: tuple[str, ...] = ("random", "kcenter")

Method = Literal["random", "kcenter"]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CalibrationSet:
    """The images every backend calibrates on, and how they were chosen."""

    images: np.ndarray        # float32 (n, C, H, W)
    indices: np.ndarray       # positions in the source, in selection order
    method: str
    seed: int
    source_size: int

    def __len__(self) -> int:
        return len(self.images)


def random_selection(count: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct indices out of `count`, the same for the same seed."""
    return np.random.default_rng(seed).permutation(count)[:size]


def kcenter_selection(embeddings: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Greedy k-center (farthest point first) on L2-normalised embeddings, seeded start.

    Normalising makes the distance a cosine distance, which is how student features are compared everywhere else.
    Ties break to the lowest index (np.argmax), so the result is deterministic for a seed.
    """
    feats = torch.from_numpy(np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1))
    feats = torch.nn.functional.normalize(feats, dim=1)
    first = int(np.random.default_rng(seed).integers(len(feats)))
    chosen = [first]
    nearest = (feats - feats[first]).norm(dim=1)
    for _ in range(1, size):
        pick = int(torch.argmax(nearest))
        chosen.append(pick)
        nearest = torch.minimum(nearest, (feats - feats[pick]).norm(dim=1))
    return np.asarray(chosen, dtype=np.int64)


def embed_images(images: np.ndarray, embed_fn: EmbedFn, batch_size: int = 32) -> np.ndarray:
    """Run `embed_fn` (images -> one vector, or tokens, per image) over the images without gradients."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out = embed_fn(torch.from_numpy(images[start:start + batch_size]))
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(out.detach().float().reshape(out.shape[0], -1).cpu().numpy())
    return np.concatenate(outputs)


def select_calibration_set(source: ImageSource, *, size: int = DEFAULT_CALIBRATION_SIZE, method: Method = "random",
                           seed: int = 0, embed_fn: EmbedFn | None = None, batch_size: int = 32) -> CalibrationSet:
    """Choose min(size, available) images from `source` by `method` ("random" or "kcenter", which needs `embed_fn`).

    `embed_fn` is any callable images -> embeddings, typically the FP32 student (its CLS or pooled tokens).
    """
    if method not in METHODS:
        raise ConfigError(f"Unknown calibration selection method {method!r}", expected=f"one of {METHODS}",
                          found=repr(method), fix="use method='random' or 'kcenter'")
    if size < 1:
        raise ConfigError("Calibration size must be positive", expected=">= 1 (default "
                          f"{DEFAULT_CALIBRATION_SIZE})", found=str(size), fix=f"pass size={DEFAULT_CALIBRATION_SIZE}")
    if method == "kcenter" and embed_fn is None:
        raise ConfigError("k-center selection needs an embedding function", expected="embed_fn=images -> embeddings "
                          "(e.g. the FP32 student)", found="embed_fn=None", fix="pass embed_fn or use method='random'")
    images = load_calibration_images(source)
    size = min(size, len(images))
    if method == "random":
        indices = random_selection(len(images), size, seed)
    else:
        indices = kcenter_selection(embed_images(images, embed_fn, batch_size), size, seed)
    return CalibrationSet(images=np.ascontiguousarray(images[indices]), indices=indices, method=method, seed=seed,
                          source_size=len(images))
