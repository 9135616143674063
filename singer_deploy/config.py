"""Configuration dataclasses. Defaults are the published values; validation runs at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from singer_deploy.errors import ConfigError

NULLSPACE_RULES = ("smallest", "official")
OUTLIER_TARGETS = ("quantile", "median")
INFO_VARIANTS = ("reference", "paper")
METHODS = ("singer", "fitnet")
TRAIN_LOGGERS = ("jsonl", "tensorboard")   # singer_deploy/train/loggers.py


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
    alpha: per-image quantile of refined patch-token norms above which L_out acts ("quantile" target).
    outlier_target: "quantile" (published) or "median" (target = median_k x per-image median patch norm; robust
        when artifacts exceed 1 - alpha of the patches, where the quantile sits inside the artifact cluster).
    info_variant: last-layer L_info, "reference" (cosine Gram of refined last vs refined intermediate layer, as the
        reference code) or "paper" (refined last vs raw last). A single distilled layer always uses "paper".
    last_block_info: also hold the LAST distilled layer with the intermediate layers' term,
        MSE(Block_s(F_hat), Block_s(F)), where s is the block whose FFN initialised that layer's adapter (the next
        block, or the block itself for the teacher's last block, used as a surrogate reader). Added to the cosine-Gram
        term. Deviation from the paper and the reference code, hence off by default: the Gram term is invariant to
        any rotation and per-token rescaling of the features, so at the last layer nothing anchors F_hat to F while
        L_out pulls; on the planted teacher the last-layer normal-token cosine to the raw teacher fell to 0.86 with
        the Gram term alone and stayed 0.995 with this term (HNR still 0). The paper reports cosine only for an
        intermediate layer (0.957 at layer 17), where the next-block term already holds it.
    detach_target: detach the refined target in L_kd (published: False, so adapters also learn from L_kd).
    map_last_to_last: force the teacher's last distilled layer onto the student's last block. The reference
        Hungarian rule leaves the student's last block untrained for e.g. 12 -> 12 blocks ({8, 11} -> {7, 10});
        a deployed student is read at its last block, so we force it. For 24 -> 12 both rules give {8, 11}.
    seed: seeds the random padding rows of the "official" rule.
    """

    rank: int = 64
    tau: float = 0.05
    rule: str = "smallest"
    alpha: float = 0.97
    w_kd: float = 1.0
    w_out: float = 0.01
    w_info: float = 1.0
    outlier_target: str = "quantile"
    median_k: float = 2.0
    info_variant: str = "reference"
    detach_target: bool = False
    last_block_info: bool = False
    map_last_to_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
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
        _positive("median_k", self.median_k, "2.0")
        _choice("rule", self.rule, NULLSPACE_RULES)
        _choice("outlier_target", self.outlier_target, OUTLIER_TARGETS)
        _choice("info_variant", self.info_variant, INFO_VARIANTS)
        if not isinstance(self.last_block_info, bool):
            raise ConfigError("SingerConfig.last_block_info must be True or False", expected="a bool",
                              found=repr(self.last_block_info), fix="pass last_block_info=True or False")
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
