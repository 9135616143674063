"""Every configuration dataclass, validated once, at construction. Defaults are the published values.

    SingerConfig, TrainConfig       the method and the training loop
    PlantedConfig                   the planted-artifact teacher (tests, demo)
    ParityPolicy, PRECISION_GATES   export parity gates per precision
    PrecisionPolicy                 which ViT op roles may run in reduced precision
    TensorRTBuildConfig             TensorRT engine build settings
    RunConfig (ModelSpec, DataSpec, ExportSpec, ...)   one `distill_and_export` run; `from_mapping` builds any of
                                    these from YAML / dict data with errors that name the key

plus the format, precision and CPU-target name tables validation needs (export/formats.py and export/hardware.py
build their tables on them).
This module is the bottom layer: it imports nothing heavier than the standard library (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from singer_deploy.errors import ConfigError, SingerDeployError, shown_path

NULLSPACE_RULES = ("smallest", "official")
OUTLIER_TARGETS = ("quantile", "subspace")
ADAPTER_INITS = ("nullspace", "remove", "random", "zero", "subspace")
# SingerConfig.preset: the settings a preset fills in where the config leaves them unset (docs/method.md, "Defaults,
# and where we depart from the paper"). "faithful" (default) removes the artifacts and keeps everything else on every
# planted family; "published" is the paper's and the reference code's losses.
SINGER_PRESETS: dict[str, dict[str, object]] = {
    "faithful": {"outlier_target": "subspace", "info_tokens": "normal", "adapter_init": "subspace",
                 "detach_target": True, "info_variant": "paper", "last_block_info": True, "stream": "raw"},
    "published": {"outlier_target": "quantile", "info_tokens": "all", "adapter_init": "nullspace",
                  "detach_target": False, "info_variant": "reference", "last_block_info": False, "stream": "raw"},
}
INFO_VARIANTS = ("reference", "paper")
METHODS = ("singer", "fitnet")
TRAIN_LOGGERS = ("jsonl", "tensorboard")   # singer_deploy/train/loggers.py
INFO_TOKENS = ("all", "normal")
STREAMS = ("raw", "refined")


@dataclass(frozen=True)
class SingerConfig:
    """The SiNGER method: adapter initialisation, loss weights and loss variants.

    Source of the defaults: the authors' main config `configs/imagenet/vit/singer.yaml` (RANK 64, NULL_THRES 0.05,
    OUTLIER_Q 0.97, FEAT_WEIGHT 1.0) plus `engine/cfg.py` for OUTLIER_WEIGHT 0.01 and INFO_WEIGHT 1.0 (never
    overridden); see docs/method.md, "Defaults and their source".

    rank: adapter rank r per distilled layer (must not exceed the teacher width).
    tau: absolute singular-value threshold; k = #(sigma < tau) is logged per layer, and the "official" rule
        selects from below it.
    rule: nullspace basis selection, "smallest" (paper text: the r smallest singular directions) or "official"
        (reference code: the first r below tau, i.e. the LARGEST ones below tau, padded when fewer qualify).
        Default "smallest" on purpose: the two rules agree in spirit only when few singular values sit below tau;
        on small or randomly initialised teachers nearly all of them do, and "official" then picks the least-null
        directions. "smallest" is never less null than "official", and the paper's Table 4 shows nullspace
        initialisation itself has no measurable accuracy effect, so this choice cannot cost the published numbers.
    preset: "faithful" (default) or "published" (SINGER_PRESETS): fills outlier_target, info_tokens, adapter_init,
        detach_target, info_variant, last_block_info and stream where they are left unset (None); a value set explicitly
        wins. The published losses are `preset: published`.
    alpha: per-image quantile of refined patch-token norms above which L_out acts ("quantile" target).
    outlier_target: "quantile" (published: the tokens above the alpha-quantile of the refined norms are pulled to it)
        or "subspace" (faithful): the raw teacher's artifact tokens (see select_k) are pulled to the raw token
        with its component in the layer's artifact subspace set to the normal tokens' mean, everything else kept;
        the subspace is estimated before training from the first estimate_batches batches, from every block that
        writes the artifact (method/artifact_subspace.py).
    select_k: the artifact selection of "subspace" and info_tokens "normal", on the raw teacher. Unset (default):
        chosen from the data at each layer (method/selection.py): the tokens whose component in the layer's
        estimated artifact subspace stands out from the normal tokens', found at any strength; the threshold and
        what it picked are recorded per layer (distill_config.json, run summary, report). A number k overrides it
        with the fixed rule: tokens above k x the image median norm (4 is the cut HNR_4 reports); for a teacher whose
        artifacts the data-driven rule misses, checked with `singer-deploy scan` (docs/method.md, "Token selection").
    estimate_batches: training batches (the run's first ones) the "subspace" estimate reads.
    adapter_init: "nullspace" (published: starts at F + F N^T N), "remove" (F - F N^T N), "zero" (W_u = 0, starts
        at F), "random" (a random orthonormal basis instead of N, the reference code's ablation) or "subspace"
        (F - F S^T S with S the layer's estimated artifact subspace: the artifact's component gone at step 0; needs
        outlier_target "subspace").
    info_variant: last-layer L_info, "reference" (cosine Gram of refined last vs refined intermediate layer, as the
        reference code) or "paper" (refined last vs raw last). A single distilled layer always uses "paper".
    info_tokens: "all" (published) or "normal" (faithful): L_info leaves out the artifact tokens (select_k), whose raw
        value the next block's residual path would otherwise pull the refined tokens back to.
    last_block_info: (faithful: on) also hold the LAST distilled layer with the intermediate layers' term,
        MSE(Block_{l+1}(F_hat), Block_{l+1}(T)) on the kept tokens, added to the cosine-Gram term; at the teacher's
        last block, which no block reads, the kept tokens themselves, MSE(F_hat, T) (docs/method.md, "The last
        layer's L_info"). Deviation from the paper and the reference code (off in the published preset): the Gram
        term is invariant to any rotation and per-token rescaling of the features, so at the last layer nothing
        anchors F_hat to F while L_out pulls; on the planted teacher the last-layer normal-token cosine to the raw
        teacher fell to 0.86 with the Gram term alone and stayed 0.995 with this term (HNR still 0).
    detach_target: detach the refined target in L_kd (published: False, so adapters also learn from L_kd).
    stream: what a deeper distilled layer's adapter reads. "raw" (both presets, the reference code): the teacher's
        raw block output, so every layer is refined on its own. "refined" (opt-in): the teacher's blocks run on, from
        each distilled layer, on that layer's refined tokens (detached), the way a teacher with the adapters merged
        into its weights computes, and each adapter's gradient is clipped on its own. On a trained teacher whose other
        tokens read the artifact it brings the deeper layer to the clean twin (cosine 0.78 -> 0.99 on the planted
        content teacher), but the student distilled from it scored lower downstream: that teacher's deeper blocks
        use what the artifact carries, and its clean twin knows less (docs/method.md, "Refined stream").
    map_last_to_last: force the teacher's last distilled layer onto the student's last block. The reference
        Hungarian rule leaves the student's last block untrained for e.g. 12 -> 12 blocks ({8, 11} -> {7, 10});
        a deployed student is read at its last block, so we force it. For 24 -> 12 both rules give {8, 11}.
    seed: seeds the random padding rows of the "official" rule.
    """

    rank: int = 64
    tau: float = 0.05
    rule: str = "smallest"
    preset: str = "faithful"
    alpha: float = 0.97
    w_kd: float = 1.0
    w_out: float = 0.01
    w_info: float = 1.0
    outlier_target: str | None = None
    select_k: float | None = None
    estimate_batches: int = 8
    adapter_init: str | None = None
    info_variant: str | None = None
    info_tokens: str | None = None
    detach_target: bool | None = None
    last_block_info: bool | None = None
    stream: str | None = None
    map_last_to_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("preset", self.preset, tuple(SINGER_PRESETS))
        for key, value in SINGER_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError("SingerConfig.rank must be a positive integer", expected="an int >= 1 (published 64)",
                              found=repr(self.rank), fix="set rank=64, or lower for narrow teachers")
        _positive("tau", self.tau, "0.05")
        if not (_finite(self.alpha) and 0.0 < self.alpha < 1.0):
            raise ConfigError("SingerConfig.alpha must lie strictly between 0 and 1", expected="0 < alpha < 1",
                              found=repr(self.alpha), fix="use the published 0.97, or e.g. 0.90")
        for key in ("w_kd", "w_out", "w_info"):
            value = getattr(self, key)
            if not (_finite(value) and value >= 0.0):
                raise ConfigError(f"SingerConfig.{key} must be a finite number >= 0", expected="a weight >= 0",
                                  found=repr(value), fix="published weights are w_kd 1.0, w_out 0.01, w_info 1.0")
        if self.select_k is not None:
            _positive("select_k", self.select_k, "(unset: chosen from the data), or 4.0")
        _positive_int("SingerConfig", "estimate_batches", self.estimate_batches, "set estimate_batches=8")
        _choice("adapter_init", self.adapter_init, ADAPTER_INITS)
        _choice("rule", self.rule, NULLSPACE_RULES)
        _choice("outlier_target", self.outlier_target, OUTLIER_TARGETS)
        _choice("info_variant", self.info_variant, INFO_VARIANTS)
        _choice("info_tokens", self.info_tokens, INFO_TOKENS)
        _choice("stream", self.stream, STREAMS)
        if self.adapter_init == "subspace" and self.outlier_target != "subspace":
            raise ConfigError("adapter_init 'subspace' starts from the artifact subspace, which only outlier_target "
                              "'subspace' estimates", expected="outlier_target 'subspace' with adapter_init "
                              "'subspace'", found=f"outlier_target {self.outlier_target!r}",
                              fix="set adapter_init to 'nullspace' (published) or 'zero', or outlier_target to "
                                  "'subspace'")
        for key in ("last_block_info", "detach_target"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"SingerConfig.{key} must be True or False", expected="a bool",
                                  found=repr(getattr(self, key)), fix=f"pass {key}=True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("SingerConfig.seed must be an integer", expected="an int", found=repr(self.seed),
                              fix="pass e.g. seed=0")


@dataclass(frozen=True)
class TrainConfig:
    """Training-loop knobs. Defaults suit short CPU runs; the published SiNGER recipe is
    SGD lr 0.2, momentum 0.9, wd 1e-4, step schedule x0.1 at 30/60/90% of 100 epochs, batch 512 (an AdamW
    lr 1e-3 cosine recipe exists in the reference configs too)."""

    method: str = "singer"
    steps: int = 300
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    adapter_lr: float | None = None  # refinement adapters' lr; None = lr. They start at +1x the null component and
                                     # must travel to about -1x to cancel an artifact, so short runs need more.
    weight_decay: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 10
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)
    grad_clip: float | None = 1.0
    precision: str = "auto"          # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    device: str = "auto"             # where training runs (singer_deploy/devices.py: the device rule)
    workers: int | None = None       # DataLoader worker processes; None: 0 on CPU, up to 8 per GPU process
    loggers: tuple[str, ...] = ("jsonl",)   # + "tensorboard": the same scalars via torch's SummaryWriter

    def __post_init__(self):
        choices = {"method": METHODS, "optimizer": ("adamw", "sgd"), "schedule": ("cosine", "step", "constant"),
                   "precision": ("auto", "fp32", "bf16", "fp16"), "device": ("auto", "cpu", "cuda")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"TrainConfig.{key} has an unknown value", expected=" or ".join(allowed),
                                  found=repr(getattr(self, key)), fix=f"set {key}={allowed[0]!r}")
        unknown = [name for name in self.loggers if name not in TRAIN_LOGGERS]
        if unknown or "jsonl" not in self.loggers:
            raise ConfigError("TrainConfig.loggers has an unknown or missing entry",
                              expected=f"a list from {', '.join(TRAIN_LOGGERS)} that includes jsonl (resume and the "
                              "report read metrics.jsonl)", found=repr(list(self.loggers)),
                              fix="e.g. loggers: [jsonl, tensorboard]")
        for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{key} must be a positive integer", expected="an int >= 1",
                                  found=repr(value), fix=f"set {key} to a positive integer")
        numbers = {"lr": (self.lr, False, "e.g. lr=1e-3 for AdamW"),
                   "adapter_lr": (self.adapter_lr, True, "leave it unset to use lr"),
                   "grad_clip": (self.grad_clip, True, "e.g. grad_clip=1.0, or unset to disable clipping")}
        for key, (value, optional, fix) in numbers.items():
            if value is None and optional:
                continue
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"TrainConfig.{key} must be a positive number", expected=f"{key} > 0",
                                  found=repr(value), fix=fix)
        if not (self.weight_decay >= 0 and 0 <= self.momentum < 1):
            raise ConfigError("TrainConfig.weight_decay / momentum out of range",
                              expected="weight_decay >= 0 and 0 <= momentum < 1",
                              found=f"weight_decay={self.weight_decay!r}, momentum={self.momentum!r}",
                              fix="published SGD recipe: weight_decay=1e-4, momentum=0.9")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ConfigError("TrainConfig.workers must be an integer >= 0 or unset", expected="an int >= 0",
                              found=repr(self.workers), fix="e.g. workers=8, or leave it unset")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError("TrainConfig.warmup_steps must be an integer >= 0", expected="an int >= 0",
                              found=repr(self.warmup_steps), fix="e.g. warmup_steps=10")
        check_seed("TrainConfig.seed", self.seed)


def check_seed(name: str, seed: object) -> None:
    """A seed every generator takes: numpy refuses negative seeds, torch those of 2**63 and above."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ConfigError(f"{name} must be an integer in [0, 2**63)", expected="0 <= seed < 2**63",
                          found=repr(seed), fix="e.g. seed: 0")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(key: str, value: object, published: str) -> None:
    if not (_finite(value) and value > 0.0):
        raise ConfigError(f"SingerConfig.{key} must be a finite number > 0", expected="a positive number",
                          found=repr(value), fix=f"use the default {published}")


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"SingerConfig.{key} has an unknown value", expected=" or ".join(map(repr, allowed)),
                          found=repr(value), fix=f"set {key}={allowed[0]!r}")


def _positive_int(owner: str, key: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{key} must be a positive integer", expected="an int >= 1", found=repr(value),
                          fix=fix)


# ---------------------------------------------------------------------------------------------------------------
# The planted-artifact teacher

PLANTED = "planted"              # ModelSpec.name of the built-in planted-artifact teacher
PLANTED_TEXTURE_FILTERS = 6
PLANTED_TRIGGERS = ("content", "position")   # what fires the artifacts: exactly flat patches, or fixed positions
# Reserved channel pairs of the planted teacher: patch indicator, texture responses, energy, flatness; a teacher with a
# second, position-triggered mechanism (PlantedConfig.second_layer) reserves one more pair for its position flag.
PLANTED_CHANNEL_PAIRS = ("patch", *[f"texture{k}" for k in range(PLANTED_TEXTURE_FILTERS)], "energy", "flat")
PLANTED_POSITION_FLAG = "posflag"


@dataclass(frozen=True)
class PlantedTraining:
    """How a planted teacher learns the synthetic shapes task with its artifacts firing (docs/planted_teacher.md,
    "Trained teachers"); steps 0 = the untrained planted teacher."""

    steps: int = 0
    images: int = 8192           # distinct SyntheticShapes training images (seed `seed`), flipped at random
    batch_size: int = 32
    lr: float = 1e-3             # AdamW peak of a one-cycle schedule (3e-3 learns slower: docs/planted_teacher.md)
    weight_decay: float = 0.05
    flat_share: float = 0.08     # exactly flat patches of the training images (where content artifacts land)
    rescale_every: int = 50      # steps between re-scalings of the writers to rho while training
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError("PlantedTraining.steps must be a whole number >= 0", expected="0 (untrained) or more",
                              found=repr(self.steps), fix="e.g. steps: 3000")
        for key in ("images", "batch_size", "rescale_every"):
            _positive_int("PlantedTraining", key, getattr(self, key), fix=f"e.g. {key}: {getattr(type(self), key)}")
        for key in ("lr", "weight_decay"):
            if not (_finite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ConfigError(f"PlantedTraining.{key} must be a finite number >= 0", expected="e.g. 2e-3",
                                  found=repr(getattr(self, key)), fix=f"e.g. {key}: {getattr(type(self), key)}")
        if not (_finite(self.flat_share) and 0.0 < self.flat_share < 1.0):
            raise ConfigError("PlantedTraining.flat_share must be a share of the patches", expected="0 < share < 1",
                              found=repr(self.flat_share), fix="e.g. 0.08")
        check_seed("PlantedTraining.seed", self.seed)


@dataclass(frozen=True)
class PlantedConfig:
    """Shape of the planted teacher. The artifact share is set by the images (`SyntheticShapes.flat_share`)."""

    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: float = 4.0
    init_values: float | None = None  # LayerScale's initial gain (timm's init_values, as DINOv2); None: no LayerScale
    artifact_layer: int = 4
    rho: float = 10.0            # median artifact norm / median normal norm at the artifact layer
    null_dim: int = 8            # dimension of the subspace N the blocks after the artifact layer ignore
    u_in_null: bool = True       # False puts u outside N: then refinement inside N cannot remove the artifact
    value_null: bool = True      # attention values ignore u (as observed in OpenCLIP)
    sink_logit: float = 6.0      # attention logit boost artifact tokens get in later blocks
    trigger: str = "content"     # "content": artifacts on exactly flat patches; "position": on fixed positions
    position_share: float = 0.08  # trigger "position": share of the patch positions that carry an artifact
    # Families with more than one fixed write (docs/planted_teacher.md, "Families"); all off by default.
    grow_blocks: int = 1         # the main artifact is written over this many consecutive blocks from artifact_layer,
                                 # each along its own direction, 60 degrees from the previous block's
    second_layer: int | None = None   # a second mechanism: block that writes position-triggered artifacts (own
                                      # direction, position_share of the positions) next to the content-triggered ones
    second_rho: float = 8.0      # its median artifact norm / median normal norm at second_layer
    varying_dims: int = 0        # image-dependent part: the register neurons also write a vector that varies from
                                 # token to token within this many directions (a linear read of the token's content)
    varying_rho: float = 5.0     # its RMS norm / median normal norm at the artifact layer
    seed: int = 0
    training: PlantedTraining = field(default_factory=PlantedTraining)   # steps > 0: trained on the shapes task

    def __post_init__(self):
        # Sizes timm's VisionTransformer is built with: it would fail on them with an AssertionError or ValueError.
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "null_dim"):
            _positive_int("PlantedConfig", key, getattr(self, key), fix=f"e.g. {key}: {getattr(type(self), key)}")
        if self.img_size % self.patch_size or self.embed_dim % self.num_heads:
            raise ConfigError("PlantedConfig: img_size must be a multiple of patch_size, embed_dim of num_heads",
                              expected="img_size % patch_size == 0 and embed_dim % num_heads == 0",
                              found=f"img_size {self.img_size}, patch_size {self.patch_size}, embed_dim "
                                    f"{self.embed_dim}, num_heads {self.num_heads}",
                              fix="e.g. img_size 64, patch_size 8, embed_dim 96, num_heads 4")
        check_seed("PlantedConfig.seed", self.seed)
        for key in ("mlp_ratio", "rho", "second_rho", "varying_rho", "init_values"):
            if key == "init_values" and self.init_values is None:
                continue
            if not (_finite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(f"PlantedConfig.{key} must be a finite number > 0", expected="a positive number",
                                  found=repr(getattr(self, key)), fix=f"e.g. {key}: {getattr(type(self), key)}")
        if not 2 <= self.artifact_layer < self.depth - 1:
            raise ConfigError("artifact_layer must leave blocks before and after it",
                              expected=f"2 <= artifact_layer < {self.depth - 1}", found=str(self.artifact_layer),
                              fix="pick a middle block")
        if self.trigger not in PLANTED_TRIGGERS:
            raise ConfigError("Unknown planted artifact trigger", expected=" or ".join(map(repr, PLANTED_TRIGGERS)),
                              found=repr(self.trigger), fix="use trigger='content'")
        if not 0.0 < self.position_share < 1.0:
            raise ConfigError("position_share must be a share of the patch positions",
                              expected="0 < position_share < 1", found=repr(self.position_share),
                              fix="e.g. 0.08 (5 of 64 patches)")
        self._check_families()
        needed = 2 * (len(PLANTED_CHANNEL_PAIRS) + (self.second_layer is not None)) + self.null_dim + 8
        if self.embed_dim < needed:
            raise ConfigError("embed_dim is too small for the planted channels", expected=f">= {needed}",
                              found=str(self.embed_dim), fix="raise embed_dim")

    @property
    def extra_directions(self) -> int:
        """Planted directions besides u: the grown blocks', the second mechanism's and the varying part's."""
        return self.grow_blocks - 1 + (self.second_layer is not None) + self.varying_dims

    @property
    def writer_blocks(self) -> tuple[int, ...]:
        """Every block whose register neurons write an artifact, ascending."""
        grown = range(self.artifact_layer, self.artifact_layer + self.grow_blocks)
        return tuple(sorted({*grown, *(() if self.second_layer is None else (self.second_layer,))}))

    def _check_families(self) -> None:
        for key in ("grow_blocks", "varying_dims"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "grow_blocks" else 0):
                raise ConfigError(f"PlantedConfig.{key} must be a whole number", expected="grow_blocks >= 1, "
                                  "varying_dims >= 0", found=repr(value), fix="e.g. grow_blocks=3, varying_dims=3")
        if self.artifact_layer + self.grow_blocks > self.depth - 1:
            raise ConfigError("The grown artifact must end before the last block",
                              expected=f"artifact_layer + grow_blocks <= {self.depth - 1}",
                              found=f"{self.artifact_layer} + {self.grow_blocks}", fix="lower grow_blocks")
        if self.second_layer is not None:
            if self.trigger != "content" or not self.artifact_layer < self.second_layer < self.depth:
                raise ConfigError("The second (position-triggered) mechanism needs content-triggered main artifacts "
                                  "and a later block", expected=f"trigger 'content', artifact_layer < second_layer "
                                  f"< {self.depth}", found=f"trigger {self.trigger!r}, second_layer "
                                  f"{self.second_layer}", fix="e.g. trigger='content', second_layer=6")
        if self.extra_directions and not (self.u_in_null and self.extra_directions < self.null_dim):
            raise ConfigError("Extra planted directions live inside the ignored subspace N next to u",
                              expected=f"u_in_null and fewer than null_dim ({self.null_dim}) extra directions",
                              found=f"u_in_null {self.u_in_null}, {self.extra_directions} extra directions",
                              fix="raise null_dim or use fewer grown blocks / varying directions")


# Named planted-teacher shapes (teacher.planted: {preset: vit_l14, ...}; docs/planted_teacher.md, "Real size"):
# vit_l14 is DINOv2 ViT-L/14's shape (24 blocks, width 1024, 16 heads, LayerScale, 224 px, 256 patch tokens) with the
# artifact written mid-depth, at block 10.
PLANTED_PRESETS: dict[str, dict] = {
    "vit_l14": {"img_size": 224, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16,
                "init_values": 0.1, "artifact_layer": 10},
}


def planted_preset(name: str, **fields) -> PlantedConfig:
    """PlantedConfig of preset `name` (PLANTED_PRESETS) with `fields` on top, e.g. planted_preset("vit_l14",
    grow_blocks=3)."""
    return PlantedConfig(**{**planted_preset_fields(name), **fields})


def planted_preset_fields(name: object) -> dict:
    """The PlantedConfig fields preset `name` sets."""
    if name not in PLANTED_PRESETS:
        raise ConfigError("teacher.planted.preset: unknown planted teacher preset",
                          expected=" or ".join(map(repr, PLANTED_PRESETS)), found=repr(name),
                          fix="use preset: vit_l14, or leave preset out for the small teacher")
    return dict(PLANTED_PRESETS[name])


# ---------------------------------------------------------------------------------------------------------------
# Export names: precisions and formats

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
_PRECISION_ALIASES = {"float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "half": "fp16",
                      "bfloat16": "bf16", "i8": "int8"}

# Format -> the precisions its artifacts can carry (the reduced ones made by singer_deploy.calibration).
FORMAT_PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnx": ("fp32", "fp16", "int8"),
    "openvino": ("fp32", "fp16", "bf16", "int8"),   # bf16: the FP32 IR run at the bf16 inference precision hint
    "tensorrt": ("fp32", "fp16", "bf16", "int8"),
    "torch_tensorrt": ("fp32", "fp16", "bf16"),
}

# Formats whose runtime runs on a CPU-only machine: the ones precision "auto" chooses among, and the only ones several
# precisions are built for side by side.
CPU_FORMATS: frozenset[str] = frozenset({"onnx", "openvino"})

# export.precision "auto": the fastest passing precision the target CPU runs natively, per CPU format
# (calibration/auto_precision.py).
AUTO_PRECISION = "auto"

# Names people type for the same format; resolved before any fuzzy matching.
FORMAT_ALIASES: dict[str, str] = {
    "ort": "onnx", "onnxruntime": "onnx",
    "ov": "openvino", "openvino_ir": "openvino", "ir": "openvino",
    "trt": "tensorrt", "engine": "tensorrt", "plan": "tensorrt",
    "torch-tensorrt": "torch_tensorrt", "torchtrt": "torch_tensorrt", "ttrt": "torch_tensorrt",
    "torch_trt": "torch_tensorrt",
}


def normalize_precision(precision: str) -> str:
    """"FP16", "float16", "half" -> "fp16"; ConfigError for anything that is not one of PRECISIONS."""
    key = str(precision).strip().lower()
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}", expected=f"one of {', '.join(PRECISIONS)}",
                          found=repr(precision), fix="pass fp32, fp16, bf16 or int8")
    return key


