"""The distillation loop: SiNGER (refined teacher targets) or FitNet (raw targets) behind one flag.

Read top to bottom: build the step module, then `for step in range(start, steps)` do forward, backward, clip,
optimizer and scheduler step, log and checkpoint. Checkpoints are atomic and hold everything needed to resume
bit-for-bit (weights, optimizer, scheduler, RNG, step). Several processes: launch with `torchrun`; the step module
is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from singer_deploy.devices import autocast_for, compute_dtype, training_device
from singer_deploy.models.backbone import Backbone
from singer_deploy.models.data import SkippedImages
from singer_deploy.config import SingerConfig, TrainConfig
from singer_deploy.models.hub import save_timm_dir
from singer_deploy.train.loggers import open_loggers
from singer_deploy.train.progress import Progress
from singer_deploy.errors import ConfigError
from singer_deploy.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, atomic_write_text
from singer_deploy.method.alignment import Projectors, TokenAligner, TokenLayout, map_layers, resolve_teacher_layers
from singer_deploy.method.artifact_subspace import NO_CANDIDATES, ArtifactSubspace, estimate_artifact_subspaces
from singer_deploy.method.losses import SingerLoss, kd_loss
from singer_deploy.method.metrics import artifact_metrics
from singer_deploy.method.nullspace import surrogate_block
from singer_deploy.method.refine import Refiner
from singer_deploy.train.feed import StreamSampler, step_batches
from singer_deploy.train.checkpoint import (apply_learning_rates, check_finite_teacher, fingerprint,
                                            nonfinite_loss_error, resume_changes, run_identity)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"
STUDENT_DIR = "student"


@dataclass
class DistillResult:
    """What training produced. `student`, `projectors` and `refiner` live on `device` (the training device) in fp32
    weights; later stages move or copy them as they need (singer_deploy.devices)."""

    out_dir: Path
    teacher_layers: list[int]
    student_layers: list[int]
    student: Backbone
    projectors: Projectors
    refiner: Refiner | None
    steps: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)   # what distill_config.json records under "diagnostics"
    device: torch.device = torch.device("cpu")
    skipped_images: dict = field(default_factory=dict)   # SkippedImages.to_dict(): unreadable files met, all ranks
    config_history: list[dict] = field(default_factory=list)  # settings changed on resume (train/checkpoint.py)
    # The "subspace" target's estimate per distilled layer (None: nothing found); empty for FitNet and the quantile
    # target.
    subspaces: dict[int, ArtifactSubspace | None] = field(default_factory=dict)


class DistillStep(nn.Module):
    """One forward pass of distillation: returns the loss terms. Holds everything trained (DDP wraps this)."""

    def __init__(self, teacher: Backbone, student: Backbone, teacher_layers: Sequence[int],
                 student_layers: Sequence[int], singer: SingerConfig, method: str,
                 teacher_dtype: torch.dtype | None = None):
        """`teacher` is read, never moved or cast: the step holds a frozen copy truncated after the deepest block a
        loss runs (the last tap, or the block after it for SiNGER's L_info) in `teacher_dtype` weights (None: as
        given). The nullspace initialisation reads the caller's full-precision teacher."""
        super().__init__()
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)
        deepest = max(self.teacher_layers)
        if method == "singer":
            deepest = surrogate_block(deepest, teacher.depth)
        self.teacher = teacher.frozen_copy(deepest, dtype=teacher_dtype)
        self.student = student
        self.method = method
        aligner = TokenAligner(TokenLayout.of(student), TokenLayout.of(teacher))
        self.aligner = aligner
        self.projectors = Projectors(self.teacher_layers, student.embed_dim, teacher.embed_dim, aligner)
        self.refiner = (Refiner.from_teacher(teacher, self.teacher_layers, rank=singer.rank, rule=singer.rule,
                                             tau=singer.tau, seed=singer.seed, init=singer.adapter_init,
                                             stream=singer.stream)
                        if method == "singer" else None)
        self.singer_loss = (SingerLoss(singer, self.teacher_layers, self.teacher, aligner)
                            if method == "singer" else None)

    def clip_groups(self) -> list[list[Tensor]]:
        """The parameters whose gradient norm is clipped together: everything trained in one group, or, under stream
        "refined", the student with its projectors and each adapter apart. There one shared clip let the deeper
        adapter's large gradient scale down every other update: on a planted teacher outside the twelve test cases
        (grown at blocks 2-3 + image-dependent + position at 5) the layer-4 adapter stopped at cosine 0.948 to the
        clean twin, 0.955 with its own clip (docs/results.md, "Refined stream")."""
        student = [p for m in (self.student.model, self.projectors) for p in m.parameters() if p.requires_grad]
        if self.refiner is None:
            return [student]
        adapters = self.refiner.clip_groups()
        return [student, *adapters] if self.refiner.stream == "refined" else [student + adapters[0]]

    def trained_modules(self) -> dict[str, nn.Module]:
        modules = {"student": self.student.model, "projectors": self.projectors}
        if self.refiner is not None:
            modules["refiner"] = self.refiner
        return modules

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            taps = self.singer_loss.taps_needed() if self.singer_loss is not None else self.teacher_layers
            # The counterfactual target and L_info's next block reuse the raw forward's query, key and value projections
            # (models/block_rows.py).
            rerun = self.singer_loss.qkv_blocks() if self.singer_loss is not None else []
            # Under stream "refined" the taps after a distilled layer are computed from its refined tokens: each
            # adapter reads, and each target starts from, the stream the merged teacher computes (docs/method.md).
            edits = self.refiner.stream_edits() if self.refiner is not None else None
            with self.teacher.record_qkv(rerun) as qkv:
                raw = self.teacher.forward_taps(images, taps, edits)  # stops after the deepest needed block
        taps = self.student.forward_taps(images, self.student_layers)
        student = {t: self.projectors(t, taps[s]) for t, s in zip(self.teacher_layers, self.student_layers)}
        if self.refiner is None:
            kd = sum(kd_loss(student[t], self.aligner.teacher(raw[t])) for t in self.teacher_layers)
            kd = kd / len(self.teacher_layers)
            return {"total": kd, "kd": kd, "_targets": raw}
        refined = {t: self.refiner(t, raw[t]) for t in self.teacher_layers}
        terms = self.singer_loss(student, refined, raw, qkv)
        return {**terms, "_targets": refined}


