"""A teacher block's output at a few chosen tokens only (the "subspace" L_out target's counterfactual, docs/method.md,
"Artifact subspace"): those tokens are re-run through the blocks after the artifact's writer every step, while the
other tokens keep their raw values.

A whole block costs a query, a key and a value per token, attention of every token to every token and an MLP per
token. For the chosen rows only their queries, their attention and their MLP are needed; the keys and values of every
token are still needed (the rows read all of them). For timm's pre-norm `Block` with its `Attention` (timm's
VisionTransformer: ViT, DeiT-III, DINOv2, CLIP) `block_rows` computes exactly that. timm has no public call for
attention at a subset of queries, so the block's forward is written out here from its own submodules; to stay right
on a timm version whose forward differs, `RowRunner` checks it against the block itself on the first call of each
block and runs the whole block wherever the two disagree.

The queries, keys and values of the other tokens are the ones the block computed on the raw stream (the chosen rows
are the only ones whose input differs), so where the caller kept them (`record_qkv` around the raw forward) only the
rows' own are computed: at ViT-L depth that is most of the counterfactual's cost (docs/results.md, "The method at
the paper's scale"). The same reuse gives L_info's next block on the target, which differs from the raw layer at the
artifact tokens only, at every token without their projections (`changed`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

# block_rows and the whole block count as the same computation when their relative difference (Frobenius, over the
# rows) is within AGREEMENT, or within AGREEMENT_EPS units of the autocast dtype's precision where that is coarser:
# the two orders of summation differ by ~1e-6 in float32 and a few units in half precision; a submodule left out
# (layer scale, q/k norm, a gate) changes the output far more.
AGREEMENT = 1e-4
AGREEMENT_EPS = 4
_NEEDED = ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_NEEDED_ATTN = ("qkv", "q_norm", "k_norm", "proj", "proj_drop", "num_heads", "head_dim")


class RowRunner:
    """Runs block `index` of `blocks` at `rows`: by `block_rows` where its first call showed that agrees with the
    whole block, else by the whole block."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks
        self.rows_path: dict[int, bool] = {}

    def __call__(self, tokens: Tensor, index: int, rows: Tensor, qkv: Tensor | None = None,
                 changed: Tensor | None = None) -> Tensor:
        """qkv, changed: as block_rows takes them (qkv None: computed here)."""
        block = self.blocks[index]
        if not rows.any():
            return tokens[rows]
        if qkv is not None and (rows if changed is None else changed).all():
            qkv = None                      # every token differs from the recorded stream: nothing to reuse
        if rows.all() and qkv is None:      # a whole-context counterfactual: the block itself, without row gathers
            return block(tokens).flatten(0, 1)
        if self.rows_path.get(index, False):
            return block_rows(block, tokens, rows, qkv, changed)
        whole = block(tokens)[rows]
        if index not in self.rows_path:
            self.rows_path[index] = supports_rows(block) and _agree(block_rows(block, tokens, rows, qkv, changed),
                                                                    whole)
        return whole


def supports_rows(block: nn.Module) -> bool:
    """timm's pre-norm Block with timm's Attention (forwards not overridden), with the parts block_rows reads."""
    attn = getattr(block, "attn", None)
    return (type(block).forward is Block.forward and type(attn).forward is Attention.forward
            and all(hasattr(block, name) for name in _NEEDED) and all(hasattr(attn, name) for name in _NEEDED_ATTN))


