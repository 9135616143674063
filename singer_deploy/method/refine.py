"""Teacher-side refinement adapters (SiNGER): F_hat = F + (F W_d) W_u on patch tokens, one adapter per layer.

Each adapter is a peft LoRA over a frozen identity nn.Linear(d, d, bias=False) with lora_alpha = r (scaling 1), no
dropout, no bias. peft computes base(x) + lora_B(lora_A(x)) = x + x A^T B^T, so W_d = A^T and W_u = B^T. Nullspace
initialisation (NOT zero; docs/method.md, "Nullspace initialisation") sets A = N (r x d) and B = N^T (d x r),
hence F_hat = F + F N^T N.
Prefix tokens (CLS and registers, timm `num_prefix_tokens`) pass unchanged.

`stream` (SingerConfig.stream) says what a deeper adapter reads: "raw", each tapped layer refined on its own from the
raw block output (the reference code); "refined", the teacher's blocks after a distilled layer run on its refined
tokens, detached, as the teacher with its adapters merged computes (docs/method.md, "Refined stream").
After training `merge()` folds every adapter into one plain Linear (I + W_d W_u)^T, and `RefinedTeacher` is an
ordinary module (no peft) for metrics and export.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, LoraModel
from safetensors import safe_open
from torch import Tensor, nn

from singer_deploy.config import ADAPTER_INITS, STREAMS
from singer_deploy.errors import ConfigError, ModelError
from singer_deploy.io import atomic_save_safetensors
from singer_deploy.method.nullspace import NullspaceBasis, block_nullspace, surrogate_block

_FORMAT = "singer-refiner/1"
_ADAPTER = "default"


class Refiner(nn.Module):
    """Per-layer refinement adapters; only the LoRA factors are trainable."""

    def __init__(self, layers: Sequence[int], dim: int, rank: int, num_prefix_tokens: int,
                 bases: Mapping[int, Tensor] | None = None, init: str = "nullspace", stream: str = "raw"):
        super().__init__()
        if not layers:
            raise ModelError("A Refiner needs at least one layer", expected="a non-empty list of block indices",
                             found="[]", fix="pass the distilled teacher layers")
        if stream not in STREAMS:
            raise ModelError("Unknown refiner stream", expected=" or ".join(map(repr, STREAMS)), found=repr(stream),
                             fix="use the SingerConfig.stream of the run")
        self.layers: tuple[int, ...] = tuple(sorted(int(layer) for layer in layers))
        self.stream = stream
        self.dim, self.rank, self.num_prefix_tokens = int(dim), int(rank), int(num_prefix_tokens)
        identities = nn.ModuleDict({_name(layer): _identity(dim) for layer in self.layers})
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                            target_modules=[_name(layer) for layer in self.layers], init_lora_weights=False)
        self.lora = LoraModel(identities, config, _ADAPTER)
        self.init_report: dict[int, NullspaceBasis] = {}
        for layer, basis in (bases or {}).items():
            self.set_factors(layer, **initial_factors(basis, init))

    @classmethod
    def from_teacher(cls, backbone: nn.Module, layers: Sequence[int], *, rank: int = 64, rule: str = "smallest",
                     tau: float = 0.05, seed: int = 0, init: str = "nullspace", stream: str = "raw") -> Refiner:
        """Adapters for a lead `Backbone` and its distilled layers D, initialised by `init` (ADAPTER_INITS).

        The basis of layer l comes from block l+1's FFN (the block that reads layer l), or from block l itself when
        l is the teacher's last block. The reference code also uses the block's own FFN for the last entry of D
        when that is not the teacher's last block (its DINOv2 path); we use the block that actually reads it.
        With init "random" the basis is r seeded random orthonormal rows instead (the reference code's ablation);
        the nullspace selection is still computed and reported, so both runs log the same k below tau.
        """
        indices = [backbone.check_layer(layer) for layer in layers]
        blocks = backbone.model.blocks
        report, bases = {}, {}
        for layer in indices:
            source = surrogate_block(layer, len(blocks))
            report[layer] = block_nullspace(blocks[source], rank, rule=rule, tau=tau, seed=seed + layer,
                                            label=f"layer {layer} (FFN of block {source})")
            bases[layer] = (random_orthonormal_rows(rank, backbone.embed_dim, seed + layer) if init == "random"
                            else report[layer].basis)
        refiner = cls(indices, backbone.embed_dim, rank, backbone.num_prefix_tokens, bases, init=init, stream=stream)
        refiner.init_report = report
        return refiner

    def start_at_subspaces(self, subspaces: Mapping[int, Tensor | None]) -> None:
        """adapter_init "subspace": each layer starts at F - F S^T S, S (k, d) the layer's estimated artifact
        subspace (ArtifactSubspace.basis): W_d reads S and then the layer's nullspace directions orthogonal to it,
        W_u writes -S on S's columns and nothing on the rest, so the artifact's component is gone at step 0 and
        every other component is kept. A layer without a subspace (None) keeps its start. Call it before the first
        step (the optimizer's moments must not have seen other factors)."""
        for layer, basis in subspaces.items():
            if basis is None:
                continue
            found = basis.detach().double().cpu()[:self.rank]
            reading = self.adapter(layer).lora_A[_ADAPTER].weight.detach().double().cpu()   # (r, d): W_d^T
            rest = reading - (reading @ found.T) @ found
            q, _ = torch.linalg.qr(torch.cat([found, rest]).T)
            down = q[:, :self.rank]                                     # (d, r), S's rows first
            up = torch.zeros(self.rank, self.dim, dtype=torch.float64)
            up[:len(found)] = -down[:, :len(found)].T
            self.set_factors(layer, down=down.float(), up=up.float())

    def adapter(self, layer: int) -> nn.Module:
        """The peft LoRA layer of one distilled layer."""
        if layer not in self.layers:
            raise ModelError(f"Layer {layer} has no refinement adapter", expected=f"one of {list(self.layers)}",
                             found=str(layer), fix="refine only the layers the Refiner was built for")
        return self.lora.model[_name(layer)]

    @torch.no_grad()
    def set_factors(self, layer: int, *, down: Tensor, up: Tensor) -> None:
        """Write W_d (d x r) and W_u (r x d) into the LoRA factors."""
        adapter = self.adapter(layer)
        a, b = adapter.lora_A[_ADAPTER].weight, adapter.lora_B[_ADAPTER].weight
        if tuple(down.shape) != (self.dim, self.rank) or tuple(up.shape) != (self.rank, self.dim):
            raise ModelError(f"Adapter factors for layer {layer} have the wrong shape",
                             expected=f"W_d ({self.dim}, {self.rank}) and W_u ({self.rank}, {self.dim})",
                             found=f"{tuple(down.shape)} and {tuple(up.shape)}", fix="check dim and rank")
        a.copy_(down.T.to(a.dtype))
        b.copy_(up.T.to(b.dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA factors (the identity bases are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The LoRA factors whose gradient norm is clipped together (train/loop.py train_step): all of them under
        stream "raw"; each layer's apart under "refined", where the deeper adapter's gradient can be large enough to
        stall the shallower one under a shared clip (DistillStep.clip_groups)."""
        if self.stream == "raw":
            return [self.trainable_parameters()]
        return [[p for p in self.adapter(layer).parameters() if p.requires_grad] for layer in self.layers]

    def forward(self, layer: int, tokens: Tensor) -> Tensor:
        """Refined tokens (B, prefix + N, d): patches go through the adapter, prefix tokens pass unchanged."""
        adapter = self.adapter(layer)
        prefix, patches = tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
        refined = adapter(patches.to(adapter.lora_A[_ADAPTER].weight.dtype))
        return torch.cat([prefix.to(refined.dtype), refined], dim=1)

    def stream_edits(self) -> dict[int, Callable[[Tensor], Tensor]] | None:
        """Backbone.forward_taps `edits` of this refiner's stream: under "refined" every distilled layer but the
        deepest hands the blocks after it its refined tokens, detached (a deeper layer's loss never trains a
        shallower adapter, and no teacher block is back-propagated); None under "raw"."""
        return _stream_edits(self.stream, self.layers, self._fed)

    def _fed(self, layer: int, tokens: Tensor) -> Tensor:
        return self(layer, tokens).detach().to(tokens.dtype)

    def merge(self) -> dict[int, nn.Linear]:
        """Plain nn.Linear per layer with weight I + (W_d W_u)^T (peft merge_and_unload on a copy)."""
        merged = copy.deepcopy(self.lora).merge_and_unload()
        linears = {layer: merged[_name(layer)] for layer in self.layers}
        for linear in linears.values():
            linear.requires_grad_(False)
        return linears

    def save(self, path: str | Path) -> Path:
        """Adapter factors + JSON metadata (layers, width, rank, prefix count, init facts) in one safetensors file."""
        path = Path(path)
        tensors = {}
        for layer in self.layers:
            adapter = self.adapter(layer)
            tensors[f"{layer}.lora_A"] = adapter.lora_A[_ADAPTER].weight.detach().float().cpu().contiguous()
            tensors[f"{layer}.lora_B"] = adapter.lora_B[_ADAPTER].weight.detach().float().cpu().contiguous()
        meta = {"format": _FORMAT, "layers": list(self.layers), "dim": self.dim, "rank": self.rank,
                "num_prefix_tokens": self.num_prefix_tokens, "stream": self.stream,
                "init": {str(layer): {"rule": b.rule, "tau": b.tau, "k": b.k, "num_padded": b.num_padded}
                         for layer, b in self.init_report.items()}}
        return atomic_save_safetensors(tensors, path, metadata={"singer_refiner": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> Refiner:
        """Rebuild a Refiner saved by `save` (init facts are not restored, only the trained factors)."""
        path = Path(path)
        if not path.is_file():
            raise ModelError("The refiner file does not exist", expected="a .safetensors file written by "
                             "Refiner.save", found=str(path), fix="check the path")
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("singer_refiner")
            meta = json.loads(raw) if raw else {}
            if meta.get("format") != _FORMAT:
                raise ModelError("The file is not a saved Refiner", expected=f"metadata format {_FORMAT!r}",
                                 found=repr(meta.get("format")), fix="save adapters with Refiner.save")
            # Files saved before streams existed were trained on the raw stream.
            refiner = cls(meta["layers"], meta["dim"], meta["rank"], meta["num_prefix_tokens"],
                          stream=meta.get("stream", "raw"))
            for layer in refiner.layers:
                a, b = handle.get_tensor(f"{layer}.lora_A"), handle.get_tensor(f"{layer}.lora_B")
                refiner.set_factors(layer, down=a.T, up=b.T)
        return refiner


class RefinedTeacher(nn.Module):
    """Teacher Backbone + merged adapters; `forward_taps` returns refined features (Backbone.forward_taps contract).

    Only refined layers may be requested: asking for a raw layer here is almost certainly a mistake (use the
    Backbone for raw taps).
    """

    def __init__(self, backbone: nn.Module, merged: Mapping[int, nn.Linear], stream: str = "raw"):
        super().__init__()
        self.backbone, self.stream = backbone, stream
        self.num_prefix_tokens = int(backbone.num_prefix_tokens)
        self.refiners = nn.ModuleDict({str(layer): linear for layer, linear in sorted(merged.items())})

    @classmethod
    def from_refiner(cls, backbone: nn.Module, refiner: Refiner) -> RefinedTeacher:
        if refiner.dim != backbone.embed_dim or refiner.num_prefix_tokens != backbone.num_prefix_tokens:
            raise ModelError("The refiner was built for another teacher",
                             expected=f"width {backbone.embed_dim}, {backbone.num_prefix_tokens} prefix tokens",
                             found=f"width {refiner.dim}, {refiner.num_prefix_tokens} prefix tokens",
                             fix="load the adapters saved with this teacher")
        return cls(backbone, refiner.merge(), refiner.stream)

    @property
    def layers(self) -> list[int]:
        return [int(key) for key in self.refiners]

    def forward_taps(self, images: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """Refined outputs of the requested (refined) blocks; blocks after the deepest are never run."""
        indices = [self.backbone.check_layer(layer) for layer in layers]
        missing = [layer for layer in indices if str(layer) not in self.refiners]
        if missing:
            raise ModelError("Requested layers have no refinement adapter", expected=f"a subset of {self.layers}",
                             found=str(missing), fix="use the Backbone for raw taps")
        taps = self.backbone.forward_taps(images, indices, _stream_edits(self.stream, self.layers, self.refine))
        return {layer: self.refine(layer, t) for layer, t in taps.items()}

    def taps_from(self, images: Tensor, raw: Mapping[int, Tensor]) -> dict[int, Tensor]:
        """Refined taps of the layers in `raw`, the raw taps of the same `images`: refined from them under stream
        "raw", else a forward pass on the refined stream."""
        if self.stream == "raw":
            return {layer: self.refine(layer, tokens) for layer, tokens in raw.items()}
        return self.forward_taps(images, list(raw))

    def refine(self, layer: int, tokens: Tensor) -> Tensor:
        """Raw block-`layer` tokens (B, prefix + N, d) -> refined ones (patches refined, prefix unchanged), the
        `Refiner.forward` contract."""
        p = self.num_prefix_tokens
        return torch.cat([tokens[:, :p], self.refiners[str(layer)](tokens[:, p:])], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """Refined tokens of the deepest refined layer."""
        deepest = max(self.layers)
        return self.forward_taps(images, [deepest])[deepest]


def _stream_edits(stream: str, layers: Sequence[int], refine: Callable[[int, Tensor], Tensor]):
    if stream == "raw":
        return None
    return {layer: partial(refine, layer) for layer in sorted(layers)[:-1]}


def initial_factors(basis: Tensor, init: str) -> dict[str, Tensor]:
    """W_d and W_u at step 0 from an (r, d) orthonormal basis N, for each ADAPTER_INITS entry.

    "nullspace" (published) and "random": W_d = N^T, W_u = N, so F_hat = F + F N^T N doubles the component in span(N).
    "remove": W_u = -N, so F_hat = F - F N^T N starts with that component removed, the state a faithful refinement of
    an artifact inside span(N) has to reach (the published start must travel from +1x to -1x of it).
    "zero": W_d = N^T, W_u = 0, so F_hat = F at step 0 (LoRA-style), reading the same directions.
    "subspace": as "zero" until the run has estimated the artifact subspace (Refiner.start_at_subspaces).
    """
    if init not in ADAPTER_INITS:
        raise ConfigError("Unknown adapter initialisation", expected=" or ".join(map(repr, ADAPTER_INITS)),
                          found=repr(init), fix="use init='nullspace' (published)")
    zero = torch.zeros_like(basis)
    up = {"nullspace": basis, "random": basis, "remove": -basis, "zero": zero, "subspace": zero}[init]
    return {"down": basis.T, "up": up}


def random_orthonormal_rows(rank: int, dim: int, seed: int) -> Tensor:
    """`rank` seeded random orthonormal rows (rank, dim) in float64."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))
    return q.T.contiguous()


def _name(layer: int) -> str:
    return f"layer{layer}"


def _identity(dim: int) -> nn.Linear:
    linear = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim))
    linear.requires_grad_(False)
    return linear