def distill(teacher: Backbone, student: Backbone, data: Dataset, out_dir: str | Path, *,
            layers: Sequence[int] = (), singer: SingerConfig | None = None, train: TrainConfig | None = None,
            resume: bool = True, progress: bool = True, context: Mapping[str, Any] | None = None) -> DistillResult:
    """Distil `student` from `teacher` on `data` (items are dicts with an "image" tensor); write files to out_dir.

    layers: the user's teacher layers; the teacher's last block is always added (docs/method.md). A killed run
    resumes from `out_dir/checkpoint.pt` when resume is True. Training runs on `train.device`; the student is moved
    there and handed back there (DistillResult.device); the teacher is only read (singer_deploy.devices).
    A resume happens only if the checkpoint belongs to the same run (train/checkpoint.py; `context` adds the
    caller's model and data specs to what defines the run).

    About 60 lines on purpose: setup, then the step loop (batch, step, finite check, log, checkpoint), read top to
    bottom in one place like a plain training script.
    """
    singer, train = singer or SingerConfig(), train or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _init_distributed()
    device = training_device(train.device)
    torch.manual_seed(train.seed)

    teacher_layers = resolve_teacher_layers(layers, teacher.depth)
    student_layers = map_layers(teacher_layers, teacher.depth, student.depth, force_last=singer.map_last_to_last)
    teacher.requires_grad_(False).eval()
    check_finite_teacher(teacher.model)
    _freeze_unreached(student, max(student_layers))
    module = DistillStep(teacher, student, teacher_layers, student_layers, singer, train.method,
                         teacher_dtype=compute_dtype(train.precision, device)).to(device)
    module.student.train()
    optimizer = make_optimizer(train, _param_groups(train, module), device)
    clip_groups = module.clip_groups()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train))
    run = {"identity": run_identity(teacher.model, train, singer, {"teacher": teacher_layers,
                                                                   "student": student_layers}, len(data), context)}
    start = _maybe_resume(out_dir / CHECKPOINT, module, optimizer, scheduler, train, run, resume)
    if rank == 0:
        _trim_jsonl(out_dir / METRICS_LOG, start)  # from 0 too: a restarted run must not keep the old records
    # Every logger flushes each record, so a run that stops early leaves complete logs up to its last record.
    loggers = open_loggers(train.loggers, out_dir, out_dir / METRICS_LOG, resumed_at=start) if rank == 0 else []

    runner: nn.Module = module
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(module, find_unused_parameters=False)
    if train.compile:
        runner = torch.compile(runner)
    autocast = autocast_for(train.precision, device)
    if module.singer_loss is not None and singer.outlier_target == "subspace":
        module.singer_loss.subspaces = _artifact_subspaces(module, data, train, singer, device)
        if start == 0 and singer.adapter_init == "subspace":    # a resumed run has its factors already
            module.refiner.start_at_subspaces({layer: None if found is None else found.basis
                                               for layer, found in module.singer_loss.subspaces.items()})
    sampler = StreamSampler(len(data), train.batch_size, train.seed, rank, world)
    batches = step_batches(data, sampler, start, train.steps, device, train.workers)
    skipped, watch = SkippedImages(len(data)), NonFiniteWatch(device, train.steps)
    shown = Progress(start, train.steps, f"distil[{train.method}]", enabled=progress and rank == 0)
    began, seen = time.perf_counter(), 0
    for step, batch in zip(range(start, train.steps), batches):
        images = batch["image"].to(device, non_blocking=True)
        skipped.add(batch)
        terms = train_step(runner, images, optimizer, scheduler, clip_groups, train.grad_clip, autocast)
        watch.update(terms["total"], step)   # no host sync: read below, at log and checkpoint steps only
        seen += images.shape[0] * world
        done = step + 1
        log_due = done % train.log_every == 0 or done == train.steps
        checkpoint_due = done % train.checkpoint_every == 0 or done == train.steps
        if log_due or checkpoint_due:        # every rank, same steps: a bad loss on one rank stops them all
            watch.raise_if_bad(terms, train, out_dir)
            skipped.check()
        if rank == 0 and log_due:
            record = _log_record(done, terms, scheduler, seen / (time.perf_counter() - began), module)
            for logger in loggers:
                logger.log(record)
            shown.logged(record)
        shown.advance()
        if rank == 0 and checkpoint_due:
            _save_checkpoint(out_dir / CHECKPOINT, module, optimizer, scheduler, done, run)
    seconds = time.perf_counter() - began
    shown.close()
    for logger in loggers:
        logger.close()
    diagnostics = _diagnostics(module)
    files = _save_outputs(out_dir, module, singer, train, diagnostics, run["history"]) if rank == 0 else {}
    if world > 1:
        dist.barrier()
    return DistillResult(out_dir, teacher_layers, student_layers, module.student, module.projectors,
                         module.refiner, train.steps, seconds, files, diagnostics, device, _all_ranks(skipped, world),
                         config_history=run["history"],
                         subspaces=dict(module.singer_loss.subspaces) if module.singer_loss is not None else {})


