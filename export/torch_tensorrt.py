"""Torch-TensorRT dynamo route: torch_tensorrt.compile(ir="dynamo") -> saved ExportedProgram (.ep).

An alternative to ONNX -> TensorRT when the ONNX parser rejects something; same Runner contract. Written against
the documented Torch-TensorRT 2.x API and unverified here (no CUDA, no torch_tensorrt on the development machines).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from singer_deploy.config import check_precision
from singer_deploy.errors import BackendUnavailableError, ConfigError, ExportError
from singer_deploy.export.formats import FORMATS
from singer_deploy.export.runner import Runner, require_file
from singer_deploy.export.student import OUTPUT_NAMES, ExportableStudent
from singer_deploy.export.tensorrt import profile_shapes
from singer_deploy.io import atomic_files

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def import_torch_tensorrt() -> ModuleType:
    try:
        ttrt = importlib.import_module("torch_tensorrt")
    except ImportError as exc:
        raise BackendUnavailableError("Torch-TensorRT is not available here: torch_tensorrt is not installed",
                                      expected="torch_tensorrt matching this torch, and a CUDA GPU",
                                      found=f"ImportError: {exc}", fix=FORMATS["torch_tensorrt"].pip) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("Torch-TensorRT is not available here: no CUDA device",
                                      expected="an NVIDIA GPU visible to torch",
                                      found="torch.cuda.is_available() is False",
                                      fix="run the Torch-TensorRT steps on a GPU machine")
    return ttrt


@dataclass
class TorchTensorRTExport:
    path: Path
    precision: str
    seconds: float
    version: str


def _precision_settings(ttrt, precision: str) -> dict:
    """Newer Torch-TensorRT: explicit typing + rule-based autocast; older: enabled_precisions (weak typing)."""
    fields = {f.name for f in dataclasses.fields(ttrt.dynamo.CompilationSettings)}
    settings: dict = {"disable_tf32": True} if precision == "fp32" and "disable_tf32" in fields else {}
    if "use_explicit_typing" in fields:
        settings["use_explicit_typing"] = True
    if precision == "fp32":
        return settings
    if "enable_autocast" in fields:
        return {**settings, "enable_autocast": True, "low_precision_type": _DTYPES[precision]}
    return {"enabled_precisions": {torch.float32, _DTYPES[precision]}}


def compile_torch_tensorrt(student: nn.Module, path: str | Path, *, projector: nn.Module | None = None,
                           precision: str = "fp32", min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32,
                           workspace_bytes: int | None = None) -> TorchTensorRTExport:
    ttrt = import_torch_tensorrt()
    precision = check_precision("torch_tensorrt", precision)
    wrapper = student if isinstance(student, ExportableStudent) else ExportableStudent(student, projector)
    wrapper = copy.deepcopy(wrapper).eval().cuda()   # its own CUDA copy: the caller's module stays where it is
    shapes = profile_shapes(wrapper.input_chw, min_batch, opt_batch, max_batch)
    inputs = [ttrt.Input(min_shape=shapes["min"], opt_shape=shapes["opt"], max_shape=shapes["max"],
                         dtype=torch.float32)]
    extra = {"workspace_size": int(workspace_bytes)} if workspace_bytes else {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        compiled = ttrt.compile(wrapper, ir="dynamo", arg_inputs=inputs, require_full_compilation=True,
                                **_precision_settings(ttrt, precision), **extra)
        example = torch.randn(*shapes["opt"], device="cuda")
        with atomic_files([path]) as (tmp,):   # same name in a temporary folder: ttrt.save reads the suffix
            ttrt.save(compiled, str(tmp), output_format="exported_program", arg_inputs=[example])
    except (TypeError, RuntimeError) as exc:
        raise ExportError("Torch-TensorRT could not compile the student", expected="a fully compiled graph",
                          found=f"{type(exc).__name__}: {exc}", fix="use the ONNX -> TensorRT route") from exc
    return TorchTensorRTExport(path, precision, time.perf_counter() - start, ttrt.__version__)


class TorchTensorRTRunner(Runner):
    """Loads a saved Torch-TensorRT ExportedProgram and runs it on CUDA."""

    name = "torch_tensorrt"

    def __init__(self, path: str | Path, *, input_chw: tuple[int, int, int] | None = None):
        super().__init__()
        self.path = Path(path)
        self.input_chw = input_chw
        self._module = None

    def _load(self) -> None:
        require_file(self.path, "Torch-TensorRT")
        ttrt = import_torch_tensorrt()
        self._module = ttrt.load(str(self.path)).module()
        placeholders = [n for n in self._module.graph.nodes if n.op == "placeholder"]
        meta = placeholders[0].meta.get("val") if placeholders else None
        if self.input_chw is None and meta is not None:
            dims = tuple(meta.shape[1:])
            if all(isinstance(d, int) for d in dims):
                self.input_chw = dims
        if self.input_chw is None:
            raise ConfigError("Cannot read the input size of the saved program", expected="input_chw=(C, H, W)",
                              found="no static shape in the graph", fix="pass input_chw to TorchTensorRTRunner")
        self.output_names = ()
        self.info = {"runtime": f"torch_tensorrt {ttrt.__version__}", "device": "cuda", "path": str(self.path)}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = self._module(torch.from_numpy(batch).cuda())
        # The saved program returns the ExportableStudent tuple, whose order is OUTPUT_NAMES.
        self.output_names = OUTPUT_NAMES[:len(outs)]
        return {name: out.float().cpu().numpy() for name, out in zip(self.output_names, outs)}
