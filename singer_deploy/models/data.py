"""Image sources: a deterministic synthetic generator, bundled real photos, and user image folders.

Nothing here downloads anything. The synthetic images carry the ground truth the planted-artifact teacher and the
probes need: a class label (shape), a foreground mask, and the exactly flat background patches artifacts land on.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from singer_deploy.errors import DataError, shown_path

if TYPE_CHECKING:
    from singer_deploy.models.backbone import Backbone

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SHAPE_CLASSES = ("disc", "square", "triangle", "cross")
# Colour photos scikit-image ships inside its wheel (others would need a download).
BUNDLED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
                  "immunohistochemistry", "retina")


def normalise(pixels: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """HxWx3 float pixels in [0, 1] -> normalised 3xHxW float32 tensor."""
    chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32))
    return (chw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@dataclass
class SyntheticShapes(Dataset):
    """Textured shapes on smooth backgrounds, with a few exactly flat background patches.

    `flat_share` is the share of patches (on the `patch_size` grid) that are exactly flat: the planted teacher writes
    its artifacts there, so it sets the artifact share (default ~2% as in DINOv2; tests also use ~8%).
    Item i depends only on (seed, i): the data set is reproducible and can be sharded freely.
    """

    n: int
    img_size: int = 64
    patch_size: int = 8
    flat_share: float = 0.02
    seed: int = 0
    num_classes: int = 4
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    _grid: int = field(init=False, repr=False)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise DataError("Image size must be a multiple of the patch size",
                            expected=f"a multiple of {self.patch_size}", found=str(self.img_size),
                            fix="use the teacher's input size")
        if not 1 <= self.num_classes <= len(SHAPE_CLASSES):
            raise DataError("Unsupported number of shape classes", expected=f"1..{len(SHAPE_CLASSES)}",
                            found=str(self.num_classes), fix="lower num_classes")
        self._grid = self.img_size // self.patch_size

    @property
    def flat_per_image(self) -> int:
        wanted = self.flat_share * self._grid ** 2
        return max(1, round(wanted)) if self.flat_share > 0 else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        pixels, label, fg_mask, flat_mask = self.render(index)
        return {"image": normalise(pixels, self.mean, self.std), "label": label,
                "fg_mask": torch.from_numpy(fg_mask), "flat_mask": torch.from_numpy(flat_mask)}

    def render(self, index: int) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """Pixels (HxWx3 in [0, 1]), label, foreground mask and flat-patch mask (pixel resolution) of item index."""
        rng = np.random.default_rng([self.seed, index])
        size, p = self.img_size, self.patch_size
        yy, xx = np.mgrid[0:size, 0:size] / size
        pixels = self._background(rng, yy, xx)
        label = int(rng.integers(self.num_classes))
        fg_mask = _shape_mask(SHAPE_CLASSES[label], rng, yy, xx)
        pixels[fg_mask] = _texture(rng, yy, xx)[fg_mask]
        flat_mask = np.zeros((size, size), dtype=bool)
        cells = [(r, c) for r in range(self._grid) for c in range(self._grid)
                 if not fg_mask[r * p:(r + 1) * p, c * p:(c + 1) * p].any()]
        chosen = rng.permutation(len(cells))[:self.flat_per_image]
        for r, c in (cells[i] for i in chosen):
            block = (slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
            pixels[block] = pixels[block].mean(axis=(0, 1))  # exactly flat: no texture energy at all
            flat_mask[block] = True
        return np.clip(pixels, 0.0, 1.0), label, fg_mask, flat_mask

    @staticmethod
    def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        # A gradient plus low-frequency waves: smooth, but no patch is exactly flat unless we make it so.
        base = rng.uniform(0.3, 0.7, size=3)
        slope = rng.uniform(0.15, 0.3, size=2) * rng.choice([-1, 1], size=2)
        phase, freq = rng.uniform(0, 2 * np.pi, size=2), rng.uniform(1.0, 2.5, size=2)
        field = slope[0] * (yy - 0.5) + slope[1] * (xx - 0.5)
        field = field + 0.05 * np.sin(2 * np.pi * freq[0] * yy + phase[0]) * np.cos(2 * np.pi * freq[1] * xx + phase[1])
        tint = rng.uniform(0.5, 1.0, size=3)
        return base[None, None, :] + field[..., None] * tint[None, None, :]


def _shape_mask(shape: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    r = rng.uniform(0.18, 0.28)
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        return dy ** 2 + dx ** 2 < r ** 2
    if shape == "square":
        return (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
    if shape == "triangle":
        return (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    return ((np.abs(dy) < r * 0.3) & (np.abs(dx) < r)) | ((np.abs(dx) < r * 0.3) & (np.abs(dy) < r))


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    colour_a, colour_b = rng.uniform(0, 1, size=(2, 3))
    angle, freq = rng.uniform(0, np.pi), rng.uniform(6, 12)
    wave = np.sin(2 * np.pi * freq * (np.cos(angle) * yy + np.sin(angle) * xx))
    wave = wave + 0.5 * np.sign(np.sin(2 * np.pi * freq * 1.7 * yy)) * np.sign(np.sin(2 * np.pi * freq * 1.3 * xx))
    mix = (wave - wave.min()) / (np.ptp(wave) + 1e-9)
    return colour_a[None, None, :] * mix[..., None] + colour_b[None, None, :] * (1 - mix[..., None])


class InMemory(Dataset):
    """Every item of `data`, read once and kept. For a small data set read over many epochs whose items cost more to
    make than to keep: SyntheticShapes renders an image on every read (0.75 ms at 64 px), which was a quarter of a
    FitNet step of benchmarks/downstream.py (docs/results.md, "Downstream"). Items must not depend on the RNG state
    at read time (train/feed.py seeds it per read; SyntheticShapes items depend on their index only)."""

    def __init__(self, data: Dataset):
        self.items = [data[index] for index in range(len(data))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def image_array(items, indices: Sequence[int] | None = None) -> np.ndarray:
    """Images of the given items as one (B, C, H, W) array: the one place where dataset items become arrays.

    Items are dicts with an "image" entry (SyntheticShapes, ImageFolder) or bare images, each a tensor or an array.
    Floating tensors become float32 (numpy has no bfloat16); other dtypes are kept for the caller to judge.
    """
    indices = range(len(items)) if indices is None else indices
    arrays = []
    for index in indices:
        item = items[index]
        image = item["image"] if isinstance(item, Mapping) else item
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            image = (image.float() if image.is_floating_point() else image).numpy()
        if not isinstance(image, np.ndarray):
            raise DataError(f"Item {index} is not an image", expected="a tensor / array or {'image': tensor}",
                            found=type(image).__name__, fix="make the dataset return image tensors")
        arrays.append(image)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError("Images differ in shape", expected="one (C, H, W) shape for every image",
                        found=f"shapes {sorted(shapes)[:4]}", fix="resize / crop them to one resolution "
                        "(for a folder pass transform=image_transform(backbone.data_config(), training=False))")
    return np.stack(arrays)


def stack_images(dataset: Dataset, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Images of the given items as one (B, C, H, W) tensor (see `image_array`)."""
    return torch.from_numpy(image_array(dataset, indices))