def train_step(runner: nn.Module, images: Tensor, optimizer: torch.optim.Optimizer, scheduler,
               clip_groups: Sequence[Sequence[Tensor]], grad_clip: float | None, autocast) -> dict[str, Tensor]:
    """One optimisation step (forward under autocast, backward, clip each of `clip_groups` (DistillStep.clip_groups)
    to `grad_clip`, optimizer and scheduler step); returns the loss terms as device tensors. No host sync: nothing here reads a value back. benchmarks/bench_distill.py times
    this very function."""
    with autocast:
        terms = runner(images)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    if grad_clip:
        for group in clip_groups:
            torch.nn.utils.clip_grad_norm_(group, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return terms


class NonFiniteWatch:
    """The first step whose loss was not finite, kept on the device: watching costs no host sync per step.

    `raise_if_bad` reads it (one sync) at log and checkpoint steps, after a MIN all-reduce over ranks under torchrun,
    so every rank raises at the same step instead of the healthy ones waiting forever in the next all-reduce. No
    checkpoint is written after a bad step, so the last checkpoint holds finite weights.
    """

    def __init__(self, device: torch.device, steps: int):
        self.never = steps + 1
        self.first = torch.full((), self.never, dtype=torch.int64, device=device)

    def update(self, loss: Tensor, step: int) -> None:
        self.first = torch.where(torch.isfinite(loss.detach()), self.first, self.first.clamp(max=step + 1))

    def raise_if_bad(self, terms: dict, train: TrainConfig, out_dir: Path) -> None:
        first = self.first.clone()
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first.item())
        if first == self.never:
            return
        checkpoint = out_dir / CHECKPOINT
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"] if checkpoint.is_file() else None
        raise nonfinite_loss_error(first, train.steps, terms, train.lr, checkpoint, saved)