def format_name(name: str) -> str:
    """The canonical format name for `name` (case-insensitive, aliases, near-miss typos with a warning)."""
    key = str(name).strip().lower().replace(" ", "_")
    key = FORMAT_ALIASES.get(key, key)
    if key in FORMAT_PRECISIONS:
        return key
    close = difflib.get_close_matches(key, sorted(FORMAT_PRECISIONS) + sorted(FORMAT_ALIASES), n=1, cutoff=0.75)
    if close:
        match = FORMAT_ALIASES.get(close[0], close[0])
        warnings.warn(f"export format {name!r} read as {match!r}", stacklevel=3)
        return match
    raise ConfigError(f"Unknown export format {name!r}", expected=f"one of {', '.join(FORMAT_PRECISIONS)} "
                      f"(aliases: {', '.join(sorted(FORMAT_ALIASES))})", found=repr(name),
                      fix="pass one of the listed format names")


def is_auto_precision(precision: str) -> bool:
    return str(precision).strip().lower() == AUTO_PRECISION


def calibrates(precision: str) -> bool:
    """Whether an export at `precision` reads INT8 calibration images: int8, or auto (which may build INT8)."""
    return is_auto_precision(precision) or normalize_precision(precision) == "int8"


def check_precision(fmt: str, precision: str) -> str:
    """Normalise `precision` and make sure format `fmt` (any accepted name) can carry it."""
    name, key = format_name(fmt), normalize_precision(precision)
    if key not in FORMAT_PRECISIONS[name]:
        raise ConfigError(f"Format {name} cannot carry precision {key}",
                          expected=f"one of {', '.join(FORMAT_PRECISIONS[name])}", found=key,
                          fix="choose a listed precision or another format")
    return key


