"""What a run checks before it touches any directory; `check-config` runs the same checks, so both say the same.

Two stages: `check_settings` looks at what the validated RunConfig needs from this machine (packages, local models),
`check_built` looks at the models and evaluation images once they exist (widths, sizes, enough held-out images).
Between them the pipeline builds the models (strict weights, models/weights.py) and opens the data sources.
"""

from __future__ import annotations

import importlib.util

from singer_deploy.config import MIN_PARITY_IMAGES, RunConfig
from singer_deploy.errors import ConfigError, DataError
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
