"""Backbone taps: raw residual-stream block outputs of any timm Vision Transformer.

SiNGER distils the block outputs BEFORE the final norm (timm `forward_intermediates(norm=False)`), and the teacher only
has to run up to the deepest block a loss needs. `Backbone` exposes exactly that, plus the token layout facts
(`num_prefix_tokens` = CLS + registers, patch grid) every later stage depends on.

Taps go through timm's public `forward_intermediates(..., norm=False, stop_early=True)`. `prune_intermediate_layers`
is not needed: the teacher's last block is always distilled (docs/method.md), so no block could be pruned, and
`stop_early` already leaves blocks after the deepest tap unrun.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import timm
import torch
from timm.data import resolve_data_config
from torch import Tensor, nn

from singer_deploy.errors import ModelError, whole_sentences
from singer_deploy.models.block_rows import RowRunner, record_qkv
from singer_deploy.models.hub import resolve_model_source
from singer_deploy.models.weights import check_weights_file, load_weights_strict, resolve_cached_weights

# Public API timm's VisionTransformer family (vit_*, deit3_*, *_dinov2, *_reg4_*, *_clip_*) shares; Backbone needs it.
_VIT_PARTS = ("patch_embed", "blocks", "num_prefix_tokens", "embed_dim", "forward_intermediates")


class Backbone(nn.Module):
    """A timm ViT seen as a stack of blocks over tokens (B, prefix + N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        missing = [part for part in _VIT_PARTS if not hasattr(model, part)]
        if missing:
            raise ModelError(
                "The model is not a timm Vision Transformer",
                expected="a timm VisionTransformer-family model (vit_*, deit3_*, *_dinov2, *_clip_*)",
                found=f"{type(model).__name__} without {', '.join(missing)}",
                fix="pick a ViT architecture from timm.list_models('vit_*')")
        self.model = model
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        self.grid_size: tuple[int, int] = tuple(model.patch_embed.grid_size)
        self.patch_size: tuple[int, int] = tuple(model.patch_embed.patch_size)
        self.img_size: tuple[int, int] = tuple(model.patch_embed.img_size)
        self.embed_dim: int = int(model.embed_dim)
        self.depth: int = len(model.blocks)
        self.weights_report: dict | None = None   # set when weights were loaded from a file (models/weights.py)
        self._row_runner = RowRunner(model.blocks)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def check_layer(self, layer: int) -> int:
        """Return a non-negative block index; negative indices count from the last block."""
        return check_block_index(layer, self.depth)

    def _check_images(self, images: Tensor) -> None:
        expected = (self.model.patch_embed.proj.in_channels, *self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ModelError("Input images have the wrong shape", expected=f"(B, {', '.join(map(str, expected))})",
                             found=str(tuple(images.shape)),
                             fix=f"pass images of {expected[1]}x{expected[2]} px (image folders are resized and cropped "
                                 "to the model's input size by singer_deploy.models.data.image_transform)")

    def run_blocks(self, tokens: Tensor, start: int, stop: int) -> Tensor:
        """Apply blocks[start:stop] to tokens."""
        for block in self.model.blocks[start:stop]:
            tokens = block(tokens)
        return tokens

    def run_block_rows(self, tokens: Tensor, index: int, rows: Tensor, qkv: Tensor | None = None,
                       changed: Tensor | None = None) -> Tensor:
        """Block `index`'s output on `tokens` (B, T, D) at `rows` (B, T) bool only: (M, D) in the order of
        rows.nonzero(), computing only what the rows need where the block allows it (models/block_rows.py);
        qkv: the block's query, key and value projections recorded on a stream that differs from `tokens` at
        `changed` only (`record_qkv`; `changed` None: at the rows), so only the changed tokens' own are computed."""
        return self._row_runner(tokens, index, rows, qkv, changed)

    def record_qkv(self, blocks: Sequence[int]):
        """A context manager: forward passes inside it record the query, key and value projections of `blocks` in
        the dict it yields (block -> (B, T, 3 x width)), for run_block_rows (models/block_rows.py)."""
        return record_qkv(self.model.blocks, blocks)

    def forward_taps(self, images: Tensor, layers: Sequence[int],
                     edits: Mapping[int, Callable[[Tensor], Tensor]] | None = None) -> dict[int, Tensor]:
        """Raw outputs of the requested blocks; blocks after the deepest requested one are never run.

        `edits`: block -> a function of that block's output (B, prefix + N, D) that the later blocks read instead
        (the refined stream, docs/method.md "Refined stream"); a tap is always the block's output before its edit.
        """
        wanted = sorted({self.check_layer(layer) for layer in layers})
        if not wanted:
            raise ModelError("No layers were requested", expected="at least one block index", found="[]",
                             fix="pass layers=[-1] for the last block")
        edited = sorted(block for block in (edits or {}) if block < wanted[-1])
        if edited:
            first = edited[0]
            taps = self.forward_taps(images, [layer for layer in wanted if layer < first] + [first])
            tokens = taps[first]
            for block in range(first + 1, wanted[-1] + 1):
                tokens = self.model.blocks[block](edits[block - 1](tokens) if block - 1 in edits else tokens)
                taps[block] = tokens
            return {layer: taps[layer] for layer in wanted}
        self._check_images(images)
        # timm's public tap API: raw block outputs (norm=False), blocks after the deepest index not run (stop_early),
        # each tap split into (patch tokens, prefix tokens), which are joined back into the (B, prefix + N, D) layout.
        outputs = self.model.forward_intermediates(images, indices=wanted, norm=False, stop_early=True,
                                                   output_fmt="NLC", intermediates_only=True,
                                                   return_prefix_tokens=self.num_prefix_tokens > 0)
        if self.num_prefix_tokens == 0:
            return dict(zip(wanted, outputs))
        return {layer: torch.cat([prefix, patches], dim=1) for layer, (patches, prefix) in zip(wanted, outputs)}

    def forward(self, images: Tensor) -> Tensor:
        """Raw last-block tokens (before the final norm)."""
        return self.forward_taps(images, [-1])[self.depth - 1]

    def split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(prefix tokens, patch tokens): prefix = CLS + registers, never refined, never in patch metrics."""
        return tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]

    def data_config(self, crop_pct: float | None = None) -> dict:
        """Input size, mean, std, interpolation and crop_pct for this model's transforms.

        Mean, std, interpolation and the default crop_pct come from timm's pretrained config; the input size is the
        created model's own (`img_size`), never the pretrained one: a model made at 64 px takes 64 px images.
        """
        config = dict(resolve_data_config({}, model=self.model))
        config["input_size"] = (int(self.model.patch_embed.proj.in_channels), *self.img_size)
        if crop_pct is not None:
            config["crop_pct"] = float(crop_pct)
        return config

    def frozen_copy(self, keep_through: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> "Backbone":
        """A frozen inference copy holding blocks 0..keep_through only, in `dtype` weights on `device`.

        Deeper blocks, the final norm and the head become nn.Identity and are never copied, so a ViT-L teacher
        tapped at block 17 holds 18 blocks on the GPU; the copy keeps `depth` so block indices mean the same. Held
        in bf16/fp16 weights, the frozen teacher is not re-cast by autocast at every step. `self` is untouched.
        """
        keep_through = self.check_layer(keep_through)
        model = self.model
        dropped = list(model.blocks[keep_through + 1:])
        dropped += [getattr(model, name) for name in ("norm", "fc_norm", "head", "attn_pool", "head_drop")
                    if isinstance(getattr(model, name, None), nn.Module)]
        memo = {id(part): nn.Identity() for part in dropped}
        clone = Backbone(copy.deepcopy(model, memo))
        clone.to(device=device, dtype=dtype)
        return clone.requires_grad_(False).eval()


def check_block_index(layer: int, depth: int, who: str = "model") -> int:
    """Non-negative index of block `layer` in a stack of `depth` blocks (negative counts from the last block)."""
    index = layer + depth if layer < 0 else layer
    if not 0 <= index < depth:
        raise ModelError(f"{who.capitalize()} layer {layer} is out of range",
                         expected=f"a block index in [-{depth}, {depth - 1}] (the {who} has {depth} blocks)",
                         found=str(layer), fix="choose a block that exists, e.g. -1 for the last block")
    return index


def has_class_token(model: nn.Module) -> bool:
    """Whether a timm ViT (or a Backbone around one) puts a CLS token first; registers alone are not one."""
    model = getattr(model, "model", model)
    return bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))


def load_backbone(name: str | nn.Module, *, weights: str | Path | None = None, pretrained: bool = False,
                  **timm_kwargs) -> Backbone:
    """Build a Backbone from a timm name (random init, local cache or local file) or wrap an existing model.

    Plain timm names: weights load strictly and offline (models/weights.py): only the classifier head may differ
    from the file, and `pretrained` reads the local caches only; `backbone.weights_report` says what was loaded.
    `hf-hub:` / `local-dir:` names load their folder's config and weights through timm, from local files only
    (singer_deploy/models/hub.py).
    """
    if isinstance(name, nn.Module):
        return Backbone(name)
    timm_kwargs.setdefault("num_classes", 0)
    source = resolve_model_source(name)
    if source.has_weights:
        if weights is not None:
            raise ModelError(f"{name} brings its own weights", expected="a hub name or a weights file, not both",
                             found=f"weights={weights}", fix="drop `weights`, or use the plain timm architecture name")
        _check_model_name(source.architecture)
        return Backbone(timm.create_model(source.create_name, pretrained=True, **timm_kwargs).eval())
    path = check_weights_file(weights) if weights is not None else None
    _check_model_name(name)
    try:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    except TypeError as err:  # an argument this architecture does not take, e.g. a misspelt kwargs key
        raise ModelError(f"timm cannot build '{name}' with these kwargs", expected="arguments of the timm model",
                         found=f"{sorted(timm_kwargs)}: {err}", fix="remove or correct the kwargs key") from err
    except Exception as err:  # noqa: BLE001 - a kwargs value timm cannot build with: ValueError (img_size 0),
        # AssertionError (embed_dim not divisible by num_heads), RuntimeError (a size too large to allocate) ...
        raise ModelError(f"timm cannot build '{name}' with these kwargs values", expected="sizes the architecture "
                         "can take (img_size a multiple of patch_size, embed_dim of num_heads ...)",
                         found=f"{sorted(timm_kwargs)}: {type(err).__name__}: {whole_sentences(str(err))}",
                         fix="correct the kwargs values (examples/ has working ones)") from err
    backbone = Backbone(model.eval())
    if path is None and pretrained:
        path = resolve_cached_weights(model, name)
    if path is not None:
        backbone.weights_report = load_weights_strict(model, path, name).to_dict()
    return backbone


def _check_model_name(name: str) -> None:
    if name.split(".")[0] in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    raise ModelError(f"timm has no model named '{name}'", expected="a name from timm.list_models()",
                     found=name, fix=f"did you mean {', '.join(close)}?" if close else "see timm.list_models('vit*')")


@torch.inference_mode()
def patch_tokens(backbone: Backbone, images: Tensor, layer: int = -1) -> Tensor:
    """Patch tokens (B, N, D) of one block's raw output, without gradients."""
    index = backbone.check_layer(layer)
    return backbone.split(backbone.forward_taps(images, [index])[index])[1]