# ---------------------------------------------------------------------------------------------------------------
# CPU deployment targets (export.target)

HOST_TARGET = "host"   # the machine running the export
# Named CPU classes an artifact can be built for, least to most capable, with the instruction-set features each has
# (export/hardware.py turns them into capabilities and explains the features).
CPU_TARGETS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),                                                  # Haswell .. Comet Lake, AMD Zen 1-3
    "avx_vnni": ("avx2", "vnni"),                                       # Alder Lake+ client cores (AVX-VNNI)
    "avx512": ("avx2", "avx512"),                                       # Skylake-SP/X without VNNI
    "avx512_vnni": ("avx2", "avx512", "vnni"),                          # Cascade Lake, Ice Lake
    "avx512_bf16": ("avx2", "avx512", "vnni", "bf16"),                  # Cooper Lake, AMD Zen 4 / Zen 5
    "amx": ("avx2", "avx512", "vnni", "amx", "bf16"),                   # Sapphire / Emerald Rapids
    "amx_fp16": ("avx2", "avx512", "vnni", "amx", "bf16", "fp16"),      # Granite Rapids
}
TARGET_NAMES: tuple[str, ...] = (HOST_TARGET, *CPU_TARGETS)


def target_name(target: str) -> str:
    """The canonical export.target name (case-insensitive); ConfigError for an unknown CPU class."""
    key = str(target).strip().lower()
    if key not in TARGET_NAMES:
        raise ConfigError(f"Unknown export target {target!r}", expected=f"one of {', '.join(TARGET_NAMES)}",
                          found=repr(target), fix="use 'host' to build for this machine, or name the deployment "
                          "CPU class (`singer-deploy doctor` names this machine's)")
    return key


