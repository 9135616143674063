"""Planted teachers that know the synthetic shapes task: trained with their artifacts firing, cached per recipe.

An untrained planted teacher is a random ViT, so every probe on it sits at chance. Here any planted family learns
the SyntheticShapes task (docs/planted_teacher.md, "Trained teachers"): the image class from the CLS token and the
per-patch class (background, or 1 + the shape's class on the shape) from the patch tokens, through linear heads that
are discarded afterwards. Every planted weight stays what the planted teacher built (see `PlantedFreeze`) and the
artifact neurons fire all along, as real ViTs learn with their artifacts. Training grows the normal tokens, so the
writers are re-scaled to their nominal strength (config.rho) every `rescale_every` steps and at the end, with
planted.py's own calibration.

Trained weights are cached under `planted_cache_dir()` by the sha256 of the whole PlantedConfig (its `training`
recipe included) and RECIPE_VERSION, so each teacher is trained once per machine.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from singer_deploy.config import PLANTED_TEXTURE_FILTERS, PlantedConfig
from singer_deploy.hashing import payload_sha256
from singer_deploy.io import atomic_save_safetensors
from singer_deploy.models.backbone import Backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.models.planted import (PlantedTeacher, Writer, build_planted_teacher, recalibrate_writers,
                                          reserved_channels, teacher_with_twin)

log = logging.getLogger(__name__)

# Bumped whenever training changes what a recipe produces, so older cached teachers are never read back.
RECIPE_VERSION = 1
CACHE_ENV = "SINGER_DEPLOY_PLANTED_CACHE"


def planted_cache_dir() -> Path:
    """Where trained planted teachers are cached: $SINGER_DEPLOY_PLANTED_CACHE, else
    ~/.cache/singer-deploy/planted-teachers."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "singer-deploy" / "planted-teachers"


def planted_teacher(config: PlantedConfig | None = None) -> PlantedTeacher:
    """The planted teacher `config` names: untrained when config.training.steps is 0, else trained (cached)."""
    config = config or PlantedConfig()
    return trained_planted_teacher(config) if config.training.steps else build_planted_teacher(config)


def recipe_key(config: PlantedConfig) -> str:
    """sha256 of everything that decides the trained weights: the PlantedConfig with its recipe, and the version."""
    return payload_sha256({"planted": asdict(config), "recipe_version": RECIPE_VERSION})


def trained_planted_teacher(config: PlantedConfig, cache_dir: str | Path | None = None) -> PlantedTeacher:
    """The planted teacher of `config`, trained by config.training (steps >= 1), from the cache when it holds it."""
    if not config.training.steps:
        raise ValueError("trained_planted_teacher needs config.training.steps >= 1 (0 is the untrained teacher)")
    key = recipe_key(config)
    path = Path(cache_dir or planted_cache_dir()) / f"planted-{key[:32]}.safetensors"
    planted = build_planted_teacher(config)
    cached = _read_cache(path, key)
    if cached is None:
        state, scales = train_planted(planted)
        atomic_save_safetensors(state, path, metadata={"recipe_key": key, "writer_scales": json.dumps(scales),
                                                       "config": json.dumps(asdict(config), sort_keys=True)})
    else:
        state, scales = cached
    model = planted.backbone.model
    model.load_state_dict(state)
    writers = [replace(w, scale=s) for w, s in zip(planted.writers, scales)]
    return teacher_with_twin(model.eval(), config, planted.u, planted.null_basis, writers)