def bundled_photos(img_size: int, crops_per_photo: int = 4, seed: int = 0) -> np.ndarray:
    """Real photographs shipped inside scikit-image (no download): (B, img_size, img_size, 3) floats in [0, 1]."""
    try:
        from skimage import data as skdata
        from skimage.transform import resize
    except ImportError as err:
        raise DataError("Bundled photos need scikit-image", expected="scikit-image installed",
                        found="ImportError", fix="pip install 'singer-deploy[images]'") from err
    rng = np.random.default_rng(seed)
    crops = []
    for name in BUNDLED_PHOTOS:
        photo = getattr(skdata, name)()
        photo = (photo[0] if isinstance(photo, tuple) else photo)[..., :3].astype(np.float32) / 255.0
        h, w = photo.shape[:2]
        side = min(h, w)
        for _ in range(crops_per_photo):
            scale = rng.uniform(0.5, 1.0)
            s = int(side * scale)
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            crops.append(resize(photo[y:y + s, x:x + s], (img_size, img_size), anti_aliasing=True))
    return np.stack(crops).astype(np.float32)


# An unreadable file is served by the next readable one; this many unreadable files in a row is an error.
MAX_BAD_IN_A_ROW = 16
# Share of a folder's files that may be unreadable before a run stops (fewer than MAX_BAD_IN_A_ROW always pass).
MAX_BAD_SHARE = 0.05