# ---------------------------------------------------------------------------------------------------------------
# Parity gates


@dataclass(frozen=True)
class ParityPolicy:
    """Gates one precision must pass. `None` means measured and reported, not gated.

    Defaults (PRECISION_GATES) start from the field conventions (OpenVINO/Polygraphy FP32 1e-4, Torch-TensorRT
    cosine 0.99, docs/export.md "Parity gates") and were checked against noise measured here on tiny trained-like
    ViTs (depth 2, dim 48, 56-64 px, with and without registers, 32 synthetic-shape images, worst output):
      ORT / OpenVINO f32 vs eager:  max_abs_rel <= 1e-6, rel_err_p99 <= 8e-7, 1 - cosine <= 4e-13
      OpenVINO FP16-compressed IR:  max_abs_rel 4e-4, rel_err_p99 5e-4, 1 - cosine 1.3e-7, norm_rel_err 2e-4
      OpenVINO bf16 execution:      max_abs_rel 4e-3, rel_err_p99 5e-3, 1 - cosine 1.7e-5, kNN overlap >= 0.997
    so every gate sits one to several orders of magnitude above the noise of a correct artifact, and below what
    a 1% weight perturbation of one block produces (max_abs_rel 1e-2, 1 - cosine 6e-4). Deeper students
    accumulate more noise: see benchmarks/bench_export.py for vit_small at 224 px.
    """

    precision: str
    max_abs_rel: float | None        # max |ref - cand| / max |ref| (scale-relative max abs error)
    token_cos_min: float             # minimum cosine over all tokens of all images
    image_cos_min: float             # minimum cosine of whole-image outputs (flattened)
    rel_err_p99: float | None        # p99 over tokens of ||ref_t - cand_t|| / ||ref_t||
    knn_overlap_min: float | None    # mean kNN@k neighbour overlap of per-image features across the batch
    norm_corr_min: float | None      # Pearson correlation of the token-norm maps (only when the map is not flat)
    norm_rel_err_max: float | None   # max over tokens of |n_cand - n_ref| / n_ref
    knn_k: int = 10
    flat_norm_cv: float = 1e-3       # norm maps whose coefficient of variation is below this carry no structure

    def __post_init__(self):
        normalize_precision(self.precision)
        _positive_int("ParityPolicy", "knn_k", self.knn_k, "e.g. knn_k=10")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("precision", "knn_k") or (value is None and f.name not in ("token_cos_min",
                                                                                      "image_cos_min")):
                continue
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)):
                raise ConfigError(f"ParityPolicy.{f.name} must be a number", expected="a float (None: not gated)",
                                  found=repr(value), fix=f"set {f.name} to a threshold")

    @classmethod
    def for_precision(cls, precision: str, **overrides) -> "ParityPolicy":
        base = PRECISION_GATES[normalize_precision(precision)]
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown parity policy field(s) {', '.join(sorted(unknown))}",
                              expected=", ".join(f.name for f in dataclasses.fields(cls)),
                              found=", ".join(sorted(unknown)), fix="check the spelling of the override")
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ParityPolicy":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