def _all_ranks(skipped: SkippedImages, world: int) -> dict:
    """Unreadable files met by every rank (each rank reads its own share of the batches)."""
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, skipped.files)
        for files in gathered:
            skipped.files.update(files)
    return skipped.to_dict()


def _freeze_unreached(student: Backbone, deepest: int) -> None:
    """Freeze the student parts no loss reaches: blocks after the deepest tapped one, and the final norm / head.

    They would get no gradient, and DistributedDataParallel (find_unused_parameters=False) fails on a trained
    parameter without one. Single-process numerics are unchanged (AdamW skips parameters without a gradient).
    """
    unreached = [f"blocks.{i}." for i in range(deepest + 1, student.depth)] + ["norm.", "fc_norm.", "head.",
                                                                               "attn_pool."]
    for name, parameter in student.model.named_parameters():
        if name.startswith(tuple(unreached)):
            parameter.requires_grad_(False)


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _param_groups(train: TrainConfig, module: DistillStep) -> list[dict]:
    """Everything trained: student + projectors, and the adapters at their own learning rate."""
    groups = [{"params": [p for m in (module.student.model, module.projectors) for p in m.parameters()
                          if p.requires_grad]}]
    if module.refiner is not None:
        groups.append({"params": module.refiner.trainable_parameters(), "lr": train.adapter_lr or train.lr})
    return groups


def make_optimizer(train: TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW over the parameter groups; on CUDA the fused kernels (one launch for all parameters)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                               **fused)
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, **fused)


def lr_factor(train: TrainConfig):
    """The learning-rate multiplier per step (warm-up, then the schedule) for torch's LambdaLR."""
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        if train.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if train.schedule == "step":
            return 0.1 ** sum(step >= m * train.steps for m in train.milestones)
        return 1.0
    return factor


def _log_record(step: int, terms: dict, scheduler, images_per_second: float, module: DistillStep) -> dict:
    record = {"step": step, "loss": terms["total"].item(), "lr": scheduler.get_last_lr()[0],
              "img_s": images_per_second}
    for key, value in terms.items():
        if key not in ("total", "_targets") and isinstance(value, Tensor) and value.ndim == 0:
            record[key.replace("@", "_")] = value.item()
    with torch.no_grad():
        for layer, target in terms["_targets"].items():
            metrics = artifact_metrics(target[:, module.teacher.num_prefix_tokens:].detach().float())
            record.update({f"target_{name}_{layer}": value for name, value in metrics.items()})
    return record