def block_rows(block: Block, tokens: Tensor, rows: Tensor, qkv: Tensor | None = None,
               changed: Tensor | None = None) -> Tensor:
    """`block(tokens)[rows]` (rows: (B, T) bool; result (M, D) in the order of rows.nonzero()), computing only the
    rows' queries, attention and MLP. qkv: the block's query, key and value projections (B, T, 3 x width) of tokens
    that equal `tokens` everywhere but at `changed` (B, T) bool (default: the rows), what `record_qkv` kept on the raw
    stream; the changed tokens' own are computed and put in their place for the attention (the caller's tensor is
    left as it was). None: every token's keys and values are computed."""
    attn = block.attn
    width = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    image, token = rows.nonzero(as_tuple=True)
    if qkv is None:
        normed = block.norm1(tokens)
        queries = F.linear(normed[image, token], weight[:width], None if bias is None else bias[:width])
        keys_values = F.linear(normed, weight[width:], None if bias is None else bias[width:])
        read = _attend(attn, rows, image, token, queries, keys_values)
    else:
        at = (image, token) if changed is None else changed.nonzero(as_tuple=True)
        own = F.linear(block.norm1(tokens[at]), weight, bias)     # a per-token norm: those tokens alone give the same
        with _rows_replaced(qkv, at, own.to(qkv.dtype)) as replaced:
            read = _attend(attn, rows, image, token, replaced[image, token, :width], replaced[..., width:])
    if getattr(attn, "norm", None) is not None:        # scale_norm; absent in older timm
        read = attn.norm(read)
    inputs = tokens[image, token]
    if getattr(attn, "gate", None) is not None:         # absent in older timm
        read = read * attn.gate(block.norm1(inputs)).sigmoid()
    out = inputs + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(read))))
    return out + block.drop_path2(block.ls2(block.mlp(block.norm2(out))))


def _attend(attn: Attention, rows: Tensor, image: Tensor, token: Tensor, queries: Tensor,
            keys_values: Tensor) -> Tensor:
    """The attention read (M, width) of the rows (image, token: rows.nonzero()) from their queries (M, width) and
    every token's keys and values (B, T, 2 x width)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    batch, length = rows.shape
    keys, values = keys_values.reshape(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    keys = attn.k_norm(keys)
    # Each image's rows go into slots 0..n-1 of a padded query block, so attention stays one batched call.
    slot = (rows.cumsum(1) - 1)[image, token]
    padded = queries.new_zeros(batch, int(rows.sum(1).max()), heads, head_dim)
    padded[image, slot] = attn.q_norm(queries.reshape(-1, heads, head_dim))
    read = F.scaled_dot_product_attention(padded.transpose(1, 2), keys, values).transpose(1, 2)
    return read[image, slot].reshape(-1, heads * head_dim)


@contextmanager
def _rows_replaced(qkv: Tensor, at: tuple[Tensor, Tensor], own: Tensor) -> Iterator[Tensor]:
    """`qkv` with its tokens `at` set to `own`: written in place and put back on leaving, since a whole copy per call
    cost more than the rows' own projections at ViT-L depth (docs/results.md, "The method at the paper's scale"); a
    copy where either is part of an autograd graph, which an in-place write would break, or where `qkv` was made in
    inference mode and this runs outside it, where torch forbids the write."""
    if qkv.requires_grad or own.requires_grad or (qkv.is_inference() and not torch.is_inference_mode_enabled()):
        yield qkv.index_put(at, own)
        return
    with torch.no_grad():       # the recording is a view made without grad: written in place only without it
        kept = qkv[at]
        qkv.index_put_(at, own)
    try:
        yield qkv
    finally:
        with torch.no_grad():
            qkv.index_put_(at, kept)


@contextmanager
def record_qkv(blocks: nn.ModuleList, indices: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Inside the `with`, each forward pass of blocks `indices` (those `supports_rows` accepts) records the block's
    query, key and value projections (B, T, 3 x width, its attention's qkv output) in the dict it yields, for
    block_rows. Kept, not copied: the dict holds the tensors the forward made anyway."""
    found: dict[int, Tensor] = {}

    def keeper(index: int):
        def hook(module, inputs, output):
            found[index] = output
        return hook

    handles = [blocks[i].attn.qkv.register_forward_hook(keeper(i)) for i in sorted(set(indices))
               if supports_rows(blocks[i])]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _agree(fast: Tensor, whole: Tensor) -> bool:
    device = whole.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else whole.dtype
    limit = max(AGREEMENT, AGREEMENT_EPS * torch.finfo(dtype).eps) * whole.float().norm()
    return bool((fast.float() - whole.float()).norm() <= limit)