PRECISION_GATES: dict[str, ParityPolicy] = {
    "fp32": ParityPolicy("fp32", max_abs_rel=1e-4, token_cos_min=0.99999, image_cos_min=0.99999,
                         rel_err_p99=1e-3, knn_overlap_min=0.95, norm_corr_min=0.9999, norm_rel_err_max=1e-3),
    "fp16": ParityPolicy("fp16", max_abs_rel=None, token_cos_min=0.999, image_cos_min=0.999,
                         rel_err_p99=5e-2, knn_overlap_min=0.9, norm_corr_min=0.99, norm_rel_err_max=5e-2),
    "bf16": ParityPolicy("bf16", max_abs_rel=None, token_cos_min=0.999, image_cos_min=0.999,
                         rel_err_p99=8e-2, knn_overlap_min=0.9, norm_corr_min=0.99, norm_rel_err_max=8e-2),
    "int8": ParityPolicy("int8", max_abs_rel=None, token_cos_min=0.99, image_cos_min=0.99,
                         rel_err_p99=0.2, knn_overlap_min=0.8, norm_corr_min=0.95, norm_rel_err_max=0.25),
}


# ---------------------------------------------------------------------------------------------------------------
# Reduced-precision policy

# The role of each op of a ViT graph (calibration/graph.py classifies the ops of a concrete graph).
VIT_OP_ROLES: tuple[str, ...] = ("linear", "attention", "patch_embedding", "output_projection", "layernorm",
                                 "softmax", "gelu", "other")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which ViT roles may run in reduced precision (INT8 / FP16) and which stay FP32.

    low_precision_roles: roles quantized to INT8 (and cast to FP16); every other role stays FP32 under INT8.
    high_precision_roles: roles kept FP32 in every format, FP16 included.
    keep_name_patterns: regexes over node names that also stay FP32 (for a layer found to be sensitive).
    calibration/policy.py compiles a policy into each backend's arguments.
    """

    low_precision_roles: tuple[str, ...] = ("linear", "attention")
    high_precision_roles: tuple[str, ...] = ("layernorm", "softmax", "gelu", "patch_embedding", "output_projection")
    keep_name_patterns: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        unknown = sorted(set(self.low_precision_roles + self.high_precision_roles) - set(VIT_OP_ROLES))
        overlap = sorted(set(self.low_precision_roles) & set(self.high_precision_roles))
        if unknown or overlap:
            raise ConfigError("Invalid precision policy", expected=f"roles from {VIT_OP_ROLES}, each either low or "
                              "high", found=f"unknown {unknown}" if unknown else f"in both lists: {overlap}",
                              fix="list each role once, spelled as in config.VIT_OP_ROLES")
        for pattern in self.keep_name_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError("Invalid node-name pattern in the precision policy", expected="a Python regex",
                                  found=f"{pattern!r}: {err}", fix="escape special characters (re.escape)") from err


# ---------------------------------------------------------------------------------------------------------------
# TensorRT


@dataclass(frozen=True)
class TensorRTBuildConfig:
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None
    optimization_level: int = 3
    allow_tf32: bool = False        # TF32 is on by default in TensorRT; off so FP32 engines meet the FP32 gate

    def __post_init__(self):
        for key in ("min_batch", "opt_batch", "max_batch", "workspace_bytes"):
            _positive_int("TensorRTBuildConfig", key, getattr(self, key), f"set {key} to a positive integer")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError("TensorRTBuildConfig batch range is out of order",
                              expected="min_batch <= opt_batch <= max_batch",
                              found=f"{self.min_batch}, {self.opt_batch}, {self.max_batch}",
                              fix="e.g. min_batch=1, opt_batch=8, max_batch=32")
        if isinstance(self.optimization_level, bool) or self.optimization_level not in range(6):
            raise ConfigError("TensorRTBuildConfig.optimization_level out of range", expected="an int 0..5",
                              found=repr(self.optimization_level), fix="use the default 3")


# ---------------------------------------------------------------------------------------------------------------
# One distill_and_export run

# Parity compares images against each other (kNN@10 wants 11); below 2 there is nothing to compare.
MIN_PARITY_IMAGES = 2


@dataclass(frozen=True)
class ModelSpec:
    """A timm model name (or "planted" for the built-in planted-artifact teacher), with optional local weights.

    timm's sources work too: `local-dir:/path` (config.json + weights) and `hf-hub:org/name`, resolved from the
    local Hugging Face cache only (singer_deploy/models/hub.py); they bring their own weights."""

    name: str = PLANTED
    weights: str | None = None
    pretrained: bool = False
    kwargs: dict = field(default_factory=dict)        # passed to timm.create_model (img_size, depth, ...)
    planted: dict = field(default_factory=dict)       # PlantedConfig fields when name == "planted"

    def planted_config(self) -> PlantedConfig:
        """The planted teacher's PlantedConfig (only the teacher may be the planted model), each value checked
        against its field's type as the rest of the config is (a float img_size, a text seed ...)."""
        fields = dict(self.planted)
        preset = planted_preset_fields(fields.pop("preset")) if "preset" in fields else {}
        return from_mapping(PlantedConfig, {**preset, **fields}, "teacher.planted.")