def _trim_jsonl(path: Path, last_step: int) -> None:
    """Drop records a killed run logged after its last checkpoint: the resumed run logs those steps again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _save_checkpoint(path: Path, module: DistillStep, optimizer, scheduler, step: int, run: dict) -> None:
    state = {
        "step": step,
        "modules": {name: m.state_dict() for name, m in module.trained_modules().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "identity": run["identity"],
        "fingerprint": fingerprint(run["identity"]),
        "history": run["history"],
    }
    atomic_torch_save(state, path)


def _maybe_resume(path: Path, module: DistillStep, optimizer, scheduler, train: TrainConfig, run: dict,
                  resume: bool) -> int:
    """Load the checkpoint of this same run (else start at 0); sets run["history"], the config changes so far."""
    run["history"] = []
    if not (resume and path.is_file()):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    changes = resume_changes(state, run["identity"], path)
    for name, m in module.trained_modules().items():
        try:
            m.load_state_dict(state["modules"][name])
        except RuntimeError as err:
            raise ConfigError(f"The checkpoint in {path.parent} holds {name} weights of another shape",
                              expected=f"a {name} like the one passed in", found=str(err).splitlines()[-1][:300],
                              fix="use the same student architecture, a new output directory, or restart (CLI "
                                  "--restart, API resume=False)"
                              ) from err
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    run["history"] = list(state.get("history", []))
    if changes:
        if {"train.lr", "train.adapter_lr"} & set(changes):
            apply_learning_rates(optimizer, scheduler, [train.lr, train.adapter_lr or train.lr][:len(
                optimizer.param_groups)])
        run["history"].append({"step": int(state["step"]), "changed": changes})
        log.warning("Resuming %s at step %d with changed settings: %s", path.parent, state["step"], ", ".join(
            f"{k} {v['from']!r} -> {v['to']!r}" for k, v in changes.items()))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    log.info("Resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def _save_outputs(out_dir: Path, module: DistillStep, singer: SingerConfig, train: TrainConfig,
                  diagnostics: dict, history: list[dict]) -> dict[str, Path]:
    files = {"projectors": out_dir / "projectors.safetensors", "distill_config": out_dir / "distill_config.json"}
    # timm's hub format: timm.create_model("local-dir:<out_dir>/student") rebuilds the distilled student.
    files["student"] = save_timm_dir(module.student.model, out_dir / STUDENT_DIR)
    atomic_save_safetensors(module.projectors.state_dict(), files["projectors"])
    if module.refiner is not None:
        files["refiner"] = module.refiner.save(out_dir / "refiner.safetensors")
    atomic_write_json(files["distill_config"], {
        "teacher_layers": module.teacher_layers, "student_layers": module.student_layers,
        "singer": asdict(singer), "train": asdict(train), "diagnostics": diagnostics,
        "config_history": history})
    return files


def _artifact_subspaces(module: DistillStep, data: Dataset, train: TrainConfig, singer: SingerConfig,
                        device: torch.device) -> dict:
    """The "subspace" target's estimate from the run's first `estimate_batches` GLOBAL batches (a one-process
    sampler: every rank reads the same images and gets the same subspaces, and a resumed run the same ones again);
    at most `rank` directions, all a rank-r adapter can take out."""
    count = min(singer.estimate_batches, train.steps)
    sampler = StreamSampler(len(data), train.batch_size, train.seed)
    batches = (batch["image"].to(device) for batch in step_batches(data, sampler, 0, count, device, train.workers))
    with autocast_for(train.precision, device):   # the frozen teacher may hold bf16/fp16 weights
        subspaces = estimate_artifact_subspaces(module.teacher, batches, module.teacher_layers, singer.select_k,
                                                max_rank=singer.rank)
    for layer, found in subspaces.items():
        log.info("artifact subspace of layer %d: %s", layer, found.describe() if found else
                 f"{NO_CANDIDATES} in the estimation batches; L_out is zero at this layer")
    return subspaces


def _diagnostics(module: DistillStep) -> dict:
    """What the run decided on its own, kept next to the weights: the nullspace selection per layer (k = number of
    singular values below tau, the rule, padding), the quantile-trap check of L_out and, with the "subspace"
    target, each layer's artifact-subspace estimate (ArtifactSubspace.summary: rank, writer blocks, explained
    share, token counts)."""
    if module.refiner is None:
        return {}
    nullspace = {str(layer): {"rule": b.rule, "tau": b.tau, "k_below_tau": b.k, "rank": b.rank,
                              "num_padded": b.num_padded, "sigma_max_selected": float(b.sigmas.max())}
                 for layer, b in module.refiner.init_report.items()}
    traps = {str(layer): {"high_norm_share": c.share, "limit": c.limit, "fired": c.fired}
             for layer, c in module.singer_loss.trap_checks.items()}
    subspaces = {str(layer): None if d is None else d.summary() for layer, d in module.singer_loss.subspaces.items()}
    return {"nullspace": nullspace, "quantile_trap": traps,
            **({"artifact_subspace": subspaces} if subspaces else {})}
