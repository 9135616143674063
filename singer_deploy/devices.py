"""Where each stage runs: the one device rule of the pipeline.

    training      runs on `train.device` ("auto": CUDA when available, else CPU; under torchrun the local rank's
                  GPU). `distill()` returns the student, projectors and refiner on that device, in fp32 weights
                  (`DistillResult.device`); the caller's teacher is never moved or cast: training uses its own
                  frozen copy.
    every later   stage accepts modules and images wherever they are and moves what it needs itself:
                  - export, parity and latency benchmarks work on CPU copies (ONNX Runtime's CPU provider and
                    OpenVINO are CPU runtimes; the eager reference must run where the artifact's numerics are
                    comparable), unless the runtime is a GPU one (TensorRT, Torch-TensorRT);
                  - artifact analysis runs on the device of the trained student in batches and moves its results
                    to the CPU once, at the end;
                  - reports, manifests and goldens only ever see CPU NumPy arrays.
No stage assumes where a module lives; `module_device` reads it, `cpu_copy` makes the CPU twin an exporter needs.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

def training_device(name: str) -> torch.device:
    """The device training runs on for a `train.device` setting ("auto", "cpu" or "cuda")."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if dist.is_initialized() and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a `train.precision` on a device ("auto": bf16 on CUDA, fp32 on CPU); None for fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_for(precision: str, device: torch.device):
    """The autocast context of a `train.precision` on a device (a no-op context for fp32)."""
    dtype = compute_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module without either."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def on_cpu(module: nn.Module) -> nn.Module:
    """`module` itself (in eval mode) when it already lives on the CPU in fp32, else its `cpu_copy`."""
    if module_device(module).type == "cpu" and all(p.dtype == torch.float32 for p in module.parameters()):
        return module.eval()
    return cpu_copy(module)


def cpu_copy(module: nn.Module) -> nn.Module:
    """An fp32 CPU copy of `module` in eval mode; the original stays where it is (e.g. on the training GPU).

    Tensors are copied one by one onto the CPU (deepcopy's memo), so a GPU module never needs a second GPU copy."""
    memo: dict[int, torch.Tensor] = {}
    for parameter in module.parameters():
        memo[id(parameter)] = nn.Parameter(parameter.detach().to("cpu", copy=True),
                                           requires_grad=parameter.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.detach().to("cpu", copy=True)
    return copy.deepcopy(module, memo=memo).float().eval()
