"""A tiny timm ViT with planted high-norm artifacts and known ground truth (tests and the offline demo).

It imitates how real artifacts arise (docs/planted_teacher.md):
  patch embedding  -> zero-mean high-pass filters write texture responses into reserved channels;
  block 0 MLP      -> texture energy  E = sum |response|;
  block 1 MLP      -> flatness f = 1 on patches with no texture energy at all (0 elsewhere);
                      (trigger "position": f = 1 on fixed token positions instead, written by the position embedding,
                      like the input-independent, position-bound artifacts of DVT; the image content plays no part);
  block L_a MLP    -> two "register neurons" read f and write alpha * u, a fixed direction, onto flat patches;
  blocks > L_a     -> keys see u (attention sinks); values and the FFN input ignore the subspace N that holds u,
                      which is SiNGER's premise: the next block barely reads the artifact direction.
Families (docs/planted_teacher.md, "Families"), each off by default: `grow_blocks` writes the artifact over several
consecutive blocks along directions that turn from block to block; `second_layer` adds a second, position-triggered
mechanism in a later block along its own direction; `varying_dims` makes the register neurons also write a part that
varies from token to token within a few directions (register-like tokens carry image content). The clean twin has
every register neuron off; `clusters` names each mechanism's tokens and the blocks that write them.
Every reserved channel is written by exactly one module and read as a +/- channel PAIR: LayerNorm shifts all channels
by the token mean and scales them by the token std, so only the pair difference is zero exactly when the signal is.

It validates mechanics (taps, prefix handling, nullspace maths, losses, metrics), not real-world efficacy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from singer_deploy.memory import Need, check_fits
from singer_deploy.models.backbone import Backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.config import (PLANTED_CHANNEL_PAIRS, PLANTED_POSITION_FLAG, PLANTED_TEXTURE_FILTERS,
                                  PlantedConfig)


CALIBRATION_TOKENS = 2048


@dataclass(frozen=True)
class Writer:
    """Register neurons of one block: they read the `flag` channel pair and write `scale` x `direction` (a saturating
    pair, neurons `neurons`), plus, with `varying` rows, a part linear in the token's content along those rows."""

    cluster: str
    block: int
    flag: str
    direction: Tensor
    neurons: tuple[int, ...]
    scale: float = 1.0
    varying: Tensor | None = None       # (varying_dims, D) orthonormal write directions


@dataclass(frozen=True)
class Cluster:
    """One artifact mechanism: its tokens fire on `trigger`; blocks first..last write them."""

    name: str
    trigger: str
    first_block: int
    last_block: int


@dataclass
class PlantedTeacher:
    """The planted teacher, its clean twin and the ground truth."""

    backbone: Backbone
    clean: Backbone              # same weights, every register neuron off
    config: PlantedConfig
    u: Tensor                    # unit artifact direction of the first writer (D,)
    null_basis: Tensor           # (null_dim, D) orthonormal rows; contains every planted direction when u_in_null
    alpha: float                 # magnitude the first writer's register neurons write
    register_neurons: tuple[int, int]
    writers: tuple[Writer, ...] = ()

    @property
    def artifact_layer(self) -> int:
        return self.config.artifact_layer

    @property
    def clusters(self) -> tuple[Cluster, ...]:
        """The main cluster (content or position) and, with `second_layer`, the position cluster of the second
        mechanism."""
        main = [w.block for w in self.writers if w.cluster == "main"]
        out = [Cluster("main", self.config.trigger, min(main), max(main))]
        if self.config.second_layer is not None:
            out.append(Cluster("position", "position", self.config.second_layer, self.config.second_layer))
        return tuple(out)

    def cluster_masks(self, images: Tensor) -> dict[str, Tensor]:
        """Each cluster's ground-truth tokens (B, N) (they may overlap: a flat patch at a trigger position)."""
        return {c.name: _trigger_mask(self.config, images, c.trigger) for c in self.clusters}

    def artifact_mask(self, images: Tensor) -> Tensor:
        """Ground-truth artifact tokens (B, N), where any register neurons fire: the exactly flat patches, or the
        fixed trigger positions (trigger "position"), and the second mechanism's positions."""
        masks = list(self.cluster_masks(images).values())
        return torch.stack(masks).any(0)


