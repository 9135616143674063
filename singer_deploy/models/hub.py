"""timm's own model sources (`hf-hub:org/name`, `local-dir:/path`) resolved offline, and timm's folder format.

`resolve_model_source(name)` turns a teacher/student name into what `timm.create_model` can build without any
network: plain timm names pass through; `local-dir:` folders are checked (config.json + weights); `hf-hub:` names
are looked up in the local Hugging Face cache only (`snapshot_download(local_files_only=True)`) and become the
`local-dir:` of the cached snapshot, so nothing is ever downloaded. A distilled student is saved in the same folder
format with `save_timm_dir`, so `timm.create_model("local-dir:<run>/student")` rebuilds it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from singer_deploy.io import file_mode
from singer_deploy.errors import ModelError, whole_sentences

if TYPE_CHECKING:
    from torch import nn

HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
# What timm's local-dir loader reads (timm.models._hub.load_state_dict_from_path), best first.
_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ModelSource:
    """A name ready for timm.create_model: `create_name` never points at the network."""

    name: str            # as the user wrote it
    create_name: str     # plain timm name or "local-dir:<folder>"
    folder: Path | None  # the folder holding config.json + weights, for hub names
    architecture: str    # the timm architecture (config.json's "architecture" for hub names)

    @property
    def has_weights(self) -> bool:
        return self.folder is not None


def is_hub_name(name: str) -> bool:
    return name.startswith((HF_HUB, LOCAL_DIR))


def resolve_model_source(name: str, *, cache_dir: str | Path | None = None) -> ModelSource:
    """Resolve `hf-hub:` / `local-dir:` names from local files only; other names are returned unchanged."""
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):]).expanduser()
        return ModelSource(name, f"{LOCAL_DIR}{folder}", folder, _check_folder(folder, name))
    if name.startswith(HF_HUB):
        folder = _cached_snapshot(name[len(HF_HUB):], cache_dir)
        return ModelSource(name, f"{LOCAL_DIR}{folder}", folder, _check_folder(folder, name))
    return ModelSource(name, name, None, name)


def _cached_snapshot(repo: str, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1:
        raise ModelError("A hf-hub name needs an organisation and a repository", expected="hf-hub:org/name[@rev]",
                         found=f"{HF_HUB}{repo}", fix="e.g. hf-hub:timm/vit_small_patch14_dinov2.lvd142m")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as err:
        raise ModelError(f"{HF_HUB}{repo} is not in the local Hugging Face cache (nothing is downloaded)",
                         expected=f"a cached snapshot of {repo_id} under {cache_dir or 'HF_HUB_CACHE'}",
                         found=f"{type(err).__name__}: {whole_sentences(str(err), limit=200)}",
                         fix=f"on a connected machine run `hf download {repo_id}` and copy the cache, or "
                             f"save the model with timm.models.save_for_hf and use local-dir:PATH") from err


def _check_folder(folder: Path, name: str) -> str:
    """The folder's timm architecture, or a ModelError saying which file is missing."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelError(f"{name}: no timm model folder there", expected=f"{config_path} (timm's hub format)",
                         found="no such file" if folder.is_dir() else f"no folder {folder}",
                         fix="save one with timm.models.save_for_hf(model, folder, safe_serialization=True)")
    try:
        config = json.loads(config_path.read_text())
        architecture = config.get("architecture") or config["pretrained_cfg"]["architecture"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(f"{name}: config.json is not a timm model config", expected='a JSON object with '
                         '"architecture"', found=f"{type(err).__name__}: {err}",
                         fix="rewrite it with timm.models.save_for_hf") from err
    if not any((folder / file).is_file() for file in _WEIGHT_FILES):
        raise ModelError(f"{name}: the folder holds no weights", expected=" or ".join(_WEIGHT_FILES),
                         found=", ".join(sorted(p.name for p in folder.iterdir())) or "an empty folder",
                         fix="save the weights next to config.json (timm.models.save_for_hf)")
    return architecture


def save_timm_dir(model: nn.Module, folder: str | Path) -> Path:
    """Save a timm model as `folder/config.json` + `folder/model.safetensors` (timm's hub format, what
    `timm.create_model("local-dir:<folder>")` reads) with timm's own `save_for_hf`; returns the weights path.
    Written into a temporary folder beside it and moved in file by file, config last, so a folder with a config
    always has complete weights."""
    from timm.models import save_for_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
        save_for_hf(model, tmp, safe_serialization=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(Path(tmp) / name, file_mode())   # safetensors writes 0600; results keep the umask's mode
            os.replace(Path(tmp) / name, folder / name)
    return folder / WEIGHTS_NAME
