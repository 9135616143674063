"""The Runner contract every backend obeys (the Polygraphy idea), input checks, and the eager PyTorch reference.

    runner = SomeRunner(path_or_module, ...).load()
    outputs = runner.run(batch)          # batch: float32 (B, C, H, W) -> {"cls": ..., "patch_tokens": ..., ...}
    runner.name, runner.info             # what ran (provider, device, precision hint, exporter ...)

Parity, goldens and benchmarks only see this contract, never a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import nn

from singer_deploy.errors import DataError, ExportError, shown_path
from singer_deploy.export.student import ExportableStudent


def require_file(path: str | Path, what: str) -> Path:
    """The artifact must exist before a runtime is asked to open it (runtimes word this error poorly)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"The {what} artifact does not exist", expected="an existing file", found=shown_path(path),
                          fix="export it first (singer_deploy.export.export_student) or check the path")
    return path


def validate_batch(batch: object, chw: tuple[int, int, int] | None, runner: str) -> np.ndarray:
    """Reject what would otherwise fail deep inside a runtime (or, worse, be silently cast)."""
    if isinstance(batch, torch.Tensor):
        raise DataError(f"{runner} takes a NumPy batch", expected="numpy.ndarray", found="torch.Tensor",
                        fix="pass tensor.detach().cpu().numpy()")
    if not isinstance(batch, np.ndarray):
        raise DataError(f"{runner} takes a NumPy batch", expected="numpy.ndarray", found=type(batch).__name__,
                        fix="stack the images into one float32 array of shape (B, C, H, W)")
    if batch.dtype != np.float32:
        raise DataError(f"{runner} takes float32 images", expected="dtype float32", found=f"dtype {batch.dtype}",
                        fix="normalise the images and cast with batch.astype(np.float32)")
    if batch.ndim != 4:
        raise DataError(f"{runner} takes a batch of images", expected="rank 4 (B, C, H, W)",
                        found=f"shape {tuple(batch.shape)}", fix="add the batch axis with batch[None]")
    if batch.shape[0] < 1:
        raise DataError(f"{runner} got an empty batch", expected="B >= 1", found=f"shape {tuple(batch.shape)}",
                        fix="pass at least one image")
    if chw is not None and tuple(batch.shape[1:]) != tuple(chw):
        raise DataError(f"{runner}: the artifact was exported for a fixed image size",
                        expected=f"(B, {chw[0]}, {chw[1]}, {chw[2]})", found=f"shape {tuple(batch.shape)}",
                        fix="resize the images to the exported resolution or export again at this size")
    return np.ascontiguousarray(batch)


class Runner(ABC):
    """Load once, run many batches; outputs are float32 NumPy arrays keyed by output name."""

    name: str = "runner"

    def __init__(self) -> None:
        self.info: dict = {}
        self.input_chw: tuple[int, int, int] | None = None
        self.output_names: tuple[str, ...] = ()
        self._loaded = False

    def load(self) -> "Runner":
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.load()
        batch = validate_batch(batch, self.input_chw, self.name)
        return {k: np.asarray(v, dtype=np.float32) for k, v in self._run(batch).items()}

    @abstractmethod
    def _load(self) -> None:
        """Open the artifact; set input_chw, output_names and info."""

    @abstractmethod
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a validated batch."""


class TorchRunner(Runner):
    """The eager PyTorch reference every exported artifact is compared with."""

    name = "torch"

    def __init__(self, student: nn.Module, *, projector: nn.Module | None = None, device: str = "cpu"):
        super().__init__()
        self.module = student if isinstance(student, ExportableStudent) else ExportableStudent(student, projector)
        self.device = torch.device(device)

    def _load(self) -> None:
        self.module = self.module.eval().to(self.device)
        self.input_chw = self.module.input_chw
        self.output_names = self.module.output_names
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.module.parameters()})
        self.info = {"runtime": f"torch {torch.__version__}", "device": str(self.device),
                     "cls_source": self.module.cls_source,
                     "realised_precision": {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(
                         dtypes[0], dtypes[0]) if len(dtypes) == 1 else " + ".join(dtypes)}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = self.module(torch.from_numpy(batch).to(self.device))
        return {name: out.float().cpu().numpy() for name, out in zip(self.output_names, outs)}