class ImageFolder(Dataset):
    """Images under a folder (recursive) or listed in a text file, with a timm transform.

    Files are listed by name, not opened, at start-up: a large folder costs nothing until it is read, on every
    torchrun rank. A file that cannot be decoded is skipped where it is met: the item is served from the next
    readable file (the substitute depends only on the index, so resume stays bit-exact) and names the skipped file
    under "skipped" ("path<TAB>reason" lines), so the training loop counts files met inside DataLoader workers too
    (SkippedImages). `skipped` holds those met in this process.

    labels=True (a folder with one subfolder per class, docs/usage.md "Labelled folders"): each item also has
    "label", the index of its subfolder in `classes` (sorted names), so the probes of singer_deploy.evaluation run on
    it. `masks` (a folder mirroring the image folder: <masks>/<class>/<stem>.png, one class id per pixel, 0 =
    background) adds "fg_mask", the per-pixel classes the dense probe reads (target "mask"); they must have the
    size of the transformed image, so give masked folders at the model's input size (no resizing transform).
    """

    def __init__(self, source: str | Path, transform: Callable[[Image.Image], torch.Tensor] | None = None, *,
                 labels: bool = False, masks: str | Path | None = None):
        self.source = Path(source).expanduser()
        self.transform = transform
        self.files: list[Path] = self._candidates()
        self.skipped: dict[str, str] = {}
        if not self.files:
            raise DataError(f"No image files in {self.source}",
                            expected=f"image files ({', '.join(sorted(IMAGE_SUFFIXES))})", found="0 image files",
                            fix="point data at a folder or list file of images")
        self.masks = None if masks is None else Path(masks).expanduser()
        self.classes: tuple[str, ...] = self._classes() if labels or masks is not None else ()

    def _classes(self) -> tuple[str, ...]:
        outside = [f for f in self.files if f.parent.parent != self.source]
        if not self.source.is_dir() or outside:
            raise DataError("Labels come from one subfolder per class", expected=f"{self.source}/<class>/<image>",
                            found=f"e.g. {outside[0]}" if outside else "a list file",
                            fix="put each class's images in its own subfolder (no deeper folders)")
        classes = tuple(sorted({f.parent.name for f in self.files}))
        if len(classes) < 2:
            raise DataError("A labelled folder needs two or more classes", expected="two or more class subfolders",
                            found=f"{len(classes)}: {list(classes)}", fix="add a subfolder per class")
        return classes

    def _annotations(self, path: Path, image: torch.Tensor) -> dict:
        """"label" (and "fg_mask") of the image at `path`, when the folder is labelled."""
        if not self.classes:
            return {}
        out: dict = {"label": self.classes.index(path.parent.name)}
        if self.masks is not None:
            mask_path = self.masks / path.parent.name / f"{path.stem}.png"
            if not mask_path.is_file():
                raise DataError("An image has no mask", expected=f"{mask_path}", found="no such file",
                                fix="give every image a same-stem PNG of class ids under the masks folder")
            with Image.open(mask_path) as handle:
                mask = np.asarray(handle)
            if mask.ndim != 2 or mask.shape != tuple(image.shape[-2:]):
                raise DataError(f"Mask {mask_path} does not fit its image", expected=f"one channel of class ids, "
                                f"{tuple(image.shape[-2:])} pixels (the transformed image)", found=f"shape {mask.shape}",
                                fix="save masks as single-channel PNGs at the model's input size, images too")
            out["fg_mask"] = torch.from_numpy(mask.astype(np.int64))
        return out

    def _candidates(self) -> list[Path]:
        if not self.source.exists():
            raise DataError("The image source does not exist", expected="a folder or a list file",
                            found=shown_path(self.source), fix="check the path")
        if self.source.is_dir():
            return sorted(p for p in self.source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.source.is_file():   # a FIFO would block the read forever, /dev/zero fill the memory
            raise DataError(f"{self.source} is neither a folder nor a regular file",
                            expected="a folder of images or a text file listing them",
                            found="a device, FIFO or socket", fix="point data.source at a folder or a list file")
        try:
            text = self.source.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{self.source} is neither a folder nor a text list of image paths",
                            expected="a folder, or a UTF-8 text file with one image path per line",
                            found=f"binary content ({err.reason} at byte {err.start})",
                            fix="point data.source at the image folder or at a list file") from err
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return [(self.source.parent / line) if not Path(line).is_absolute() else Path(line) for line in lines]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for offset in range(min(MAX_BAD_IN_A_ROW, len(self.files))):
            path = self.files[(index + offset) % len(self.files)]
            try:
                image = read_image(path)
            except DataError as err:
                self.skipped[str(path)] = err.found or str(err)
                skipped.append(f"{path}\t{self.skipped[str(path)]}")
                log.warning("Skipping unreadable image %s (%s)", path, self.skipped[str(path)])
                continue
            tensor = self.transform(image) if self.transform is not None else normalise(np.asarray(image) / 255.0)
            return {"image": tensor, "path": str(path), "skipped": "\n".join(skipped),
                    **self._annotations(path, tensor)}
        problem = (f"No readable images in {self.source}: all {len(skipped)} files are unreadable"
                   if len(skipped) == len(self.files) else
                   f"{len(skipped)} unreadable image files in a row in {self.source}")
        raise DataError(problem,
                        expected="decodable image files", found=f"e.g. {skipped[0]}",
                        fix="check the folder holds images (and not e.g. Git LFS pointers or truncated downloads)")

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor] | None) -> "ImageFolder":
        """The same listing read with another transform (e.g. training vs evaluation), without listing again."""
        twin = copy.copy(self)
        twin.transform = transform   # shares `skipped`: one record of the listing's bad files
        return twin

    def without_annotations(self) -> "ImageFolder":
        """The same listing without labels or masks: training reads neither (a random crop would not fit a mask)."""
        twin = copy.copy(self)
        twin.classes, twin.masks = (), None
        return twin

    def first_image_size(self) -> tuple[int, int] | None:
        """(height, width) of the first readable file, from its header only; None when the first files fail."""
        for path in self.files[:MAX_BAD_IN_A_ROW]:
            try:
                with Image.open(path) as image:
                    return image.height, image.width
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
                continue
        return None


