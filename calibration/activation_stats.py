"""Per-layer activation ranges of a PyTorch student: why high-norm artifact tokens hurt per-tensor INT8.

A per-tensor symmetric INT8 scale is max|x| / 127. When a few artifact tokens (or a few outlier channels) are
10-100x larger than the rest, that scale is set by them and an ordinary token is represented with only a handful
of the 127 levels. The statistics below make that visible per layer: the max / median ratio over tokens and over
channels, and `median_token_levels`, how many INT8 levels the median token's largest value gets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from singer_deploy.errors import ConfigError

LayerPicker = Callable[[nn.Module], Mapping[str, nn.Module]]
_RESERVOIR = 200_000  # |x| samples kept per layer for the percentile (200 above p99.9: a stable estimate)


@dataclass
class LayerRange:
    max_abs: float
    p999_abs: float                # 99.9th percentile of |x| over all elements
    token_max_over_median: float   # max over tokens of max_c|x| / median over tokens of the same
    channel_max_over_median: float  # max over channels of max|x| / median over channels of the same
    median_token_levels: float     # 127 * median token max|x| / max_abs: INT8 levels an ordinary token gets
    tokens: int


class _Collector:
    """Streams one layer's inputs: running channel maxima, all token maxima, and a uniform |x| sample."""

    def __init__(self, seed: int, per_batch: int):
        self.rng = np.random.default_rng(seed)
        self.per_batch = per_batch
        self.channel_max: torch.Tensor | None = None
        self.token_max: list[torch.Tensor] = []
        self.sample: list[np.ndarray] = []

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs()
        a = a.reshape(-1, a.shape[-1])        # (tokens, channels) for (B, N, D) Linear inputs
        self.channel_max = a.amax(0) if self.channel_max is None else torch.maximum(self.channel_max, a.amax(0))
        self.token_max.append(a.amax(1))
        flat = a.reshape(-1).numpy()
        self.sample.append(self.rng.choice(flat, size=min(flat.size, self.per_batch), replace=False))

    def result(self) -> LayerRange:
        token_max = torch.cat(self.token_max)
        channel_max = self.channel_max
        max_abs = float(token_max.max())
        median_token = float(token_max.median())
        return LayerRange(
            max_abs=max_abs,
            p999_abs=float(np.quantile(np.concatenate(self.sample), 0.999)),
            token_max_over_median=max_abs / max(median_token, 1e-12),
            channel_max_over_median=float(channel_max.max() / channel_max.median().clamp_min(1e-12)),
            median_token_levels=127.0 * median_token / max(max_abs, 1e-12),
            tokens=int(token_max.numel()))


def linear_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear: its input is exactly what a per-tensor INT8 activation quantizer sees."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def residual_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks (timm `blocks.i`): with capture="output", the residual stream artifacts live in."""
    vit = getattr(model, "model", model)
    vit = getattr(vit, "vit", vit)
    return {f"blocks.{i}": block for i, block in enumerate(getattr(vit, "blocks", []))}


def activation_range_stats(model: nn.Module, images: np.ndarray | torch.Tensor, *,
                           layers: Mapping[str, nn.Module] | LayerPicker = linear_inputs, capture: str = "input",
                           batch_size: int = 16, seed: int = 0) -> dict[str, LayerRange]:
    """Range statistics of the chosen layers' inputs (default: every nn.Linear, what INT8 activation quantizers
    see) or outputs (`capture="output"`, e.g. with layers=residual_blocks) over `images`, in forward order."""
    if capture not in ("input", "output"):
        raise ConfigError("Unknown capture point", expected="'input' or 'output'", found=repr(capture),
                          fix="capture='input' for Linear inputs, 'output' with layers=residual_blocks")
    chosen = layers(model) if callable(layers) else layers
    per_batch = max(1, _RESERVOIR // -(-len(images) // batch_size))  # equal share per batch: a uniform sample
    collectors = {name: _Collector(seed + i, per_batch) for i, name in enumerate(chosen)}
    order: list[str] = []

    def hook(name: str):
        def record(_module, inputs, output=None):
            if name not in order:
                order.append(name)
            collectors[name].add(inputs[0] if capture == "input" else output)
        return record

    register = "register_forward_pre_hook" if capture == "input" else "register_forward_hook"
    handles = [getattr(module, register)(hook(name)) for name, module in chosen.items()]
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: collectors[name].result() for name in order}


def summarize_ranges(stats: Mapping[str, LayerRange]) -> dict:
    """Worst and median of each statistic over layers, plus the per-layer table as plain dicts."""
    if not stats:
        return {"layers": {}}
    table = {name: asdict(r) for name, r in stats.items()}
    summary = {}
    for key in ("max_abs", "p999_abs", "token_max_over_median", "channel_max_over_median"):
        values = np.array([row[key] for row in table.values()])
        summary[f"{key}_max"] = float(values.max())
        summary[f"{key}_median"] = float(np.median(values))
    levels = np.array([row["median_token_levels"] for row in table.values()])
    summary["median_token_levels_min"] = float(levels.min())
    summary["median_token_levels_median"] = float(np.median(levels))
    summary["layers"] = table
    return summary
