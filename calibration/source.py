"""Turn whatever holds the user's distillation images into one validated float32 (N, C, H, W) array.

Calibration fails quietly when its images are wrong (NaN ranges, a single blank image, the wrong size): the
quantizer still writes a model, just a bad one. So every source is checked here, once, before any backend sees it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from singer_deploy.errors import DataError
from singer_deploy.models.data import ImageFolder, image_array

ImageSource = Any  # np.ndarray | torch.Tensor | Dataset/Sequence of tensors or {"image": tensor} | str | Path

_ARRAY_SUFFIXES = {".npy", ".npz"}


def load_calibration_images(source: ImageSource, *, transform: Callable | None = None) -> np.ndarray:
    """Return the source's images as a contiguous float32 (N, C, H, W) array, or raise DataError.

    `source` may be an array or tensor (N, C, H, W), a dataset / sequence whose items are image tensors or dicts
    with an "image" entry (SyntheticShapes, ImageFolder), a .npy/.npz file, or an image folder / list file
    (read with singer_deploy.models.data.ImageFolder and `transform`, which must give every image the same size).
    """
    if isinstance(source, (str, Path)):
        source = _open_path(Path(source), transform)
    if isinstance(source, torch.Tensor):
        images = source.detach().cpu().float().numpy()
    elif isinstance(source, np.ndarray):
        images = source
    else:
        images = _stack_items(source)
    return _validated(images)


def _open_path(path: Path, transform: Callable | None) -> Any:
    if not path.exists():
        raise DataError("The calibration source does not exist",
                        expected="an array file, an image folder or a list file", found=str(path), fix="check the path")
    if path.suffix.lower() not in _ARRAY_SUFFIXES:
        return ImageFolder(path, transform=transform)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "images" not in loaded.files:
                    raise DataError("The calibration .npz file has no 'images' array", expected="an 'images' entry",
                                    found=f"entries {loaded.files}", fix="save it with np.savez(path, images=array)")
                return loaded["images"]
        return loaded
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # how npy / npz damage surfaces
        raise DataError("The calibration array file is corrupt or unreadable", expected="a readable .npy/.npz",
                        found=f"{path}: {type(err).__name__}: {err}", fix="regenerate the file") from err


def _stack_items(items: Iterable) -> np.ndarray:
    try:
        count = len(items)  # type: ignore[arg-type]
    except TypeError as err:
        raise DataError("The calibration source is not an image collection",
                        expected="an array, tensor, dataset or sequence of images", found=type(items).__name__,
                        fix="pass a Dataset or a stacked array") from err
    if count == 0:
        raise DataError("The calibration source is empty", expected="at least one image", found="0 items",
                        fix="point calibration at the distillation images")
    return image_array(items)


def _validated(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4:
        raise DataError("Calibration images have the wrong rank", expected="(N, C, H, W)",
                        found=f"shape {tuple(images.shape)}", fix="stack single images along a new first axis")
    if images.shape[0] == 0:
        raise DataError("The calibration source is empty", expected="at least one image", found="0 images",
                        fix="point calibration at the distillation images")
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError("Calibration images must be normalised floats", expected="float32 after the eval transform",
                        found=f"dtype {images.dtype}", fix="apply the student's normalisation before calibrating")
    images = np.ascontiguousarray(images, dtype=np.float32)
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        raise DataError("Calibration images contain NaN or Inf", expected="finite pixel values",
                        found=f"{int((~finite).sum())} of {len(images)} images with non-finite values "
                        f"(first: index {int(np.argmin(finite))})", fix="drop or repair the corrupt images")
    if float(images.std()) == 0.0:
        raise DataError("Calibration images are all one constant value", expected="real images with some variation",
                        found=f"every pixel equal to {float(images.flat[0])}",
                        fix="check the loader; a blank set gives meaningless INT8 ranges")
    return images
