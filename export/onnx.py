"""ONNX export of the student (torch.onnx dynamo exporter, TorchScript only as a recorded fallback) and its runner.

Facts this follows (docs/export.md, "ONNX"): trace with batch >= 2 because torch.export
specialises size-1 dims; opset >= 18 so LayerNormalization stays one node (TensorRT keeps its precision); explicit
attention (timm's `exportable` behaviour) so runtimes see a plain MatMul-Softmax-MatMul; one fixed resolution per
file because bicubic+antialias position-embedding resampling does not export faithfully.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from singer_deploy.devices import on_cpu
from singer_deploy.errors import ConfigError, ExportError
from singer_deploy.export.realised_runtime import onnxruntime_realised
from singer_deploy.export.runner import Runner, require_file
from singer_deploy.export.runtimes import import_onnxruntime
from singer_deploy.export.student import INPUT_NAME, ExportableStudent
from singer_deploy.io import atomic_path

DEFAULT_OPSET = 18
_META_PREFIX = "singer_deploy."
# Highest opset the TorchScript exporter writes (torch >= 2.9 caps it at 20).
_TORCHSCRIPT_MAX_OPSET = 20


@dataclass
class OnnxExport:
    path: Path
    exporter: str                  # "dynamo" or "torchscript"
    opset: int
    dynamic_batch: bool
    output_names: tuple[str, ...]
    seconds: float
    simplified: bool = False
    fallback_reason: str | None = None   # why the dynamo exporter was not used
    notes: tuple[str, ...] = ()


@contextlib.contextmanager
def explicit_attention(module: nn.Module) -> Iterator[None]:
    """Temporarily turn off fused SDPA in timm attention blocks (what timm's `exportable=True` does)."""
    switched = [m for m in module.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in switched:
            m.fused_attn = True


def example_batch(wrapper: ExportableStudent, batch: int) -> torch.Tensor:
    """A seeded random (batch, C, H, W) input to trace the student with."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *wrapper.input_chw, generator=generator)


def _export_dynamo(wrapper: ExportableStudent, x: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    torch.onnx.export(wrapper, (x,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                      output_names=list(wrapper.output_names), external_data=False, verbose=False,
                      dynamic_shapes=({0: "batch"},) if dynamic else None)


def _export_torchscript(wrapper: ExportableStudent, x: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    names = [INPUT_NAME, *wrapper.output_names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy exporter's deprecation notice: we record the fallback instead
        torch.onnx.export(wrapper, (x,), str(path), dynamo=False, opset_version=min(opset, _TORCHSCRIPT_MAX_OPSET),
                          input_names=[INPUT_NAME], output_names=list(wrapper.output_names),
                          dynamic_axes={n: {0: "batch"} for n in names} if dynamic else None,
                          do_constant_folding=True)


def _stamp_metadata(path: Path, values: dict[str, str]) -> None:
    """Record how the file was made inside the file itself (ONNX metadata_props), so the runner can report it."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if not p.key.startswith(_META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=_META_PREFIX + key, value=value)
    onnx.save(model, str(path))


def check_onnx(path: str | Path) -> None:
    """Full ONNX checker (shape inference included); raises ExportError with the checker's message."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError("The exported ONNX file does not pass onnx.checker", expected="a valid ONNX model",
                          found=str(exc).splitlines()[0], fix="report the exporter and opset in the issue") from exc


def simplify_onnx(path: Path, x: np.ndarray) -> tuple[bool, str]:
    """Rewrite with onnxslim when installed, keeping the rewrite only if it still matches the original."""
    if importlib.util.find_spec("onnxslim") is None:
        return False, "simplify requested but onnxslim is not installed (pip install onnxslim); kept the export"
    import onnxslim

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        slim_path = Path(tmp) / path.name
        onnxslim.slim(str(path), str(slim_path))
        before = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]).run(x)
        after = OnnxRuntimeRunner(slim_path, providers=["CPUExecutionProvider"]).run(x)
        worst = max(float(np.max(np.abs(before[k] - after[k])) / max(float(np.max(np.abs(before[k]))), 1e-30))
                    for k in before)
        if worst > 1e-5:
            return False, f"onnxslim changed outputs by {worst:.2e} (scale-relative); kept the unsimplified export"
        os.replace(slim_path, path)
    return True, "simplified with onnxslim and re-verified"


def _export_graph(wrapper: ExportableStudent, x: torch.Tensor, path: Path, opset: int,
                  dynamic: bool) -> tuple[str, str | None, float]:
    """Write the graph to `path` with the dynamo exporter, else TorchScript; (exporter, fallback reason, seconds)."""
    start = time.perf_counter()
    exporter, fallback_reason = "dynamo", None
    with explicit_attention(wrapper), torch.no_grad():
        try:
            _export_dynamo(wrapper, x, path, opset, dynamic)
        except Exception as exc:  # any dynamo failure: the legacy exporter is the documented fallback
            exporter, fallback_reason = "torchscript", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            try:
                _export_torchscript(wrapper, x, path, opset, dynamic)
            except Exception as exc2:
                raise ExportError("Both ONNX exporters failed", expected="a traceable student graph",
                                  found=f"dynamo: {fallback_reason}; torchscript: {type(exc2).__name__}: {exc2}",
                                  fix="check that the student is a timm ViT at a fixed img_size") from exc2
    return exporter, fallback_reason, time.perf_counter() - start


def export_onnx(student: nn.Module, path: str | Path, *, projector: nn.Module | None = None,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, trace_batch: int = 2,
                simplify: bool = False) -> OnnxExport:
    """Export the student graph (cls, patch_tokens[, projected]) to one self-contained ONNX file."""
    if opset < 18:
        raise ConfigError("ONNX opset too old for this exporter", expected="opset >= 18", found=str(opset),
                          fix="use opset 18 or newer (LayerNormalization needs >= 17, the dynamo exporter 18)")
    if dynamic_batch and trace_batch < 2:
        raise ConfigError("A dynamic batch must be traced with batch >= 2", expected="trace_batch >= 2",
                          found=str(trace_batch), fix="torch.export specialises size-1 dims; use trace_batch=2")
    wrapper = student if isinstance(student, ExportableStudent) else ExportableStudent(student, projector)
    wrapper = on_cpu(wrapper)   # traced on the CPU in fp32 (singer_deploy.devices)
    path = Path(path)
    x = example_batch(wrapper, trace_batch)
    # Exported, stamped, checked (and simplified) under a temporary name: the final name only ever holds a complete
    # file (a kill mid-export or mid-stamp leaves the previous file or none; singer_deploy/io.py).
    with atomic_path(path) as tmp:
        exporter, fallback_reason, seconds = _export_graph(wrapper, x, tmp, opset, dynamic_batch)
        import onnx

        written_opset = next((o.version for o in onnx.load(str(tmp), load_external_data=False).opset_import
                              if o.domain in ("", "ai.onnx")), opset)
        _stamp_metadata(tmp, {"exporter": exporter, "output_names": ",".join(wrapper.output_names),
                              "cls_source": wrapper.cls_source, "torch": torch.__version__})
        check_onnx(tmp)
        notes: tuple[str, ...] = ()
        simplified = False
        if simplify:
            simplified, note = simplify_onnx(tmp, x.numpy())
            notes = (note,)
            check_onnx(tmp)
    return OnnxExport(path, exporter, int(written_opset), dynamic_batch, wrapper.output_names, seconds,
                      simplified, fallback_reason, notes)


def preferred_providers() -> list[str]:
    """TensorRT > CUDA > CPU among the providers this onnxruntime build has."""
    available = set(import_onnxruntime().get_available_providers())
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in available]


class OnnxRuntimeRunner(Runner):
    """Runs an exported .onnx file with ONNX Runtime; `info["provider"]` is the provider that actually runs."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, providers: list[str] | None = None, num_threads: int | None = None,
                 optimize: bool = True):
        super().__init__()
        self.path = Path(path)
        self.providers = providers
        self.num_threads = num_threads
        self.optimize = optimize
        self._session = None
        self._input_name = INPUT_NAME

    def _load(self) -> None:
        ort = import_onnxruntime()
        require_file(self.path, "ONNX")
        options = ort.SessionOptions()
        if self.num_threads:
            options.intra_op_num_threads = self.num_threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        with tempfile.TemporaryDirectory() as profile_dir:
            # One profiled call names the kernels the session really runs (realised precision); profiling ends
            # with it, so later (timed) calls are not profiled.
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "ort")
            try:
                self._session = ort.InferenceSession(str(self.path), options,
                                                     providers=self.providers or preferred_providers())
            except Exception as exc:
                raise ExportError("ONNX Runtime cannot open the model", expected="a valid ONNX file",
                                  found=f"{self.path}: {type(exc).__name__}: {exc}",
                                  fix="re-export it with export_onnx") from exc
            realised = onnxruntime_realised(self._profiled_call())
        (inp,) = self._session.get_inputs()
        self._input_name = inp.name
        dims = tuple(inp.shape[1:])
        self.input_chw = dims if all(isinstance(d, int) for d in dims) else None
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        meta = self._session.get_modelmeta().custom_metadata_map
        self.info = {"runtime": f"onnxruntime {ort.__version__}", "provider": self._session.get_providers()[0],
                     "providers": self._session.get_providers(), "exporter": meta.get(_META_PREFIX + "exporter"),
                     "graph_optimization": "all" if self.optimize else "disabled", **realised,
                     "path": str(self.path)}

    def _profiled_call(self) -> str:
        """Run one all-zero image (batch 1, or the graph's fixed batch) and end profiling; returns the profile."""
        (inp,) = self._session.get_inputs()
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        self._session.run(None, {inp.name: np.zeros(shape, dtype=np.float32)})
        return self._session.end_profiling()

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self._session.run(None, {self._input_name: batch})
        return dict(zip(self.output_names, outs))
