"""Frozen features for probes: extract CLS, pooled and patch tokens once per (source, data, layer) and cache them.

A source is either a lead `Backbone` / teacher (anything with `forward_taps(images, layers)` and `split(tokens)`),
a holder of one in `.backbone` (a `PlantedTeacher` stands for its backbone; a `RefinedTeacher`, which has its own
`forward_taps`, is read as its refined features), an exported-model Runner (`run(batch_np) -> {"cls": (B, D),
"patch_tokens": (B, N, D)}`), or a plain callable with the Runner's contract. Probes never see the source, only the
`FeatureSet`, so PyTorch, ONNX Runtime, OpenVINO and TensorRT students are evaluated by the same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from singer_deploy.models.backbone import has_class_token
from singer_deploy.models.data import image_array
from singer_deploy.errors import ConfigError, DataError, ModelError
from singer_deploy.hashing import array_sha256, module_sha256
from singer_deploy.io import atomic_savez

PatchDtype = Literal["float16", "float32"]
# Bumped whenever the cached layout changes, so stale caches are never read back as valid.
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Frozen features of one source on one dataset.

    cls: (M, D) float32. pooled: (M, D) float32 mean of the patch tokens. patches: (M, N, D) in `patch_dtype`,
    or None when not kept. labels: (M,) int64. patch_masks: (M, gh, gw) int64 per-patch mask classes (majority of
    the pixels under each patch), or None when the dataset has no masks. grid: (gh, gw) patch grid.
    """

    cls: np.ndarray
    pooled: np.ndarray
    patches: np.ndarray | None
    labels: np.ndarray
    patch_masks: np.ndarray | None
    grid: tuple[int, int]
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A dataset materialised as arrays: images (M, C, H, W) float32, labels (M,) int64, masks (M, H, W) or None."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, array in (("images", self.images), ("labels", self.labels), ("masks", self.masks)):
            digest.update(name.encode())
            if array is not None:
                digest.update(array_sha256(array).encode())
        return digest.hexdigest()


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def as_image_data(dataset: Any) -> ImageData:
    """Accept an `ImageData`, a tuple `(images, labels[, masks])`, or a sequence of dicts
    {"image", "label", optional "fg_mask"} (the shape of `singer_deploy.models.data.SyntheticShapes` items)."""
    if isinstance(dataset, ImageData):
        return dataset
    if isinstance(dataset, tuple) and len(dataset) in (2, 3):
        images, labels = _to_numpy(dataset[0]), _to_numpy(dataset[1])
        masks = _to_numpy(dataset[2]) if len(dataset) == 3 and dataset[2] is not None else None
    else:
        try:
            items = [dataset[i] for i in range(len(dataset))]
        except TypeError as exc:
            raise DataError("The dataset is neither a sequence of dicts nor an (images, labels[, masks]) tuple",
                            expected="len() and integer indexing, items {'image', 'label', 'fg_mask'}",
                            found=type(dataset).__name__,
                            fix="pass a list of dicts or a tuple of arrays") from exc
        if not items:
            raise DataError("The dataset is empty", expected="at least two labelled images", found="0 items",
                            fix="pass a non-empty dataset")
        if not all(isinstance(item, Mapping) and "image" in item and "label" in item for item in items):
            raise DataError("Dataset items must be dicts with 'image' and 'label'",
                            expected="{'image': CxHxW, 'label': int, optional 'fg_mask': HxW}",
                            found=type(items[0]).__name__, fix="wrap items as dicts or pass an arrays tuple")
        images = image_array(items)
        labels = np.asarray([int(_to_numpy(item["label"])) for item in items])
        with_mask = ["fg_mask" in item for item in items]
        if any(with_mask) and not all(with_mask):
            raise DataError("Only some dataset items carry 'fg_mask'", expected="all or none",
                            found=f"{sum(with_mask)} of {len(items)}", fix="give every item a mask or none")
        masks = np.stack([_to_numpy(item["fg_mask"]) for item in items]) if all(with_mask) else None
    return _checked(images, labels, masks)


