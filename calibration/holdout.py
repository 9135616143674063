"""Calibration images from the training data, provably disjoint from the images the INT8 gate is measured on.

A gate measured on the images the quantizer calibrated on is in-sample: the activation ranges were fitted to exactly
those inputs, so the gate flatters the artifact. The pipeline therefore draws calibration images from the training
set, never from the parity images, and records both sets by index and per-image hash in the manifest; any image
whose pixels equal a parity image (a duplicate file, an overlapping split) is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from singer_deploy.calibration.selection import DEFAULT_CALIBRATION_SIZE, CalibrationSet, random_selection
from singer_deploy.calibration.source import ImageSource, load_calibration_images
from singer_deploy.errors import DataError
from singer_deploy.hashing import array_sha256

_HASH_CHARS = 16   # 64 bits per image: collisions among a few thousand images are out of the question


def image_hashes(images: np.ndarray) -> list[str]:
    """A short sha256 of each image as float32 (hashing.array_sha256): equal pixels, equal hash."""
    images = np.asarray(images, dtype=np.float32)
    return [array_sha256(image)[:_HASH_CHARS] for image in images]


@dataclass(frozen=True)
class HeldOutCalibration:
    """The calibration set and the record that proves it is disjoint from the parity images."""

    calibration: CalibrationSet
    image_sha256: tuple[str, ...]
    parity_sha256: tuple[str, ...]
    dropped_overlap: int           # training images dropped because they equal a parity image

    def to_dict(self) -> dict:
        return {"source": "training data", "method": self.calibration.method, "seed": self.calibration.seed,
                "size": len(self.calibration), "training_images": self.calibration.source_size,
                "indices": self.calibration.indices.tolist(), "image_sha256": list(self.image_sha256),
                "parity_images": len(self.parity_sha256), "parity_image_sha256": list(self.parity_sha256),
                "overlap_with_parity": len(set(self.image_sha256) & set(self.parity_sha256)),
                "dropped_overlap": self.dropped_overlap}


def calibration_from_training(training: ImageSource, parity_images: np.ndarray, *,
                              size: int = DEFAULT_CALIBRATION_SIZE, seed: int = 0) -> HeldOutCalibration:
    """min(size, len(training)) random training images, minus any equal to a parity image.

    `training` is the distillation data set (items are image tensors or {"image": tensor}) or an array; only the
    chosen items are loaded, so a large image folder costs `size` reads.
    """
    count = len(training)
    if count == 0:
        raise DataError("No training images to calibrate on", expected="a non-empty training set",
                        found="0 images", fix="point data.source at the distillation images")
    indices = random_selection(count, min(size, count), seed)
    chosen = load_calibration_images(training[indices] if isinstance(training, np.ndarray)
                                     else [training[int(i)] for i in indices])
    parity = image_hashes(parity_images)
    hashes = image_hashes(chosen)
    parity_set = set(parity)
    keep = np.array([h not in parity_set for h in hashes], dtype=bool)
    if not keep.any():
        raise DataError("Every calibration image is also a parity image", expected="training images distinct from "
                        "the held-out parity images", found=f"{len(hashes)} of {len(hashes)} overlap",
                        fix="hold the parity (eval) images out of the training data")
    calibration = CalibrationSet(images=np.ascontiguousarray(chosen[keep]), indices=indices[keep], method="random",
                                 seed=seed, source_size=count)
    return HeldOutCalibration(calibration, tuple(h for h, k in zip(hashes, keep) if k), tuple(parity),
                              int((~keep).sum()))
