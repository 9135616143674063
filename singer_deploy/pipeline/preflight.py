"""What a run checks before it touches any directory; `check-config` runs the same checks, so both say the same.

Two stages: `check_settings` looks at what the validated RunConfig needs from this machine (packages, local models),
`check_built` looks at the models and evaluation images once they exist (widths, sizes, enough held-out images).
Between them the pipeline builds the models (strict weights, models/weights.py) and opens the data sources, and
`check_data_memory` refuses settings whose images cannot fit in memory before any image is generated or read.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import numpy as np
from singer_deploy.config import MIN_PARITY_IMAGES, RunConfig, calibrates, is_auto_precision
from singer_deploy.errors import ConfigError, DataError
from singer_deploy.memory import Need, check_fits
from singer_deploy.models.backbone import Backbone
from singer_deploy.models.hub import is_hub_name, resolve_model_source


def check_settings(config: RunConfig) -> None:
    """What the config needs from this machine, before anything is built: the packages its loggers use, and the
    local folders or cache entries its hub model names point at. (The values themselves were validated when the
    RunConfig was built, singer_deploy/config.py.)"""
    if "tensorboard" in config.train.loggers and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.loggers: tensorboard is not installed", expected="the tensorboard package",
                          found="no module named tensorboard",
                          fix="pip install 'singer-deploy[tensorboard]', or drop tensorboard from train.loggers")
    for role in ("teacher", "student"):
        spec = getattr(config, role)
        if is_hub_name(spec.name):
            resolve_model_source(spec.name)  # a missing folder or cache entry fails here, before any work


def check_built(config: RunConfig, teacher: Backbone, student: Backbone, eval_images: int) -> None:
    """Checks that need the built models and the opened data: input sizes, adapter rank, layers, eval images."""
    if student.img_size != teacher.img_size:
        raise ConfigError("Teacher and student take different input sizes",
                          expected=f"student.kwargs.img_size = {teacher.img_size[0]} (the teacher's)",
                          found=str(student.img_size), fix="create the student at the teacher's resolution")
    if config.train.method == "singer" and config.singer.rank > teacher.embed_dim:
        raise ConfigError("singer.rank exceeds the teacher's width", expected=f"rank <= {teacher.embed_dim}",
                          found=str(config.singer.rank), fix=f"set singer.rank <= {teacher.embed_dim} "
                          "(published: 64 for width 1024)")
    for layer in config.layers:
        teacher.check_layer(layer)
    if config.export.formats and eval_images < MIN_PARITY_IMAGES:
        raise DataError("Too few held-out images for the parity gates", expected=f">= {MIN_PARITY_IMAGES} "
                        "evaluation images (a fifth of an image folder is held out, at most data.eval_n)",
                        found=f"{eval_images}", fix="add images to data.source (10 or more), or export later")


def unprobeable(labels: np.ndarray) -> str | None:
    """Why the probes cannot use these held-out labels, or None. They fit on part of the images and score the rest
    (evaluation/probes.py, split_indices): they need two classes, and a class with two images or more."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) >= 2 and counts.max() >= 2:
        return None
    return f"{len(labels)} held-out images, images per class id {dict(zip(classes.tolist(), counts.tolist()))}"


def check_probe_labels(labels: np.ndarray) -> None:
    """Labels a user asked for (data.labels) must be usable by the probes: known before any training."""
    found = unprobeable(labels)
    if found is not None:
        raise DataError("The held-out images cannot be probed", expected="two or more classes among the held-out "
                        "images, one of them with two images or more", found=found,
                        fix="raise data.eval_n (an image folder holds out a fifth of its images, at most eval_n), "
                        "add images to the classes, or set data.labels: false")


# Bytes of one index in the int64 permutations that order the training images (one per epoch while training, one to
# draw the INT8 calibration images).
INDEX_BYTES = 8


def check_data_memory(config: RunConfig, img_size: Sequence[int], train_count: int, eval_count: int, *,
                      training: bool) -> None:
    """Refuse (ConfigError, exit 2) settings whose images cannot fit in this machine's memory, before any is made.

    Counted, as float32 images of 3 x img_size: the held-out images (read one by one, then stacked: twice at the
    peak), kept for the whole run; while training (`training`), a batch (likewise twice) and each epoch's order of
    the training images; while exporting, the INT8 calibration images and their draw, and the largest timed batch.
    A lower bound (models and activations are not counted), so a refusal is certain (singer_deploy/memory.py)."""
    height, width = img_size[0], img_size[1]
    image = 3 * height * width * 4
    shape = f"3x{height}x{width} float32"
    images_key = "data.n" if config.data.source == "synthetic" else "data.source"
    held_out = Need("data.eval_n", f"{eval_count} held-out images of {shape}, read then stacked",
                    2 * eval_count * image)
    if training:
        batch = config.train.batch_size
        check_fits([held_out, Need("train.batch_size", f"a batch of {batch} images, read then stacked",
                                   2 * batch * image),
                    Need(images_key, f"each epoch's order of the {train_count} training images (int64)",
                         INDEX_BYTES * train_count)], "Training")
    spec = config.export
    if not spec.formats:
        return
    exporting = [held_out]
    if spec.benchmark or is_auto_precision(spec.precision):
        largest = max(spec.batch_sizes)
        exporting.append(Need("export.batch_sizes", f"a timed batch of {largest} images", largest * image))
    if calibrates(spec.precision):
        chosen = min(spec.calibration_size, train_count)
        exporting += [Need("export.calibration_size", f"{chosen} INT8 calibration images, read then stacked",
                           2 * chosen * image),
                      Need(images_key, f"the order of the {train_count} training images they are drawn from (int64)",
                           INDEX_BYTES * train_count)]
    check_fits(exporting, "Export")