def _checked(images: np.ndarray, labels: np.ndarray, masks: np.ndarray | None) -> ImageData:
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError("Images must be a non-empty NCHW batch", expected="(M, C, H, W) with M >= 1",
                        found=f"shape {images.shape}", fix="stack CxHxW images along a new first axis")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError("Labels do not match the images", expected=f"{len(images)} labels (one per image)",
                        found=f"shape {labels.shape}", fix="pass one integer label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError("Labels must be integers", expected="integer class ids", found=str(labels.dtype),
                        fix="map class names to 0..C-1")
    if masks is not None:
        if masks.shape != (images.shape[0], *images.shape[2:]):
            raise DataError("Masks do not match the images", expected=f"shape {(images.shape[0], *images.shape[2:])}",
                            found=f"shape {masks.shape}", fix="pass one HxW mask per image")
        if not (masks.dtype == np.bool_ or np.issubdtype(masks.dtype, np.integer)) or masks.min() < 0:
            raise DataError("Masks must be boolean or non-negative integer class maps", expected="bool or int >= 0",
                            found=str(masks.dtype), fix="threshold soft masks first")
        masks = masks.astype(np.int64)
    return ImageData(np.ascontiguousarray(images, dtype=np.float32), labels.astype(np.int64), masks)


def downsample_masks(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-patch class = the class covering most of the patch's pixels (area pooling of one-hot maps, so grids
    that do not divide the image, like /14 on 224, still work)."""
    one_hot = F.one_hot(torch.from_numpy(masks).long(), int(masks.max()) + 1).permute(0, 3, 1, 2).float()
    coverage = F.adaptive_avg_pool2d(one_hot, grid)
    return coverage.argmax(dim=1).numpy()


def _is_backbone(source: Any) -> bool:
    return callable(getattr(source, "forward_taps", None)) and callable(getattr(source, "split", None))


def _infer_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    rows = round(math.sqrt(num_patches * height / width))
    if rows <= 0 or num_patches % rows:
        raise DataError("Cannot infer the patch grid from the token count", expected="N = rows x cols with the "
                        "image's aspect ratio", found=f"N={num_patches} for {height}x{width} images",
                        fix="pass grid=(rows, cols)")
    return rows, num_patches // rows


class _BackboneExtractor:
    """Reads one block's residual stream (before the final norm) from a Backbone-like teacher or student.

    `taps`: a holder that computes its own features on top of `backbone` (a `RefinedTeacher`: merged adapters on
    the teacher's blocks) is read through its own `forward_taps`; `backbone` still gives the layer range, the token
    layout (`split`) and the grid. Such a holder may serve only some blocks (its `layers`): the default is then its
    deepest one, as its `forward` does, and any other block is refused here rather than mid-extraction.
    """

    def __init__(self, backbone: Any, layer: int | None, taps: Any = None):
        self.backbone = backbone
        self.taps = backbone if taps is None else taps
        served = None if taps is None else getattr(taps, "layers", None)
        wanted = layer if layer is not None else (max(served) if served else -1)  # default: the last block
        check = getattr(backbone, "check_layer", None)
        depth = getattr(backbone, "depth", None)
        if callable(check):
            self.layer = int(check(wanted))
        elif depth is not None and -depth <= wanted < depth:
            self.layer = wanted % depth
        else:
            raise ConfigError("Cannot resolve the block to read", expected="a backbone with 'depth' and a layer "
                              "inside it", found=f"layer={layer}, depth={depth}", fix="pass a valid layer index")
        if served is not None and self.layer not in served:
            raise ModelError(f"{type(taps).__name__} does not serve block {self.layer}",
                             expected=f"a layer in {sorted(served)} (its refined blocks)", found=f"layer={layer}",
                             fix="pass one of those layers, or the raw Backbone (its .backbone) for raw features")
        # Models without a class token (registers only, or none) have no CLS: pool the patches instead.
        self.has_cls = has_class_token(backbone)
        self.grid = tuple(getattr(backbone, "grid_size", ())) or None

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        params = next(iter(self.taps.parameters()), None) if isinstance(self.taps, nn.Module) else None
        device = params.device if params is not None else torch.device("cpu")
        tokens = self.taps.forward_taps(torch.from_numpy(images).to(device), [self.layer])[self.layer]
        prefix, patches = self.backbone.split(tokens)
        cls = prefix[:, 0] if self.has_cls and prefix.shape[1] > 0 else patches.mean(dim=1)
        return {"cls": cls.float().cpu().numpy(), "patch_tokens": patches.float().cpu().numpy()}


def source_fingerprint(source: Any, source_id: str | None = None) -> str:
    """A stable id for the source: `source_id` when given, the source's `fingerprint` attribute, or a hash of an
    nn.Module's weights. Plain callables have none and must be named by the caller."""
    if source_id is not None:
        return str(source_id)
    declared = getattr(source, "fingerprint", None)
    if isinstance(declared, str) and declared:
        return declared
    if isinstance(source, nn.Module):
        return module_sha256(source)
    raise ConfigError("Cannot fingerprint this feature source for caching",
                      expected="an nn.Module, a source with a 'fingerprint' string, or source_id=...",
                      found=type(source).__name__, fix="pass source_id (e.g. the model file's hash) or cache_dir=None")


def _inner_backbone(source: Any) -> Any:
    """The Backbone a holder keeps in `.backbone`, or None when `source` is a backbone itself or holds none."""
    inner = getattr(source, "backbone", None)
    return inner if not _is_backbone(source) and _is_backbone(inner) else None


def _computes_own_taps(source: Any) -> bool:
    """A holder with its own `forward_taps` (e.g. `RefinedTeacher`) is not its backbone: its features differ."""
    return _inner_backbone(source) is not None and callable(getattr(source, "forward_taps", None))


def _unwrap(source: Any) -> Any:
    """A plain holder of a backbone (e.g. `PlantedTeacher`, whose `.backbone` is the teacher) stands for that
    backbone. A holder that computes its own taps stays itself, so its own features are read and cached under its
    own weights, never the raw backbone's."""
    inner = _inner_backbone(source)
    return inner if inner is not None and not _computes_own_taps(source) else source


def _resolve(source: Any, layer: int | None) -> tuple[Callable[[np.ndarray], Mapping[str, Any]], tuple | None]:
    if _is_backbone(source) or _computes_own_taps(source):
        extractor = (_BackboneExtractor(source, layer) if _is_backbone(source)
                     else _BackboneExtractor(_inner_backbone(source), layer, taps=source))
        return extractor, extractor.grid
    if layer is not None:
        raise ConfigError("'layer' only applies to Backbone sources", expected="layer=None for a Runner/callable",
                          found=f"layer={layer}", fix="export the layer you want as the model output")
    run = getattr(source, "run", None)
    if callable(run):
        return run, None
    if callable(source):
        return source, None
    raise ConfigError("Unsupported feature source", expected="a Backbone (forward_taps/split), a Runner (run) or a "
                      "callable images -> {'cls', 'patch_tokens'}", found=type(source).__name__,
                      fix="wrap the model in one of these")


def _outputs(raw: Mapping[str, Any], batch: int) -> tuple[np.ndarray, np.ndarray]:
    missing = {"cls", "patch_tokens"} - set(raw)
    if missing:
        raise DataError("The feature source returned incomplete outputs", expected="keys 'cls' and 'patch_tokens'",
                        found=f"keys {sorted(raw)}", fix="export the model with output names cls, patch_tokens")
    cls, patches = _to_numpy(raw["cls"]).astype(np.float32), _to_numpy(raw["patch_tokens"])
    if cls.ndim != 2 or patches.ndim != 3 or len(cls) != batch or len(patches) != batch:
        raise DataError("Feature outputs have the wrong shape", expected=f"cls ({batch}, D), patch_tokens "
                        f"({batch}, N, D)", found=f"cls {cls.shape}, patch_tokens {patches.shape}",
                        fix="return per-image CLS and patch tokens")
    return cls, patches


def extract_features(source: Any, dataset: Any, *, layer: int | None = None, batch_size: int = 64,
                     patch_dtype: PatchDtype | None = "float16", grid: tuple[int, int] | None = None,
                     cache_dir: str | Path | None = None, source_id: str | None = None) -> FeatureSet:
    """Run `source` once over `dataset` and return its frozen features; with `cache_dir`, reuse an identical run.

    The cache key covers the source (weights hash or `source_id`), the exact dataset bytes, the layer, the patch
    dtype and the grid, so changing any of them recomputes. patch_dtype=None drops the patch tokens (no dense probe).
    """
    if batch_size < 1:
        raise ConfigError("batch_size must be positive", expected=">= 1", found=str(batch_size), fix="use e.g. 64")
    if patch_dtype not in ("float16", "float32", None):
        raise ConfigError("Unknown patch_dtype", expected="'float16', 'float32' or None", found=repr(patch_dtype),
                          fix="pick one of those")
    data = as_image_data(dataset)
    source = _unwrap(source)
    run, source_grid = _resolve(source, layer)
    path = key = None
    if cache_dir is not None:
        resolved_layer = run.layer if isinstance(run, _BackboneExtractor) else None
        parts = {"version": _CACHE_VERSION, "source": source_fingerprint(source, source_id), "data":
                 data.fingerprint(), "layer": resolved_layer, "patch_dtype": patch_dtype, "grid": grid}
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        path = Path(cache_dir) / f"features-{key[:24]}.npz"
        if path.exists():
            cached = _load(path, key)
            if cached is not None:
                return cached
    features = _compute(run, source, data, batch_size=batch_size, patch_dtype=patch_dtype,
                        grid=grid or source_grid)
    if path is not None:
        features = dataclasses.replace(features, fingerprint=key)
        _save(path, features)
    return features


def _compute(run: Callable[[np.ndarray], Mapping[str, Any]], source: Any, data: ImageData, *, batch_size: int,
             patch_dtype: PatchDtype | None, grid: tuple[int, int] | None) -> FeatureSet:
    module = source if isinstance(source, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()  # frozen features: no dropout / drop-path noise
    cls_parts, pooled_parts, patch_parts, num_patches = [], [], [], 0
    try:
        with torch.inference_mode():
            for start in range(0, len(data.images), batch_size):
                batch = data.images[start:start + batch_size]
                cls, patches = _outputs(run(batch), len(batch))
                num_patches = patches.shape[1]
                cls_parts.append(cls)
                pooled_parts.append(patches.astype(np.float32).mean(axis=1))
                if patch_dtype is not None:
                    patch_parts.append(patches.astype(patch_dtype))
    finally:
        if module is not None:
            module.train(was_training)
    height, width = data.images.shape[2:]
    resolved = grid or _infer_grid(num_patches, height, width)
    if num_patches != resolved[0] * resolved[1]:
        raise DataError("Patch tokens do not fill the patch grid", expected=f"{resolved[0] * resolved[1]} tokens",
                        found=f"{num_patches}", fix="pass the right grid=(rows, cols)")
    patches_all = np.concatenate(patch_parts) if patch_parts else None
    masks = downsample_masks(data.masks, resolved) if data.masks is not None else None
    return FeatureSet(cls=np.concatenate(cls_parts), pooled=np.concatenate(pooled_parts), patches=patches_all,
                      labels=data.labels, patch_masks=masks, grid=(int(resolved[0]), int(resolved[1])))


def _save(path: Path, features: FeatureSet) -> None:
    arrays = {"cls": features.cls, "pooled": features.pooled, "labels": features.labels,
              "grid": np.asarray(features.grid), "fingerprint": np.asarray(features.fingerprint)}
    if features.patches is not None:
        arrays["patches"] = features.patches
    if features.patch_masks is not None:
        arrays["patch_masks"] = features.patch_masks
    # Atomic: a crash or a concurrent reader never sees a half-written cache.
    atomic_savez(path, arrays)


def _load(path: Path, key: str) -> FeatureSet | None:
    """Read a cache file; None when it is unreadable or belongs to another key (then it is recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != key:
                return None
            return FeatureSet(cls=stored["cls"], pooled=stored["pooled"],
                              patches=stored["patches"] if "patches" in stored else None,
                              labels=stored["labels"],
                              patch_masks=stored["patch_masks"] if "patch_masks" in stored else None,
                              grid=tuple(int(v) for v in stored["grid"]), fingerprint=key)
    except (OSError, ValueError, KeyError):
        return None