def _read_cache(path: Path, key: str) -> tuple[dict[str, Tensor], list[float]] | None:
    """The cached weights and writer scales, or None when absent or unreadable (then the teacher is retrained)."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("recipe_key") != key:
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}, json.loads(metadata["writer_scales"])
    except (OSError, ValueError, KeyError, RuntimeError) as err:   # a truncated or foreign file: train again
        log.warning("Ignoring unreadable cached planted teacher %s (%s)", path, err)
        return None


class PlantedFreeze:
    """Keeps every planted weight what the planted teacher built, re-imposed after each optimiser step.

    Re-imposing (rather than masking gradients) because AdamW's decoupled weight decay moves entries whose gradient
    is zero, and its per-entry step sizes move a projected gradient out of the projected subspace; a copy after the
    step is exact whatever the optimiser does. Frozen:
      entries   the reserved channels' writers (patch-embedding rows, position / CLS embeddings, the attention and
                MLP output rows of every block up to the last writer, all zero but the planted ones), the texture
                energy and flatness neurons, every register neuron (fc1 rows and biases, fc2 columns), the LayerNorms
                of every block (a trained gain would rescale the flag reads and turn N out of the projections below)
                and the query biases of the blocks after the first writer (the sinks' query side);
      subspaces the blocks after the first writer keep ignoring N in their FFN input and (value_null) the planted
                directions in their values (W <- W P), and their keys keep the sinks' response to u (W_k u).
    """

    def __init__(self, planted: PlantedTeacher):
        self.model, config = planted.backbone.model, planted.config
        dim, first, last = config.embed_dim, config.artifact_layer, max(config.writer_blocks)
        reserved = reserved_channels(config)
        self.entries: list[tuple[nn.Parameter, Tensor]] = []
        self._add(self.model.patch_embed.proj.weight, rows=reserved)
        self._add(self.model.patch_embed.proj.bias, rows=reserved)
        for embedding in (self.model.pos_embed, self.model.cls_token):
            self._add(embedding, channels=reserved)
        for index, block in enumerate(self.model.blocks):
            for norm in (block.norm1, block.norm2):
                self._add(norm.weight)
                self._add(norm.bias)
            if index <= last:
                for layer in (block.attn.proj, block.mlp.fc2):
                    self._add(layer.weight, rows=reserved)
                    self._add(layer.bias, rows=reserved)
            if index > first:
                self._add(block.attn.qkv.bias, rows=list(range(dim)))
        neurons = {0: range(2 * PLANTED_TEXTURE_FILTERS)}
        if config.trigger == "content":
            neurons[1] = range(2)
        for writer in planted.writers:
            neurons[writer.block] = sorted({*neurons.get(writer.block, ()), *writer.neurons})
        for index, chosen in neurons.items():
            mlp = self.model.blocks[index].mlp
            self._add(mlp.fc1.weight, rows=list(chosen))
            self._add(mlp.fc1.bias, rows=list(chosen))
            self._add(mlp.fc2.weight, channels=list(chosen))
        self.ffn_projector = torch.eye(dim) - planted.null_basis.T @ planted.null_basis
        directions = torch.stack([w.direction for w in planted.writers] +
                                 [v for w in planted.writers if w.varying is not None for v in w.varying])
        written, _ = torch.linalg.qr(directions.T)
        self.value_projector = torch.eye(dim) - written @ written.T if config.value_null else None
        self.u, self.later = planted.u, self.model.blocks[first + 1:]
        self.scaled = self._scale_held(last)
        self.capture()

    def _scale_held(self, last: int) -> list[tuple[nn.Parameter, Tensor, float]]:
        """The free entries of every weight matrix that feeds the residual stream up to the last writer, with their
        initial norm: the planted gains read fixed-size signals through LayerNorm, so the normal tokens there must
        keep the scale they were calibrated at (docs/planted_teacher.md, "Trained teachers")."""
        frozen: dict[int, Tensor] = {}
        for param, mask in self.entries:
            frozen[id(param)] = frozen.get(id(param), torch.zeros_like(mask)) | mask
        weights = [self.model.patch_embed.proj.weight, self.model.pos_embed]
        for block in self.model.blocks[:last + 1]:
            weights += [block.attn.qkv.weight, block.attn.proj.weight, block.mlp.fc1.weight, block.mlp.fc2.weight]
        out = []
        for param in weights:
            free = ~frozen.get(id(param), torch.zeros_like(param, dtype=torch.bool))
            out.append((param, free, param.detach()[free].norm().item()))
        return out

    def _add(self, param: nn.Parameter, rows: list[int] | None = None, channels: list[int] | None = None) -> None:
        mask = torch.zeros_like(param, dtype=torch.bool)
        if rows is not None:
            mask[rows] = True
        elif channels is not None:
            mask[..., channels] = True
        else:
            mask[...] = True
        self.entries.append((param, mask))

    def capture(self) -> None:
        """Record the values to hold (again after the writers were re-scaled)."""
        self.values = [param.detach()[mask].clone() for param, mask in self.entries]
        dim = self.model.embed_dim
        self.key_reads_u = [block.attn.qkv.weight.detach()[dim:2 * dim] @ self.u for block in self.later]

    @torch.no_grad()
    def reimpose(self) -> None:
        """The projections first, then the entries, so that frozen entries come back bit-exact."""
        dim = self.model.embed_dim
        for block, key_u in zip(self.later, self.key_reads_u):
            block.mlp.fc1.weight.copy_(block.mlp.fc1.weight @ self.ffn_projector)
            qkv = block.attn.qkv.weight
            keys = qkv[dim:2 * dim]
            keys += torch.outer(key_u - keys @ self.u, self.u)
            if self.value_projector is not None:
                qkv[2 * dim:] = qkv[2 * dim:] @ self.value_projector
        for (param, mask), value in zip(self.entries, self.values):
            param[mask] = value
        for param, free, norm in self.scaled:
            param[free] *= norm / param[free].norm()


def shapes_targets(dataset: SyntheticShapes) -> tuple[Tensor, Tensor, Tensor]:
    """Images (M, 3, H, W), image classes (M,) and per-patch classes (M, N): 0 background, 1 + the image class where
    the shape covers most of the patch (the dense probe's "class" target, docs/method.md "Probes")."""
    items = [dataset[i] for i in range(len(dataset))]
    images = stack_images(items)
    labels = torch.tensor([item["label"] for item in items])
    masks = torch.stack([item["fg_mask"] for item in items]).float()
    p = dataset.patch_size
    covered = nn.functional.avg_pool2d(masks[:, None], p).flatten(1) > 0.5
    return images, labels, torch.where(covered, labels[:, None] + 1, 0)


def train_planted(planted: PlantedTeacher) -> tuple[dict[str, Tensor], list[float]]:
    """Train `planted` in place by its config.training recipe; returns its state dict and the writer scales.

    The shapes task of `fit_shapes_task`; the planted weights are re-imposed after every step (PlantedFreeze) and
    the writers re-scaled to rho every `rescale_every` steps and at the end.
    """
    config, recipe = planted.config, planted.config.training
    model = planted.backbone.model
    freeze = PlantedFreeze(planted)
    writers = list(planted.writers)

    def after_step(step: int) -> None:
        nonlocal writers
        freeze.reimpose()
        if (step + 1) % recipe.rescale_every == 0 or step + 1 == recipe.steps:
            writers = _rescaled(model, config, writers, freeze)

    data = SyntheticShapes(recipe.images, config.img_size, config.patch_size, flat_share=recipe.flat_share,
                           seed=recipe.seed)
    fit_shapes_task(planted.backbone, data, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                    weight_decay=recipe.weight_decay, seed=recipe.seed, after_step=after_step)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [w.scale for w in writers]


def fit_shapes_task(backbone: Backbone, data: SyntheticShapes, *, steps: int, batch_size: int, lr: float,
                    weight_decay: float, seed: int, after_step: Callable[[int], None] | None = None) -> None:
    """Train `backbone` in place on the SyntheticShapes task of `data`; the heads are discarded afterwards.

    Cross-entropy of a linear image head on the CLS token plus a linear per-patch head on the patch tokens (last
    block, each through its own LayerNorm); AdamW with a one-cycle schedule; random horizontal flips (they keep the
    patch grid, so flat patches stay flat). `after_step(step)` runs after every optimiser step (the planted teacher
    re-imposes its planted weights there). Also the "trained from scratch" floor of benchmarks/downstream.py.
    """
    model = backbone.model
    images, labels, patch_classes = shapes_targets(data)
    grid = data.img_size // data.patch_size
    torch.manual_seed(seed)
    dim = model.embed_dim
    image_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, data.num_classes))
    patch_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, data.num_classes + 1))
    params = [*model.parameters(), *image_head.parameters(), *patch_head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        x, y, dense = images[batch], labels[batch], patch_classes[batch].view(-1, grid, grid)
        flip = torch.rand(len(batch), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        dense = torch.where(flip[:, None, None], dense.flip(-1), dense).flatten(1)
        prefix, patches = backbone.split(backbone(x))
        loss = nn.functional.cross_entropy(image_head(prefix[:, 0]), y) + \
            nn.functional.cross_entropy(patch_head(patches).flatten(0, 1), dense.flatten())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        if step % 500 == 0 or step + 1 == steps:
            log.info("shapes task training: step %d/%d, loss %.3f", step + 1, steps, loss.item())
    model.eval()


def _rescaled(model, config: PlantedConfig, writers: list[Writer], freeze: PlantedFreeze) -> list[Writer]:
    model.eval()
    writers = recalibrate_writers(model, config, writers)
    freeze.capture()
    model.train()
    return writers
