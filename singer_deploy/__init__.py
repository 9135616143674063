"""singer-deploy: SiNGER distillation of Vision Transformers and edge export with parity checks.

Importing the package loads only the error classes; `distill_and_export` (and torch, timm, peft behind it) is
imported on first use, so `import singer_deploy` and `singer-deploy --help` stay fast (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from singer_deploy.errors import (BackendUnavailableError, ConfigError, DataError, ExportError, ModelError,
                                  ParityError, SingerDeployError, TrainingError)

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first read.
_LAZY = {"distill_and_export": "singer_deploy.pipeline.api", "scan": "singer_deploy.pipeline.api"}

__all__ = [
    "BackendUnavailableError", "ConfigError", "DataError", "ExportError", "ModelError", "ParityError",
    "SingerDeployError", "TrainingError", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'singer_deploy' has no attribute {name!r}")