@dataclass(frozen=True)
class DataSpec:
    """"synthetic" (offline generator) or a folder / list file of images."""

    source: str = "synthetic"
    n: int = 512                   # synthetic training images
    eval_n: int = 64               # held-out images for parity, metrics and the report
    flat_share: float = 0.08       # synthetic: share of exactly flat patches (where planted artifacts land)
    seed: int = 0
    crop_pct: float | None = None  # folders: eval centre-crop fraction; None = 1.0 when the images already have the
                                   # model's input size, else the teacher's pretrained crop_pct
    augment: bool = True           # folders: timm's training transform (random resized crop + flip) for training
    labels: bool = False           # folders: one subfolder per class -> the run probes the held-out images (the
                                   # synthetic shapes always carry labels); docs/usage.md "Labelled folders"
    masks: str | None = None       # folders: <masks>/<class>/<stem>.png class ids per pixel, for the dense probe

    def __post_init__(self):
        if self.source != "synthetic" and not Path(self.source).expanduser().exists():
            raise ConfigError("data.source: the image source does not exist", expected="'synthetic' or a folder/list",
                              found=shown_path(self.source), fix="check the path")
        check_seed("data.seed", self.seed)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError("data.n must be a positive integer", expected="n >= 1 synthetic training images",
                              found=repr(self.n), fix="e.g. n: 512")
        if not (_finite(self.flat_share) and 0.0 <= self.flat_share <= 1.0):
            raise ConfigError("data.flat_share must be a share between 0 and 1", expected="0 <= flat_share <= 1",
                              found=repr(self.flat_share), fix="e.g. flat_share: 0.08 (8% of patches exactly flat)")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError("data.crop_pct must lie in (0, 1]", expected="0 < crop_pct <= 1",
                              found=repr(self.crop_pct),
                              fix="use 1.0 for images already at the model's size, or leave it unset")
        if self.masks is not None:
            if self.source == "synthetic":
                raise ConfigError("data.masks: the synthetic shapes bring their own masks",
                                  expected="masks only with an image folder", found=f"masks: {self.masks}",
                                  fix="remove data.masks, or point data.source at your labelled folder")
            if not self.labels:
                raise ConfigError("data.masks: masks go with class labels", expected="data.labels: true",
                                  found="labels: false", fix="set data.labels: true (one subfolder per class)")
            if not Path(self.masks).expanduser().is_dir():
                raise ConfigError("data.masks: the mask folder does not exist",
                                  expected="a folder <masks>/<class>/<stem>.png", found=shown_path(self.masks),
                                  fix="check the path")


