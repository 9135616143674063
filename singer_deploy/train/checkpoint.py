"""What a checkpoint knows about the run it belongs to, so that a resume continues that run and no other.

A checkpoint stores the run's identity: a flat mapping of every setting that defines the run (teacher weights hash,
the pipeline's model and data specs, layers, SiNGER and training settings) and a fingerprint of it. On resume the
current identity is compared key by key:
- a key in RESUMABLE may change (e.g. a lower lr after a non-finite loss): the new value is applied and the change
  is appended to the run's config history, which the checkpoint, distill_config.json and the manifest keep;
- any other difference refuses to resume, naming the keys and the ways out (restart, or a new out_dir).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from singer_deploy.config import SingerConfig
from singer_deploy.errors import ConfigError, ModelError, TrainingError
from singer_deploy.hashing import module_sha256
from singer_deploy.models.weights import non_finite_counts

# Settings that may change between a stop and its resume without making it another run. lr / adapter_lr: the fix
# for a non-finite loss; the rest only change how the run is logged, saved or executed.
RESUMABLE = ("train.lr", "train.adapter_lr", "train.grad_clip", "train.log_every", "train.checkpoint_every",
             "train.device", "train.precision", "train.compile")
RESTART_HINT = ("start over in this directory (CLI --restart, API resume=False), or choose a new out_dir "
                "(CLI --out-dir)")


def run_identity(teacher: nn.Module, train: Any, singer: SingerConfig, layers: Mapping[str, list[int]],
                 data_size: int, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The flat, JSON-comparable settings that define a distillation run. `context` adds what only the caller
    knows (the pipeline's model and data specs); the teacher enters by the hash of its weights."""
    identity: dict[str, Any] = {"teacher.sha256": module_sha256(teacher), "data.size": data_size,
                                "layers.teacher": list(layers["teacher"]), "layers.student": list(layers["student"])}
    identity.update(_flatten(asdict(train), "train."))
    if train.method == "singer":  # FitNet never reads the SiNGER settings
        identity.update(_flatten(asdict(singer), "singer."))
    identity.update(_flatten(dict(context or {}), "run."))
    return identity


def fingerprint(identity: Mapping[str, Any]) -> str:
    """sha256 of the identity without the keys that may change on resume."""
    fixed = {k: v for k, v in identity.items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()


def resume_changes(state: Mapping[str, Any], identity: Mapping[str, Any], path: Path) -> dict[str, dict]:
    """{key: {"from", "to"}} of the resumable settings that changed; raises ConfigError when anything else did."""
    saved = state.get("identity")
    if saved is None:
        raise ConfigError(f"The checkpoint {path} does not record which run it belongs to",
                          expected="a checkpoint written by this version (it records a config fingerprint)",
                          found="a checkpoint without one (an older version wrote it)", fix=RESTART_HINT)
    differing = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    blocking = [k for k in differing if k not in RESUMABLE]
    if blocking:
        raise ConfigError(f"The checkpoint in {path.parent} belongs to a different run "
                          f"({len(blocking)} setting(s) changed: {', '.join(blocking)})",
                          expected="the checkpoint's " + "; ".join(f"{k} = {saved.get(k)!r}" for k in blocking[:6]),
                          found="; ".join(f"{k} = {identity.get(k)!r}" for k in blocking[:6]),
                          fix=f"resume with the checkpoint's settings (only {', '.join(RESUMABLE)} may change), "
                              f"or {RESTART_HINT}")
    return {k: {"from": saved.get(k), "to": identity.get(k)} for k in differing}


def apply_learning_rates(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         base_lrs: list[float]) -> None:
    """Give a resumed optimizer new base learning rates at the schedule's current position.

    Loading optimizer and scheduler state restores the checkpoint's lr; without this a resume after a non-finite
    loss would run the very lr that diverged.
    """
    scheduler.base_lrs = list(base_lrs)
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def check_finite_teacher(teacher: nn.Module) -> None:
    """A teacher holding NaN/Inf can only produce a non-finite loss: say so before training, blaming the weights."""
    found = non_finite_counts(teacher.state_dict())
    if found:
        raise ModelError("The teacher's weights hold non-finite values", expected="finite teacher weights",
                         found=found, fix="load an intact teacher checkpoint; no learning rate can fix this")


def nonfinite_loss_error(step: int, steps: int, terms: Mapping[str, torch.Tensor], lr: float,
                         checkpoint: Path, saved_step: int | None) -> TrainingError:
    """The non-finite-loss stop, saying truthfully whether a checkpoint exists and what a resume will do."""
    found = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()
                      if isinstance(v, torch.Tensor) and v.ndim == 0)
    targets = terms.get("_targets") or {}
    if any(not torch.isfinite(t).all() for t in targets.values()):
        cause = "the teacher's targets are non-finite (its output overflows or its inputs hold NaN/Inf)"
        fix = "check the input images and the teacher (fp32 instead of fp16/bf16 precision)"
    else:
        cause = "the student diverged"
        fix = f"lower train.lr (now {lr:g}) or use fp32 precision"
    if saved_step is None:
        kept = "no checkpoint was written yet (the first is due at train.checkpoint_every); a rerun starts at step 0"
    else:
        kept = (f"the last good checkpoint ({checkpoint}, step {saved_step}) is kept; rerunning with a lower lr "
                f"resumes from it with the new lr (recorded in the manifest's config_history)")
    return TrainingError(f"The loss became non-finite at step {step} of {steps}: {cause}", expected="finite loss "
                         "terms", found=found, fix=f"{fix}; {kept}")


def _flatten(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
