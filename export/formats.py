"""The export format table: one row per backend, plus name / suffix resolution (the Ultralytics table idea).

Runner classes are named by import path, not imported, so reading the table never pulls in a runtime
(OpenVINO, TensorRT) that may be missing here. Format names, aliases and the precisions each format carries live in
singer_deploy/config.py, where configuration validation needs them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from singer_deploy.config import FORMAT_PRECISIONS, format_name
from singer_deploy.errors import ConfigError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str                   # file suffix of the artifact a runner opens
    precisions: tuple[str, ...]   # precisions this format can carry (some produced by singer_deploy.calibration)
    runner: str                   # "module:Class" of its Runner, imported on demand
    pip: str                      # what to install when its runtime is missing

    def runner_class(self) -> type:
        module_name, _, class_name = self.runner.partition(":")
        return getattr(importlib.import_module(module_name), class_name)


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat("onnx", ".onnx", FORMAT_PRECISIONS["onnx"],
                         "singer_deploy.export.onnx:OnnxRuntimeRunner",
                         "pip install 'singer-deploy[cpu]' (or '[gpu]' for onnxruntime-gpu)"),
    "openvino": ExportFormat("openvino", ".xml", FORMAT_PRECISIONS["openvino"],
                             "singer_deploy.export.openvino:OpenVINORunner", "pip install 'singer-deploy[cpu]'"),
    "tensorrt": ExportFormat("tensorrt", ".engine", FORMAT_PRECISIONS["tensorrt"],
                             "singer_deploy.export.tensorrt:TensorRTRunner",
                             "pip install tensorrt (needs an NVIDIA GPU with CUDA)"),
    "torch_tensorrt": ExportFormat("torch_tensorrt", ".ep", FORMAT_PRECISIONS["torch_tensorrt"],
                                   "singer_deploy.export.torch_tensorrt:TorchTensorRTRunner",
                                   "pip install torch-tensorrt (matching your torch version; needs CUDA)"),
}

# Extra suffixes a TensorRT plan is commonly saved under.
_SUFFIX_ALIASES = {".plan": "tensorrt", ".trt": "tensorrt", ".pt2": "torch_tensorrt"}


def resolve_format(name: str) -> ExportFormat:
    """Return the table row for `name` (case-insensitive, aliases, near-miss typos with a warning)."""
    return FORMATS[format_name(name)]


def format_for_path(path: str | Path) -> ExportFormat:
    """Which format an artifact file belongs to, from its suffix."""
    suffix = Path(path).suffix.lower()
    for fmt in FORMATS.values():
        if fmt.suffix == suffix:
            return fmt
    if suffix in _SUFFIX_ALIASES:
        return FORMATS[_SUFFIX_ALIASES[suffix]]
    known = sorted({f.suffix for f in FORMATS.values()} | set(_SUFFIX_ALIASES))
    raise ConfigError(f"Cannot tell the format of artifact {str(path)!r} from its suffix",
                      expected=f"a file ending in one of {', '.join(known)}", found=repr(suffix or "no suffix"),
                      fix="rename the artifact or open it with the runner class of its format")