@dataclass(frozen=True)
class ExportSpec:
    formats: tuple[str, ...] = ("onnx", "openvino")
    precision: str = "fp32"        # fp32, fp16, bf16, int8, or auto (fastest passing native one per format)
    calibration_size: int = 300    # INT8 calibration images, drawn from the training data (all if fewer)
    target: str = HOST_TARGET      # CPU the artifacts will run on: host, avx2, avx512_vnni, amx ... (CPU_TARGETS)
    benchmark: bool = True
    golden_size: int = 32          # images in the run's shared golden reference set (all artifacts point at it)
    polygraphy_goldens: bool = False   # also write the goldens in Polygraphy's formats (needs polygraphy)
    batch_sizes: tuple[int, ...] = (1,)   # deployment batch sizes: auto ships the fastest at the first, ranks the rest

    def __post_init__(self):
        target_name(self.target)
        check_batch_sizes(self.batch_sizes)
        auto = is_auto_precision(self.precision)
        precision = "int8" if auto else normalize_precision(self.precision)   # auto may build INT8
        for fmt in self.formats:
            if auto and format_name(fmt) not in CPU_FORMATS:
                raise ConfigError(f"export.precision: 'auto' chooses among CPU artifacts; {format_name(fmt)} runs "
                                  "on a GPU", expected="formats onnx / openvino with precision auto",
                                  found=format_name(fmt), fix=f"name the {format_name(fmt)} precision (fp16, "
                                  "int8 ...) or drop it from formats")
            if not auto:
                check_precision(fmt, precision)
        if self.golden_size < 1:
            raise ConfigError("export.golden_size must be at least 1", expected="an int >= 1 (default 32)",
                              found=str(self.golden_size), fix="e.g. golden_size: 32")
        if precision == "int8" and self.calibration_size < 1:
            raise ConfigError("export.precision: INT8 needs calibration data", expected="export.calibration_size >= 1",
                              found=str(self.calibration_size), fix="set calibration_size (e.g. 300)")


def check_batch_sizes(batch_sizes) -> tuple[int, ...]:
    """export.batch_sizes / --batch-sizes: a non-empty list of positive integers."""
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError("export.batch_sizes must list positive integers", expected="e.g. [1] or [1, 8, 32] (auto "
                          "ships the fastest at the first)", found=repr(list(batch_sizes or [])),
                          fix="batch_sizes: [1]")
    return tuple(batch_sizes)


