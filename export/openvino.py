"""OpenVINO IR export (FP32 for parity, FP16-compressed for deployment) and its runner.

Two OpenVINO defaults bite parity (docs/export.md, "OpenVINO"): `save_model` compresses weights to FP16 unless told
otherwise, and the CPU plugin may execute in bf16 on CPUs that support it. So the FP32 IR is saved with
compress_to_fp16=False and parity runs compile with INFERENCE_PRECISION_HINT=f32; the platform default hint is a
separate, explicitly named speed setting.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from singer_deploy.errors import BackendUnavailableError, ConfigError, ExportError
from singer_deploy.export.onnx import example_batch, explicit_attention
from singer_deploy.export.openvino_core import import_openvino, openvino_core
from singer_deploy.export.realised_runtime import openvino_realised
from singer_deploy.export.runner import Runner, require_file
from singer_deploy.export.student import INPUT_NAME, ExportableStudent
from singer_deploy.io import atomic_files

# Hint values the runner accepts; None keeps the plugin's default (bf16 on CPUs with native BF16, else f32).
PRECISION_HINTS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16", None: None,
                   "default": None}


@dataclass
class OpenVINOExport:
    fp32_xml: Path
    fp16_xml: Path | None
    source: str          # "onnx" or "torch"
    seconds: float


def _convert(source: nn.Module | str | Path, *, projector: nn.Module | None):
    ov = import_openvino()
    if isinstance(source, (str, Path)):
        path = require_file(source, "ONNX")
        return ov.convert_model(str(path)), "onnx"
    wrapper = source if isinstance(source, ExportableStudent) else ExportableStudent(source, projector)
    wrapper = wrapper.eval()
    in_chans, h, w = wrapper.input_chw
    example = example_batch(wrapper, 2)
    with explicit_attention(wrapper), torch.no_grad(), warnings.catch_warnings():
        # OpenVINO traces torch modules with torch.jit.trace, whose deprecation / tracer notices are not ours.
        warnings.simplefilter("ignore")
        model = ov.convert_model(wrapper, example_input=example, input=[(-1, in_chans, h, w)])
    # Traced torch models come without tensor names; give them the names every runner uses.
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for port, name in zip(model.outputs, wrapper.output_names):
        port.get_tensor().set_names({name})
    return model, "torch"


def export_openvino(source: nn.Module | str | Path, out_dir: str | Path, *, stem: str = "student",
                    projector: nn.Module | None = None, fp16: bool = True) -> OpenVINOExport:
    """Convert (from the exported ONNX file, or from the torch module) and save `<stem>_fp32.xml`
    (uncompressed, for parity) and, when `fp16`, `<stem>_fp16.xml` (FP16-compressed weights, for deployment)."""
    ov = import_openvino()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        model, kind = _convert(source, projector=projector)
    except (BackendUnavailableError, ExportError):
        raise
    except Exception as exc:
        raise ExportError("OpenVINO could not convert the student", expected="a convertible ONNX file or module",
                          found=f"{type(exc).__name__}: {exc}", fix="convert from the exported ONNX file") from exc
    fp32_xml = save_ir(model, out_dir / f"{stem}_fp32.xml", compress_to_fp16=False)
    fp16_xml = save_ir(model, out_dir / f"{stem}_fp16.xml", compress_to_fp16=True) if fp16 else None
    return OpenVINOExport(fp32_xml, fp16_xml, kind, time.perf_counter() - start)


def save_ir(model, xml_path: Path, *, compress_to_fp16: bool) -> Path:
    """ov.save_model as an atomic pair: the .xml and its .bin are written under temporary names and renamed into
    place once both are complete (singer_deploy/io.py, atomic_files), so a kill never leaves a truncated IR."""
    xml_path = Path(xml_path)
    with atomic_files([xml_path, xml_path.with_suffix(".bin")]) as (tmp_xml, _):
        import_openvino().save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
    return xml_path


class OpenVINORunner(Runner):
    """Compiles an IR (.xml) on `device`. inference_precision="f32" for parity; None (the platform default: bf16
    on CPUs with AMX, f32 elsewhere) or "bf16"/"f16" for speed runs. `info["realised_precision"]` is what the
    compiled model executes (export/realised_runtime.py)."""

    name = "openvino"

    def __init__(self, path: str | Path, *, device: str = "CPU", inference_precision: str | None = "f32",
                 num_threads: int | None = None, performance_hint: str = "LATENCY"):
        super().__init__()
        if inference_precision not in PRECISION_HINTS:
            raise ConfigError("Unknown OpenVINO inference precision hint",
                              expected="f32, bf16, f16 or None (platform default)",
                              found=repr(inference_precision), fix="use 'f32' for parity runs")
        self.path = Path(path)
        self.device = device
        self.hint = PRECISION_HINTS[inference_precision]
        self.num_threads = num_threads
        self.performance_hint = performance_hint
        self._compiled = None

    def _load(self) -> None:
        ov = import_openvino()
        require_file(self.path, "OpenVINO IR")
        if not self.path.with_suffix(".bin").is_file():
            raise ExportError("The OpenVINO IR has no weights file next to it", expected="<name>.bin beside .xml",
                              found=f"{self.path} without {self.path.with_suffix('.bin').name}",
                              fix="copy the .xml and .bin together")
        core = openvino_core()
        config: dict[str, object] = {"PERFORMANCE_HINT": self.performance_hint}
        if self.hint is not None:
            config["INFERENCE_PRECISION_HINT"] = self.hint
        if self.num_threads:
            config["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        try:
            self._compiled = core.compile_model(core.read_model(str(self.path)), self.device, config)
        except Exception as exc:
            raise ExportError("OpenVINO cannot compile the IR", expected=f"an IR that runs on {self.device}",
                              found=f"{type(exc).__name__}: {exc}", fix="check the device name and the IR") from exc
        shape = self._compiled.inputs[0].get_partial_shape()
        dims = shape[1:]
        self.input_chw = (tuple(int(d.get_length()) for d in dims) if all(d.is_static for d in dims) else None)
        self.output_names = tuple(port.get_any_name() for port in self._compiled.outputs)
        realised = openvino_realised(self._compiled)
        self.info = {"runtime": f"openvino {ov.get_version()}", "device": self.device,
                     "inference_precision": realised.pop("inference_precision_hint"),
                     "requested_precision_hint": self.hint or "default", **realised, "path": str(self.path)}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self._compiled(batch)
        return {name: np.asarray(result[port]) for name, port in zip(self.output_names, self._compiled.outputs)}
