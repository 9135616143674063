"""Weights for a timm model, loaded strictly and offline.

Strict: every tensor of the model must come from the file with the model's shape; only the classifier head may
differ (a distilled backbone has none), and that difference is reported, not hidden. timm's own pretrained loader
turns strict loading off whenever the class count differs, which let a ResNet's or a truncated state dict load as a
ViT with a random body (docs/architecture.md, "Failure contract").

Offline: `pretrained=True` resolves the model's weights in the local Hugging Face and torch hub caches with
`huggingface_hub.try_to_load_from_cache`, which never opens a connection; a missing entry is a ModelError naming the
cache paths and the `weights:` alternative. No code path here can download.

Reading goes through timm's `load_state_dict` (safetensors, or `torch.load(weights_only=True)`: a pickle holding
anything but tensors is refused without being executed) and the architecture's own `checkpoint_filter_fn` (original
checkpoint layouts, position-embedding resampling), as timm's loader does.
"""

from __future__ import annotations

import logging
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from singer_deploy.errors import ModelError, shown_path, whole_sentences

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# What timm's Hugging Face loader looks for when a model's config names no file (safetensors first).
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_SHOWN_KEYS = 8


@dataclass
class WeightsReport:
    """What a strict load did: the file, how many tensors it filled, and the classifier keys it left alone."""

    file: str
    loaded: int
    head_ignored: list[str] = field(default_factory=list)   # in the file, not used (the model has no such head)
    head_missing: list[str] = field(default_factory=list)   # in the model, not in the file (kept at their init)

    def to_dict(self) -> dict:
        return {"file": self.file, "loaded": self.loaded, "head_ignored": self.head_ignored,
                "head_missing": self.head_missing}


def check_weights_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError("The weights file does not exist", expected="a readable file", found=shown_path(path),
                         fix="check the path")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError("Unsupported weights file type", expected=" or ".join(WEIGHT_SUFFIXES),
                         found=path.suffix or "no suffix", fix="convert the checkpoint to .safetensors")
    return path


def load_weights_strict(model: nn.Module, path: str | Path, name: str) -> WeightsReport:
    """Fill `model` (timm model `name`) from a local file; anything but a classifier difference is a ModelError."""
    path = check_weights_file(path)
    state = _filtered(model, read_state_dict(path), path)
    heads = _classifier_prefixes(model)
    expected = model.state_dict()

    def in_head(key: str) -> bool:
        return key.startswith(heads)

    missing = sorted(k for k in expected if k not in state and not in_head(k))
    unexpected = sorted(k for k in state if k not in expected and not in_head(k))
    wrong = sorted(k for k in state if k in expected and not in_head(k) and state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(f"The weights file {path} does not fit timm '{name}'",
                         expected=f"a state dict of '{name}' ({len(expected)} tensors; only the classifier "
                                  f"'{', '.join(h.rstrip('.') for h in heads)}' may differ)",
                         found=_describe_misfit(missing, unexpected, wrong, state, expected),
                         fix="check that the architecture name and kwargs (depth, width, patch size) match the "
                             "checkpoint, or that the file is the model you meant")
    _reject_non_finite(state, path)
    head_fits = {k for k in state if in_head(k) and k in expected and state[k].shape == expected[k].shape}
    report = WeightsReport(str(path), loaded=sum(1 for k in state if not in_head(k)) + len(head_fits),
                           head_ignored=sorted(k for k in state if in_head(k) and k not in head_fits),
                           head_missing=sorted(k for k in expected if in_head(k) and k not in head_fits))
    model.load_state_dict({k: v for k, v in state.items() if not in_head(k) or k in head_fits}, strict=False)
    if report.head_ignored or report.head_missing:
        log.info("%s: classifier keys not loaded (a backbone needs no head): ignored %s, kept at init %s", path,
                 report.head_ignored, report.head_missing)
    return report


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors; unreadable, truncated or unsafe files are ModelErrors that say which."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        if not _refused_by_weights_only(err):
            raise _unreadable(path, err) from err
        raise ModelError(f"Refused to load {path}: it holds Python objects besides tensors",
                         expected="tensors only (safetensors, or a torch.save of a state dict)",
                         found=whole_sentences(str(err), limit=200) + " (nothing in it was executed)",
                         fix="re-save the weights with safetensors.torch.save_file(model.state_dict(), ...)"
                         ) from err
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise many unrelated types for broken files
        raise _unreadable(path, err) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} is not a state dict", expected="a mapping of names to tensors",
                         found=type(state).__name__, fix="save model.state_dict(), not the model")
    return state