def _check_weight_source(role: str, spec: ModelSpec) -> None:
    """The planted teacher is built in code (no weights to load); a timm model has at most one weights source."""
    if spec.name == PLANTED:
        ignored = [key for key in ("weights", "pretrained", "kwargs") if getattr(spec, key)]
        if ignored:
            raise ConfigError(f"{role}.{ignored[0]}: the planted teacher is built in code, not loaded",
                              expected="only teacher.planted settings for name: planted",
                              found=", ".join(f"{k} = {getattr(spec, k)!r}" for k in ignored),
                              fix="remove them, or name a timm ViT to load weights into")
    elif spec.planted:
        raise ConfigError(f"{role}.planted applies only to name: planted", expected="no planted section",
                          found=f"{role}.name = {spec.name!r}", fix=f"remove {role}.planted")
    if spec.weights is not None and spec.pretrained:
        raise ConfigError(f"{role}: both weights and pretrained are set", expected="one weights source",
                          found=f"weights = {spec.weights!r}, pretrained = true",
                          fix="keep weights (a local file) or pretrained (the local cache), not both")


@dataclass(frozen=True)
class RunConfig:
    teacher: ModelSpec = ModelSpec()
    student: ModelSpec = ModelSpec(name="vit_tiny_patch16_224")
    data: DataSpec = DataSpec()
    layers: tuple[int, ...] = ()
    singer: SingerConfig = SingerConfig()
    train: TrainConfig = TrainConfig()
    export: ExportSpec = ExportSpec()
    out_dir: str = "runs/singer"

    def __post_init__(self):
        if self.student.name == PLANTED:
            raise ConfigError("student.name: the planted model is a teacher only", expected="a timm ViT name",
                              found=PLANTED, fix="e.g. vit_tiny_patch16_224 with kwargs for size")
        for role in ("teacher", "student"):
            _check_weight_source(role, getattr(self, role))
        needed = MIN_PARITY_IMAGES if self.export.formats else 1
        if self.data.eval_n < needed:
            raise ConfigError("data.eval_n is too small", expected=f"eval_n >= {needed} held-out images"
                              + (" (the parity gates compare exported outputs across images)" if needed > 1 else ""),
                              found=repr(self.data.eval_n), fix="e.g. eval_n: 64")
        if self.teacher.name == PLANTED:
            depth = self.teacher.planted_config().depth
            for layer in self.layers:
                if not -depth <= layer < depth:
                    raise ConfigError("layers: index beyond the teacher's depth",
                                      expected=f"indices in [-{depth}, {depth - 1}]", found=str(layer),
                                      fix="pick an existing teacher block")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The key a section's one-word form means (`data: /images` is data.source, `teacher: vit_base...` teacher.name).
_SHORTHAND_KEYS: dict[type, str] = {DataSpec: "source", ModelSpec: "name"}


def from_mapping(cls: type, raw: Any, prefix: str = ""):
    """Build config dataclass `cls` from YAML / dict data; unknown keys and wrong types name the key, e.g.
    `train.stpes: unknown key (did you mean 'steps'?)`. Nested dataclass fields take mappings (or instances)."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        section = prefix.rstrip('.') or 'config'
        shorthand = _SHORTHAND_KEYS.get(cls)
        fix = f"write {section} as a mapping" if not (shorthand and isinstance(raw, str) and prefix) else \
            f"write the value under its key: {section}: {{{shorthand}: {raw}}} (or {section}.{shorthand}={raw} " \
            "on the command line)"
        raise ConfigError(f"{section}: expected a mapping", expected="key: value pairs", found=repr(raw), fix=fix)
    return _construct(cls, {key: _field_value(cls, key, value, prefix) for key, value in raw.items()}, prefix)


def with_changes(config, prefix: str = "", **changes):
    """`config` with some fields replaced, each converted and checked as from_mapping would (no dict round trip)."""
    values = {key: _field_value(type(config), key, value, prefix) for key, value in changes.items()}
    return _construct(lambda **v: dataclasses.replace(config, **v), values, prefix)


def _construct(make, values: dict, prefix: str):
    """make(**values); an error from a section's own validation gets the section's name in front, once."""
    try:
        return make(**values)
    except SingerDeployError as err:
        where = prefix.rstrip(".")
        if isinstance(err, ConfigError) and (not where or err.problem.startswith((f"{where}.", f"{where}:"))):
            raise
        raise ConfigError(f"{where or 'config'}: {err.problem}", expected=err.expected, found=err.found,
                          fix=err.fix) from err


def _field_value(cls: type, key: Any, value: Any, prefix: str):
    fields = [f.name for f in dataclasses.fields(cls)]   # declaration order: the same message in every process
    name = f"{prefix}{key}"
    if key not in fields:
        close = difflib.get_close_matches(str(key), fields, n=1)
        raise ConfigError(f"{name}: unknown key", expected=f"one of {', '.join(fields)}", found=str(key),
                          fix=f"did you mean '{close[0]}'?" if close else "remove it")
    return _convert(typing.get_type_hints(cls)[key], value, name)


def _convert(hint, value: Any, name: str):
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, f"{name}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _type_error(name, "a mapping", value)
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise _type_error(name, hint.__name__, value)
    if hint is float:
        if isinstance(value, str) and _is_number(value):
            # YAML 1.1 (PyYAML) reads 1e-3 as text: a float needs a dot ("1.0e-3") or the plain form ("0.001").
            raise ConfigError(f"{name}: YAML read {value!r} as text, not a number", expected="a number",
                              found=f"the string {value!r} (YAML needs a dot in the mantissa to read an exponent "
                                    "as a number)", fix=f"write {name.rsplit('.', 1)[-1]}: {_yaml_float(value)}")
        raise _type_error(name, "a number", value)
    if hint is Path:
        return Path(value)
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_float(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else repr(float(text))


def _type_error(name: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{name}: wrong type", expected=expected, found=f"{value!r} ({type(value).__name__})",
                       fix=f"set {name} to {expected}")
