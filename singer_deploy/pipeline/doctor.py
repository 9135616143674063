"""`singer-deploy doctor`: what this machine can run, and what is missing for which export format.

Every line comes from asking the installed packages themselves (versions from their metadata, ONNX Runtime's
available providers, OpenVINO's devices, torch's CUDA view, the CPU's instruction sets from
singer_deploy/export/hardware.py); nothing is assumed from the platform name.
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass

from singer_deploy import __version__
from singer_deploy.errors import SingerDeployError


@dataclass(frozen=True)
class Check:
    topic: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"[{'ok' if self.ok else '--'}] {self.topic}: {self.detail}"


def doctor_checks() -> list[Check]:
    """Runtimes, devices, CPU capabilities, then one line per export format (available, or what is missing)."""
    from singer_deploy.export.golden import package_version

    checks = [Check("singer-deploy", True, f"{__version__} on Python {platform.python_version()} "
                                           f"({platform.machine()}, {platform.system()})")]
    cuda = _cuda(checks)
    ort_providers = _onnxruntime(checks)
    openvino = _openvino(checks)
    checks.append(_cpu())
    trt_version = package_version("tensorrt")
    checks.append(Check("TensorRT", trt_version is not None and cuda,
                        f"{trt_version or 'not installed'}"
                        + ("" if cuda or trt_version is None else " (no CUDA device: cannot build engines)")))
    for name in ("polygraphy", "torch-tensorrt", "nncf", "tensorboard"):
        version = package_version(name)
        checks.append(Check(name, version is not None, version or "not installed"))
    checks += _formats(ort_providers, openvino, cuda, trt_version is not None,
                       package_version("torch-tensorrt") is not None, package_version("nncf") is not None)
    return checks


def _cuda(checks: list[Check]) -> bool:
    import torch

    available = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else []
    checks.append(Check("torch", True, f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"))
    checks.append(Check("CUDA", available, ", ".join(devices) if available else "no CUDA device visible to torch"))
    return available


def _onnxruntime(checks: list[Check]) -> list[str]:
    from singer_deploy.export.runtimes import conflicting_builds_message, import_onnxruntime, installed_ort_builds

    builds = installed_ort_builds()
    try:
        ort = import_onnxruntime()
    except SingerDeployError as err:
        checks.append(Check("ONNX Runtime", False, err.fix or str(err)))
        return []
    providers = list(ort.get_available_providers())
    checks.append(Check("ONNX Runtime", True, f"{ort.__version__} ({', '.join(builds) or 'unknown build'}); "
                                              f"providers {', '.join(providers)}"))
    conflict = conflicting_builds_message(builds)
    if conflict:
        checks.append(Check("ONNX Runtime builds", False, conflict))
    return providers


def _openvino(checks: list[Check]) -> bool:
    try:
        ov = importlib.import_module("openvino")
    except ImportError:
        checks.append(Check("OpenVINO", False, "not installed (pip install 'singer-deploy[cpu]')"))
        return False
    from singer_deploy.export.openvino_core import openvino_core

    devices = openvino_core().available_devices
    checks.append(Check("OpenVINO", bool(devices), f"{ov.__version__}; devices {', '.join(devices) or 'none'}"))
    return bool(devices)


def _cpu() -> Check:
    from singer_deploy.export.hardware import host_capabilities

    caps = host_capabilities()
    return Check("CPU", caps.avx2, f"{caps.summary()}; native precisions {', '.join(caps.native_precisions())}")


def _formats(ort_providers: list[str], openvino: bool, cuda: bool, tensorrt: bool, torch_tensorrt: bool,
             nncf: bool) -> list[Check]:
    """One line per export format: usable here, or what it lacks."""
    def line(name: str, missing: list[str], note: str = "") -> Check:
        return Check(f"format {name}", not missing, ("missing " + "; ".join(missing)) if missing else
                     f"available{note}")

    gpu_ort = [p for p in ort_providers if p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]
    return [
        line("onnx", [] if ort_providers else ["an ONNX Runtime build (pip install 'singer-deploy[cpu]' or "
                                               "'[gpu]')"],
             f" (fp32/fp16/int8; runs on {gpu_ort[0] if gpu_ort else 'CPUExecutionProvider'})"),
        line("openvino", [] if openvino else ["openvino (pip install 'singer-deploy[cpu]')"],
             " (fp32/fp16" + ("/int8)" if nncf else "; int8 needs nncf)")),
        line("tensorrt", [w for w, ok in (("tensorrt (pip install 'singer-deploy[gpu]')", tensorrt),
                                          ("a CUDA GPU", cuda)) if not ok]),
        line("torch_tensorrt", [w for w, ok in (("torch-tensorrt (pip install 'singer-deploy[gpu]')", torch_tensorrt),
                                                ("a CUDA GPU", cuda)) if not ok]),
    ]


def doctor_report() -> str:
    return "\n".join(check.line() for check in doctor_checks())
