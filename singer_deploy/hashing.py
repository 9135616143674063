"""Content hashes of arrays and modules: the one definition that caches, goldens and manifests key on."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn


def array_sha256(array: np.ndarray) -> str:
    """sha256 over dtype, shape and bytes: equal arrays, equal hashes."""
    digest = hashlib.sha256(f"{array.dtype}{tuple(array.shape)}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and the exact bytes of the values, any dtype (bf16 too)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}:{dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def payload_sha256(payload: dict) -> str:
    """sha256 of a JSON-able mapping with sorted keys: equal settings, equal hashes (cache keys of recipes)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