def _refused_by_weights_only(err: Exception) -> bool:
    # torch raises UnpicklingError, or (torch >= 2.6) a RuntimeError naming weights_only, for a disallowed global.
    return isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err)


def _unreadable(path: Path, err: Exception) -> ModelError:
    detail = whole_sentences(str(err), limit=200) or "no detail"
    return ModelError(f"Cannot read the weights file {path}",
                      expected="a complete .safetensors file or a torch.save'd state dict",
                      found=f"{type(err).__name__}: {detail}",
                      fix="the file is truncated, empty or not a checkpoint: copy it again")


def resolve_cached_weights(model: nn.Module, name: str) -> Path:
    """The local cache file of a model's default pretrained weights; never downloads."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = getattr(model, "pretrained_cfg", None) or {}
    searched = []
    if cfg.get("hf_hub_id"):
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        for filename in ([cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else _HF_FILENAMES):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        searched.append(f"{Path(constants.HF_HUB_CACHE) / ('models--' + repo.replace('/', '--'))} "
                        f"({' or '.join(_HF_FILENAMES)})")
    if cfg.get("url"):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg["url"]).path).name
        if cached.is_file() and cached.suffix in WEIGHT_SUFFIXES:
            return cached
        searched.append(str(cached))
    raise ModelError(f"Pretrained weights for '{name}' are not in the local caches (nothing is downloaded)",
                     expected="the weights in the Hugging Face or torch hub cache",
                     found="not cached; searched " + "; ".join(searched or ["no cache location is known for it"]),
                     fix=f"download them on a connected machine (e.g. `hf download {cfg.get('hf_hub_id', name)}`) "
                         "and copy the cache, or set weights: /path/to/model.safetensors instead of pretrained")


def _filtered(model: nn.Module, state: dict, path: Path) -> dict[str, torch.Tensor]:
    """Apply the architecture's checkpoint converter (timm's `checkpoint_filter_fn`), as timm's loader does."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        return convert(state, model)
    except Exception as err:  # noqa: BLE001 - converters fail with whatever the unexpected layout triggers
        raise ModelError(f"timm cannot convert {path} for {type(model).__name__}",
                         expected="a checkpoint of this architecture", found=f"{type(err).__name__}: {err}"[:300],
                         fix="check that the architecture name matches the checkpoint") from err


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))


def _describe_misfit(missing: list[str], unexpected: list[str], wrong: list[str], state: dict,
                     expected: dict) -> str:
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of another shape: " + ", ".join(
            f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)} in the model"
            for k in wrong[:_SHOWN_KEYS]))
    if missing:
        parts.append(f"{len(missing)} missing from the file: {_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected in the file: {_keys(unexpected)}")
    return "; ".join(parts)


def _keys(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def non_finite_counts(state: dict[str, torch.Tensor]) -> str | None:
    """"NaN/Inf in N tensor(s): name (count), ..." for the floating tensors holding any, or None when all are finite."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if not bad:
        return None
    return f"NaN/Inf in {len(bad)} tensor(s): " + ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:_SHOWN_KEYS])


def _reject_non_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    found = non_finite_counts(state)
    if found:
        raise ModelError(f"The weights file {path} holds non-finite values", expected="finite weights", found=found,
                         fix="the checkpoint is corrupt or was saved after training diverged: use another one")
