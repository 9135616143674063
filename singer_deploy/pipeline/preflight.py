"""What a run checks before it touches any directory; `check-config` runs the same checks, so both say the same.

Two stages: `check_settings` reads the validated RunConfig alone (combinations a dataclass cannot see on its own),
`check_built` looks at the models and evaluation images once they exist (widths, sizes, enough held-out images).
Between them the pipeline builds the models (strict weights, models/weights.py) and opens the data sources.
"""

from __future__ import annotations

import math

from singer_deploy.errors import ConfigError, DataError
from singer_deploy.models.backbone import Backbone
from singer_deploy.pipeline.runconfig import PLANTED, RunConfig

# Parity compares images against each other (kNN@10 wants 11); below 2 there is nothing to compare.
MIN_PARITY_IMAGES = 2


def check_settings(config: RunConfig) -> None:
    """Value ranges and model-role rules of a config, before anything is built."""
    data = config.data
    if data.n < 1:
        raise ConfigError("data.n must be a positive integer", expected="n >= 1 synthetic training images",
                          found=repr(data.n), fix="e.g. n: 512")
    needed = MIN_PARITY_IMAGES if config.export.formats else 1
    if data.eval_n < needed:
        raise ConfigError("data.eval_n is too small", expected=f"eval_n >= {needed} held-out images"
                          + (" (the parity gates compare exported outputs across images)" if needed > 1 else ""),
                          found=repr(data.eval_n), fix="e.g. eval_n: 64")
    if not (math.isfinite(data.flat_share) and 0.0 <= data.flat_share <= 1.0):
        raise ConfigError("data.flat_share must be a share between 0 and 1", expected="0 <= flat_share <= 1",
                          found=repr(data.flat_share), fix="e.g. flat_share: 0.08 (8% of patches exactly flat)")
    if config.student.name == PLANTED:
        raise ConfigError("student.name: the planted model is a teacher only", expected="a timm ViT name",
                          found=PLANTED, fix="e.g. vit_tiny_patch16_224 with kwargs for size")
    teacher = config.teacher
    if teacher.name == PLANTED:
        ignored = [key for key in ("weights", "pretrained", "kwargs") if getattr(teacher, key)]
        if ignored:
            raise ConfigError(f"teacher.{ignored[0]}: the planted teacher is built in code, not loaded",
                              expected="only teacher.planted settings for name: planted",
                              found=", ".join(f"{k} = {getattr(teacher, k)!r}" for k in ignored),
                              fix="remove them, or name a timm ViT to load weights into")
    for role in ("teacher", "student"):
        spec = getattr(config, role)
        if spec.name != PLANTED and spec.planted:
            raise ConfigError(f"{role}.planted applies only to name: planted", expected="no planted section",
                              found=f"{role}.name = {spec.name!r}", fix=f"remove {role}.planted")
        if spec.weights is not None and spec.pretrained:
            raise ConfigError(f"{role}: both weights and pretrained are set", expected="one weights source",
                              found=f"weights = {spec.weights!r}, pretrained = true",
                              fix="keep weights (a local file) or pretrained (the local cache), not both")


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