def read_image(path: Path) -> Image.Image:
    """Decode one image file to RGB, or raise a DataError naming the file and the decoder's reason."""
    try:
        with Image.open(path) as image:
            return _as_rgb8(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"Cannot read image {path}", expected="a decodable image file",
                        found=f"{type(err).__name__}: {err}", fix="remove or replace the file") from err


def _as_rgb8(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grey (PNG, TIFF): map 0..65535 onto 0..255; convert("RGB") would clip at 255 and turn it white.
        scaled = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


class SkippedImages:
    """Unreadable files met while training, wherever they were read (this process or a DataLoader worker).

    Fed with each batch's "skipped" entries; `check` stops the run once more than MAX_BAD_SHARE of the listed files
    (and at least MAX_BAD_IN_A_ROW) turned out unreadable.
    """

    def __init__(self, listed: int, max_share: float = MAX_BAD_SHARE):
        self.listed, self.max_share = listed, max_share
        self.files: dict[str, str] = {}

    def add(self, batch: dict) -> None:
        for lines in batch.get("skipped", ()):
            for line in filter(None, lines.split("\n")):
                path, _, reason = line.partition("\t")
                self.files[path] = reason

    def check(self) -> None:
        limit = max(MAX_BAD_IN_A_ROW, int(self.max_share * self.listed))
        if len(self.files) >= limit:
            first = next(iter(self.files.items()))
            raise DataError(f"{len(self.files)} of {self.listed} images read so far are unreadable",
                            expected=f"fewer than {limit} ({self.max_share:.0%} of the files, at least "
                                     f"{MAX_BAD_IN_A_ROW})", found=f"e.g. {first[0]} ({first[1]})",
                            fix="remove or re-encode the unreadable files, then run again (the run resumes)")

    def to_dict(self, listed_files: int = 20) -> dict:
        return {"count": len(self.files), "files": dict(list(self.files.items())[:listed_files])}


@dataclass(frozen=True)
class TeacherInput:
    """What the data needs to know of the teacher: its input size, patch size and timm's preprocessing.

    A run records it in manifest.json, so an export-only run rebuilds the same held-out images without building
    the teacher (which may be a ViT-L). `data_config` answers like Backbone.data_config, so build_data takes either.
    """

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    pretrained_config: dict  # Backbone.data_config(): input_size, interpolation, mean, std, crop_pct, ...

    @classmethod
    def of(cls, teacher: Backbone) -> "TeacherInput":
        return cls(tuple(teacher.img_size), tuple(teacher.patch_size), dict(teacher.data_config()))

    def data_config(self, crop_pct: float | None = None) -> dict:
        return {**self.pretrained_config, **({} if crop_pct is None else {"crop_pct": float(crop_pct)})}

    def to_dict(self) -> dict:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in self.pretrained_config.items()}
        return {"img_size": list(self.img_size), "patch_size": list(self.patch_size), "data_config": config}

    @classmethod
    def from_dict(cls, data: dict) -> "TeacherInput":
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in data["data_config"].items()}
        return cls(tuple(data["img_size"]), tuple(data["patch_size"]), config)


def image_transform(data_config: dict, *, training: bool) -> Callable[[Image.Image], torch.Tensor]:
    """timm's transform for a model's data config (Backbone.data_config: the model's real input size).

    training=True: random resized crop + horizontal flip + colour jitter (timm's ImageNet training recipe);
    training=False: resize to size / crop_pct and centre crop (parity, analysis and report images).
    """
    from timm.data import create_transform
    return create_transform(**data_config, is_training=training)


def default_crop_pct(folder: ImageFolder, img_size: Sequence[int], teacher_crop_pct: float) -> float:
    """1.0 when the folder's images already have the model's input size (a centre crop would shift the patch grid),
    else the teacher's pretrained crop_pct."""
    return 1.0 if folder.first_image_size() == tuple(img_size) else float(teacher_crop_pct)