def weight_needs(config: PlantedConfig) -> list[Need]:
    """A lower bound on the bytes of the planted ViT's float32 weights, known before it is built: the attention and
    MLP matrices of its blocks, and its position and patch embeddings (biases and norms left out)."""
    width, tokens = config.embed_dim, (config.img_size // config.patch_size) ** 2 + 1
    blocks = config.depth * round((4 + 2 * config.mlp_ratio) * width * width)
    return [Need("teacher.planted.embed_dim or depth", f"attention and MLP weights of {config.depth} blocks of width "
                 f"{width}", 4 * blocks),
            Need("teacher.planted.img_size", f"position and patch embeddings of {tokens} tokens",
                 4 * (tokens + 3 * config.patch_size ** 2) * width)]


def build_planted_teacher(config: PlantedConfig | None = None) -> PlantedTeacher:
    """Build the planted teacher deterministically from `config.seed` (about a second on a CPU)."""
    config = config or PlantedConfig()
    check_fits(weight_needs(config), "Building the planted teacher")
    torch.manual_seed(config.seed)
    model = VisionTransformer(img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
                              depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                              init_values=config.init_values, num_classes=0).eval()
    channels = _reserve_channels(config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    u, null_basis, spare = _artifact_geometry(config, channels, generator)
    writers = _plan_writers(config, u, spare)
    calibration = calibration_images(config)
    with torch.no_grad():
        _clear_reserved(model, channels, max(config.writer_blocks))
        _write_texture_filters(model, channels, config.patch_size, generator)
        _write_energy_neurons(model, channels)
        main = _trigger_mask(config, calibration)
        if config.trigger == "position":
            _write_position_flag(model, channels, "flat", main[0])
        else:
            _write_flatness_neuron(model, channels, calibration, main)
        if config.second_layer is not None:
            _write_position_flag(model, channels, PLANTED_POSITION_FLAG, trigger_positions(config))
        masks = _cluster_masks(config, calibration)
        inputs = _BlockInputs(model, calibration, config.artifact_layer)
        for writer in writers:
            _write_register_neurons(model, config, channels, inputs, masks[writer.cluster], writer)
        directions = torch.stack([w.direction for w in writers] + [v for w in writers if w.varying is not None
                                                                   for v in w.varying])
        _ignore_subspace_after(model, config, null_basis, directions)
        _add_attention_sinks(model, config, u, generator)
        writers = _calibrate_writers(model, config, inputs, masks, writers)
    return teacher_with_twin(model, config, u, null_basis, writers)


def teacher_with_twin(model: VisionTransformer, config: PlantedConfig, u: Tensor, null_basis: Tensor,
                      writers: list[Writer]) -> PlantedTeacher:
    """The PlantedTeacher of `model`, with its clean twin: a copy with every register neuron off."""
    clean = copy.deepcopy(model)
    with torch.no_grad():
        for writer in writers:
            clean.blocks[writer.block].mlp.fc2.weight[:, list(writer.neurons)] = 0.0
    first = writers[0]
    return PlantedTeacher(Backbone(model), Backbone(clean.eval()), config, u, null_basis, first.scale,
                          first.neurons[:2], tuple(writers))


def calibration_count(config: PlantedConfig) -> int:
    """How many synthetic images set the planted gains and scales: 2048 patch tokens (32 images of the small
    teacher's 64 patches, 8 at 224 px / patch 14), at least 4 images. A token budget rather than an image count keeps
    a real-size build to seconds of forward passes."""
    return max(4, CALIBRATION_TOKENS // (config.img_size // config.patch_size) ** 2)


def calibration_images(config: PlantedConfig) -> Tensor:
    """The fixed images the planted neurons and the writer scales are calibrated on."""
    return stack_images(SyntheticShapes(calibration_count(config), config.img_size, config.patch_size,
                                        flat_share=0.08, seed=10_000 + config.seed))


def recalibrate_writers(model: VisionTransformer, config: PlantedConfig, writers) -> list[Writer]:
    """Scale the writers of `model` (e.g. after training its other weights) back to rho, as when it was built."""
    images = calibration_images(config)
    with torch.no_grad():
        inputs = _BlockInputs(model, images, config.artifact_layer)
        return _calibrate_writers(model, config, inputs, _cluster_masks(config, images), list(writers))


def reserved_channels(config: PlantedConfig) -> list[int]:
    """Every reserved channel: only planted modules write them."""
    return _all_reserved(_reserve_channels(config))


def _reserve_channels(config: PlantedConfig) -> dict[str, tuple[int, int]]:
    names = PLANTED_CHANNEL_PAIRS + ((PLANTED_POSITION_FLAG,) if config.second_layer is not None else ())
    first = config.embed_dim - 2 * len(names)
    return {name: (first + 2 * i, first + 2 * i + 1) for i, name in enumerate(names)}


def _all_reserved(channels: dict[str, tuple[int, int]]) -> list[int]:
    return [c for pair in channels.values() for c in pair]


def _artifact_geometry(config: PlantedConfig, channels, generator) -> tuple[Tensor, Tensor, Tensor]:
    """A zero-mean unit direction u off the reserved channels, an orthonormal subspace N (with or without u), and the
    rest of N's basis orthogonal to u (rows), from which the families draw their other directions."""
    free = torch.ones(config.embed_dim, dtype=torch.bool)
    free[_all_reserved(channels)] = False
    raw = torch.randn(config.null_dim + 1, config.embed_dim, generator=generator) * free
    raw[:, free] -= raw[:, free].mean(1, keepdim=True)  # zero mean: LayerNorm's centring keeps the direction
    basis, _ = torch.linalg.qr(raw.T)
    u = basis[:, 0].contiguous()
    null = basis[:, :config.null_dim] if config.u_in_null else basis[:, 1:config.null_dim + 1]
    return u, null.T.contiguous(), basis[:, 1:config.null_dim].T.contiguous()


def _plan_writers(config: PlantedConfig, u: Tensor, spare: Tensor) -> list[Writer]:
    """Which block writes what: the main mechanism's blocks (each 60 degrees from the previous one's direction when
    grown), its varying part (first block), and the second mechanism. Directions come from N, so the blocks after
    the first writer ignore all of them (docs/planted_teacher.md, "Families")."""
    spare_rows = iter(spare)
    varying = torch.stack([next(spare_rows) for _ in range(config.varying_dims)]) if config.varying_dims else None
    writers, direction = [], u
    for step in range(config.grow_blocks):
        if step:
            direction = 0.5 * direction + 0.75 ** 0.5 * next(spare_rows)
        neurons = (0, 1) + tuple(range(2, 2 + 2 * config.varying_dims) if step == 0 else ())
        writers.append(Writer("main", config.artifact_layer + step, "flat", direction.clone(), neurons,
                              varying=varying if step == 0 else None))
    if config.second_layer is not None:
        used = {w.block: len(w.neurons) for w in writers}.get(config.second_layer, 0)
        writers.append(Writer("position", config.second_layer, PLANTED_POSITION_FLAG, next(spare_rows).clone(),
                              (used, used + 1)))
    return writers


def _clear_reserved(model: VisionTransformer, channels, artifact_layer: int) -> None:
    """Nothing but the planted neurons writes the reserved channels up to the artifact layer (their last reader).

    Later blocks stay untouched: zeroing their fc2 rows would add rank-deficient null directions to the next
    block's FFN surrogate and blur the one planted subspace N.
    """
    reserved = _all_reserved(channels)
    model.patch_embed.proj.weight[reserved] = 0.0
    model.patch_embed.proj.bias[reserved] = 0.0
    model.pos_embed[..., reserved] = 0.0
    model.cls_token[..., reserved] = 0.0
    for block in model.blocks[:artifact_layer + 1]:
        for writer in (block.attn.proj, block.mlp.fc2):
            writer.weight[reserved] = 0.0
            writer.bias[reserved] = 0.0


def _write_texture_filters(model: VisionTransformer, channels, patch: int, generator) -> None:
    """Zero-mean filters: every one gives exactly 0 on a flat patch.

    Two are structured (left/right, top/bottom); the rest are random per-channel filters, because any fixed symmetric
    set misses some textures (a ridge through the patch centre cancels in every half/quadrant difference), while a
    random zero-mean filter is zero only on a measure-zero set of non-flat patches.
    """
    half = patch // 2
    yy, xx = torch.meshgrid(torch.arange(patch), torch.arange(patch), indexing="ij")
    structured = [torch.where(xx < half, 1.0, -1.0), torch.where(yy < half, 1.0, -1.0)]
    filters = [kernel.expand(3, -1, -1) for kernel in structured]
    for _ in range(PLANTED_TEXTURE_FILTERS - len(structured)):
        kernel = torch.randn(3, patch, patch, generator=generator)
        filters.append(kernel - kernel.mean(dim=(1, 2), keepdim=True))  # zero mean per colour channel
    proj = model.patch_embed.proj
    for k, kernel in enumerate(filters):
        plus, minus = channels[f"texture{k}"]
        # Small: reserved channels must not dominate the token norms the metrics read.
        weight = kernel / kernel.abs().sum() * 16.0
        proj.weight[plus] = weight
        proj.weight[minus] = -weight
    plus, minus = channels["patch"]
    proj.bias[plus], proj.bias[minus] = 0.2, -0.2  # patches only: the CLS token has 0 here


def _pair_reader(dim: int, pair: tuple[int, int], gain: float) -> Tensor:
    row = torch.zeros(dim)
    row[pair[0]], row[pair[1]] = gain, -gain
    return row


def _write_neuron(mlp, neuron: int, reads: Tensor, bias: float, writes: Tensor) -> None:
    mlp.fc1.weight[neuron] = reads
    mlp.fc1.bias[neuron] = bias
    mlp.fc2.weight[:, neuron] = writes


def _write_energy_neurons(model: VisionTransformer, channels) -> None:
    mlp, dim = model.blocks[0].mlp, model.embed_dim
    energy = _pair_reader(dim, channels["energy"], 0.05)
    for k in range(PLANTED_TEXTURE_FILTERS):
        reads = _pair_reader(dim, channels[f"texture{k}"], 4.0)
        _write_neuron(mlp, 2 * k, reads, 0.0, energy)     # GELU(x) + GELU(-x) is 0 only at x = 0
        _write_neuron(mlp, 2 * k + 1, -reads, 0.0, energy)


class _BlockInputs:
    """Block inputs and outputs on the calibration images from block `start` on. The blocks before it are final
    once the flags are written, so they run once: a real-size build spends its time there (docs/planted_teacher.md,
    "Real size")."""

    def __init__(self, model: VisionTransformer, images: Tensor, start: int):
        self.backbone, self.start = Backbone(model), start
        self.stem = self.backbone.forward_taps(images, [start - 1])[start - 1]

    def before(self, block: int) -> Tensor:
        """The input of `block` (block >= start): (B, prefix + N, D)."""
        return self.backbone.run_blocks(self.stem, self.start, block)

    def patches_after(self, block: int) -> Tensor:
        """Block `block`'s output at the patch tokens: (B, N, D)."""
        return self.backbone.split(self.backbone.run_blocks(self.stem, self.start, block + 1))[1]


def _pair_difference(model: VisionTransformer, tokens: Tensor, block: int, pair: tuple[int, int]) -> Tensor:
    """LayerNorm-ed pair difference block `block`'s MLP sees, per patch token: (B, N); tokens: the block's input."""
    blk = model.blocks[block]
    tokens = tokens + blk.ls1(blk.attn(blk.norm1(tokens)))
    normed = blk.norm2(tokens)[:, model.num_prefix_tokens:]
    return normed[..., pair[0]] - normed[..., pair[1]]


def _flat_patches(images: Tensor, patch: int) -> Tensor:
    """(B, N) mask of patches whose pixels are identical in every channel."""
    b, c, h, w = images.shape
    cells = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(b, (h // patch) * (w // patch), c, patch * patch)
    return ((cells.amax(-1) - cells.amin(-1)) < 1e-5).all(-1)


def trigger_positions(config: PlantedConfig) -> Tensor:
    """The fixed patch positions of trigger "position" (seeded, at least one): (N,) bool."""
    n = (config.img_size // config.patch_size) ** 2
    count = max(1, round(config.position_share * n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 2))[:count]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask


def _trigger_mask(config: PlantedConfig, images: Tensor, trigger: str | None = None) -> Tensor:
    if (trigger or config.trigger) == "position":
        return trigger_positions(config).expand(images.shape[0], -1).clone()
    return _flat_patches(images, config.patch_size)


def _write_position_flag(model: VisionTransformer, channels, pair: str, positions: Tensor) -> None:
    """A flag channel pair set by the position embedding on the trigger positions (as the flatness neuron would
    write it), so register neurons reading it fire there whatever the image shows."""
    plus, minus = channels[pair]
    prefix = model.num_prefix_tokens if not getattr(model, "no_embed_class", False) else 0
    index = prefix + torch.nonzero(positions).flatten()
    model.pos_embed[0, index, plus] = 0.2
    model.pos_embed[0, index, minus] = -0.2


def _write_saturating_pair(mlp, neurons: tuple[int, int], reads: Tensor, bias: float, writes: Tensor) -> None:
    """h = GELU(z) - GELU(z - 1): ~0 for z << 0, ~1 for z >> 1 — a clean on/off switch."""
    _write_neuron(mlp, neurons[0], reads, bias, writes)
    _write_neuron(mlp, neurons[1], reads, bias - 1.0, -writes)


def _write_flatness_neuron(model: VisionTransformer, channels, images: Tensor, flat: Tensor) -> None:
    dim = model.embed_dim
    tokens = Backbone(model).forward_taps(images, [0])[0]
    is_patch = _pair_difference(model, tokens, 1, channels["patch"])
    energy = _pair_difference(model, tokens, 1, channels["energy"])
    gain_patch = 8.0 / is_patch[flat].min().item()
    # Smallest gain on energy that pushes every textured patch of the calibration set to z <= -4, with 2x margin.
    gain_energy = 2.0 * ((gain_patch * is_patch[~flat] + 4.0) / energy[~flat]).max().item()
    reads = _pair_reader(dim, channels["patch"], gain_patch) - _pair_reader(dim, channels["energy"], gain_energy)
    _write_saturating_pair(model.blocks[1].mlp, (0, 1), reads, 0.0, _pair_reader(dim, channels["flat"], 0.2))


def _write_register_neurons(model, config: PlantedConfig, channels, inputs: _BlockInputs, tokens: Tensor,
                            writer: Writer) -> None:
    """The saturating pair that writes the fixed part on `tokens` (the flagged ones); with `varying` rows, one gated
    pair per row whose difference is ~2 x (a random read of the token's LayerNorm-ed content) on flagged tokens and
    ~0 elsewhere."""
    flag = _pair_difference(model, inputs.before(writer.block), writer.block, channels[writer.flag])
    # A later writer sees its flag through LayerNorm after an earlier writer's artifact has grown the token ~rho-fold
    # (the scales are calibrated afterwards), so it reads the flag with that much more margin; the pair saturates.
    margin = 1.0 if writer.block == config.artifact_layer else 2.0 * max(config.rho, config.second_rho)
    gain = 12.0 * margin / flag[tokens].min().item()
    reads = _pair_reader(model.embed_dim, channels[writer.flag], gain)
    mlp = model.blocks[writer.block].mlp
    _write_saturating_pair(mlp, writer.neurons[:2], reads, -5.0, writer.direction.clone())
    if writer.varying is None:
        return
    generator = torch.Generator().manual_seed(writer.block)
    content = torch.randn(len(writer.varying), model.embed_dim, generator=generator)
    content[:, _all_reserved(channels)] = 0.0
    content /= content.norm(dim=1, keepdim=True)
    for k, (read, write) in enumerate(zip(content, writer.varying)):
        plus, minus = writer.neurons[2 + 2 * k], writer.neurons[3 + 2 * k]
        _write_neuron(mlp, plus, reads + read, -5.0, write.clone())
        _write_neuron(mlp, minus, reads - read, -5.0, -write.clone())


def _ignore_subspace_after(model: VisionTransformer, config: PlantedConfig, null_basis: Tensor,
                           directions: Tensor) -> None:
    projector = torch.eye(config.embed_dim) - null_basis.T @ null_basis
    written, _ = torch.linalg.qr(directions.T)
    value_projector = torch.eye(config.embed_dim) - written @ written.T
    dim = config.embed_dim
    for block in model.blocks[config.artifact_layer + 1:]:
        block.mlp.fc1.weight.copy_(block.mlp.fc1.weight @ projector)
        if config.value_null:
            block.attn.qkv.weight[2 * dim:] = block.attn.qkv.weight[2 * dim:] @ value_projector


def _add_attention_sinks(model: VisionTransformer, config: PlantedConfig, u: Tensor, generator) -> None:
    dim, heads = config.embed_dim, config.num_heads
    key_dir = torch.randn(dim, generator=generator)
    key_dir /= key_dir.norm()
    head_dim = dim // heads
    # An artifact token's LayerNorm output is ~sqrt(D) * u, so the logit boost is s_q * s_k * sqrt(D) / (H sqrt(d_h)).
    strength = (config.sink_logit * heads * head_dim ** 0.5 / dim ** 0.5) ** 0.5
    for block in model.blocks[config.artifact_layer + 1:]:
        block.attn.qkv.weight[dim:2 * dim] += strength * torch.outer(key_dir, u)
        block.attn.qkv.bias[:dim] += strength * key_dir


def _cluster_masks(config: PlantedConfig, images: Tensor) -> dict[str, Tensor]:
    masks = {"main": _trigger_mask(config, images)}
    if config.second_layer is not None:
        masks["position"] = _trigger_mask(config, images, "position")
    return masks


def _calibrate_writers(model, config: PlantedConfig, inputs: _BlockInputs, masks: dict[str, Tensor],
                       writers: list[Writer]) -> list[Writer]:
    """Scale the varying part so that its RMS norm on the main tokens is varying_rho x the normal median norm, then
    each mechanism's fixed part so that, at its last writer block, its tokens' median norm / the other tokens' median
    norm is rho (second_rho for the second mechanism), varying part included. Returns the writers with scales."""
    backbone = inputs.backbone
    normal = ~torch.stack(list(masks.values())).any(0)
    for writer in writers:
        _calibrate_varying(model, config, inputs, writer, masks["main"], normal)
    scaled = []
    for cluster, rho in (("main", config.rho), ("position", config.second_rho)):
        group = [w for w in writers if w.cluster == cluster]
        if not group:
            continue
        # Start from the scale the group's fc2 columns hold now (a re-calibration after training starts there).
        first, layer, alpha = group[0].block, group[-1].block, group[-1].scale
        # Only the group's writer blocks change below: the blocks before its first one run once.
        before = inputs.before(first)
        for _ in range(6):
            norms = backbone.split(backbone.run_blocks(before, first, layer + 1))[1].norm(dim=-1)
            step = rho / (norms[masks[cluster]].median() / norms[normal].median()).item()
            if abs(step - 1.0) < 1e-3:
                break
            alpha *= step
            for w in group:
                _set_fixed_scale(model, w, alpha)
        scaled += [replace(w, scale=alpha) for w in group]
    return scaled


def _set_fixed_scale(model, writer: Writer, alpha: float) -> None:
    fc2 = model.blocks[writer.block].mlp.fc2
    fc2.weight[:, writer.neurons[0]] = alpha * writer.direction
    fc2.weight[:, writer.neurons[1]] = -alpha * writer.direction


def _calibrate_varying(model, config: PlantedConfig, inputs: _BlockInputs, writer: Writer, tokens: Tensor,
                       normal: Tensor) -> None:
    """fc2 is linear in the varying columns, so one measurement of the varying write sets its scale exactly."""
    if writer.varying is None:
        return
    columns = list(writer.neurons[2:])
    fc2 = model.blocks[writer.block].mlp.fc2
    kept = fc2.weight[:, columns].clone()
    with_part = inputs.patches_after(writer.block)
    fc2.weight[:, columns] = 0.0
    without = inputs.patches_after(writer.block)
    part = (with_part - without)[tokens]
    rms = part.square().sum(-1).mean().sqrt().item()
    fc2.weight[:, columns] = kept * (config.varying_rho * without[normal].norm(dim=-1).median().item() / rms)
