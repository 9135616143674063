"""The export format table: one row per backend, plus name / suffix resolution (the Ultralytics table idea).

Runner classes are named by import path, not imported, so reading the table never pulls in a runtime
(OpenVINO, TensorRT) that may be missing here.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from singer_deploy.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


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
    "onnx": ExportFormat("onnx", ".onnx", ("fp32", "fp16", "int8"), "singer_deploy.export.onnx:OnnxRuntimeRunner",
                         "pip install 'singer-deploy[cpu]' (or '[gpu]' for onnxruntime-gpu)"),
    "openvino": ExportFormat("openvino", ".xml", ("fp32", "fp16", "int8"),
                             "singer_deploy.export.openvino:OpenVINORunner", "pip install 'singer-deploy[cpu]'"),
    "tensorrt": ExportFormat("tensorrt", ".engine", ("fp32", "fp16", "bf16", "int8"),
                             "singer_deploy.export.tensorrt:TensorRTRunner",
                             "pip install tensorrt (needs an NVIDIA GPU with CUDA)"),
    "torch_tensorrt": ExportFormat("torch_tensorrt", ".ep", ("fp32", "fp16", "bf16"),
                                   "singer_deploy.export.torch_tensorrt:TorchTensorRTRunner",
                                   "pip install torch-tensorrt (matching your torch version; needs CUDA)"),
}

# Names people type for the same thing; resolved before any fuzzy matching.
ALIASES: dict[str, str] = {
    "ort": "onnx", "onnxruntime": "onnx",
    "ov": "openvino", "openvino_ir": "openvino", "ir": "openvino",
    "trt": "tensorrt", "engine": "tensorrt", "plan": "tensorrt",
    "torch-tensorrt": "torch_tensorrt", "torchtrt": "torch_tensorrt", "ttrt": "torch_tensorrt",
    "torch_trt": "torch_tensorrt",
}

# Extra suffixes a TensorRT plan is commonly saved under.
_SUFFIX_ALIASES = {".plan": "tensorrt", ".trt": "tensorrt", ".pt2": "torch_tensorrt"}


def resolve_format(name: str) -> ExportFormat:
    """Return the table row for `name` (case-insensitive, aliases, near-miss typos with a warning)."""
    key = str(name).strip().lower().replace(" ", "_")
    key = ALIASES.get(key, key)
    if key in FORMATS:
        return FORMATS[key]
    candidates = sorted(FORMATS) + sorted(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    if close:
        match = ALIASES.get(close[0], close[0])
        warnings.warn(f"export format {name!r} read as {match!r}", stacklevel=2)
        return FORMATS[match]
    raise ConfigError(f"Unknown export format {name!r}", expected=f"one of {', '.join(FORMATS)} "
                      f"(aliases: {', '.join(sorted(ALIASES))})", found=repr(name),
                      fix="pass one of the listed format names")


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


def normalize_precision(precision: str) -> str:
    key = str(precision).strip().lower()
    key = {"float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "half": "fp16",
           "bfloat16": "bf16", "i8": "int8"}.get(key, key)
    if key not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}", expected=f"one of {', '.join(PRECISIONS)}",
                          found=repr(precision), fix="pass fp32, fp16, bf16 or int8")
    return key


def check_precision(fmt: ExportFormat, precision: str) -> str:
    """Normalise `precision` and make sure `fmt` can carry it."""
    key = normalize_precision(precision)
    if key not in fmt.precisions:
        raise ConfigError(f"Format {fmt.name} cannot carry precision {key}",
                          expected=f"one of {', '.join(fmt.precisions)}", found=key,
                          fix="choose a listed precision or another format")
    return key

