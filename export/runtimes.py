"""Which ONNX Runtime build is installed, and importing it with a clear error when none is.

The core package depends on no ONNX Runtime build (pyproject.toml): `pip install 'singer-deploy[cpu]'` brings
`onnxruntime`, `'singer-deploy[gpu]'` brings `onnxruntime-gpu`. Every build installs the same `onnxruntime`
import package, so with two of them the files of the one installed last overwrite the other's and the CUDA /
TensorRT providers can disappear without an error; `import_onnxruntime` warns once when it sees that.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from types import ModuleType

from singer_deploy.errors import BackendUnavailableError

log = logging.getLogger(__name__)

# Distributions on PyPI that install the `onnxruntime` import package.
ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn",
              "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-training")
INSTALL_FIX = "pip install 'singer-deploy[cpu]' (CPU) or 'singer-deploy[gpu]' (NVIDIA GPU), one of the two"
BOTH_BUILDS_FIX = ("keep one: pip uninstall -y {builds} && pip install {keep} "
                   "(or reinstall with the single extra you need)")


def installed_ort_builds() -> tuple[str, ...]:
    """The ONNX Runtime distributions installed here, e.g. ("onnxruntime",) or ("onnxruntime", "onnxruntime-gpu")."""
    found = []
    for name in ORT_BUILDS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def conflicting_builds_message(builds: tuple[str, ...]) -> str | None:
    """A warning text when more than one ONNX Runtime build is installed, else None."""
    if len(builds) < 2:
        return None
    keep = next((b for b in builds if b != "onnxruntime"), builds[0])
    return (f"{' and '.join(builds)} are installed together; they share the `onnxruntime` import package, so the one "
            f"installed last decides which execution providers exist (GPU providers can silently disappear). Fix: "
            + BOTH_BUILDS_FIX.format(builds=" ".join(builds), keep=keep))


@functools.lru_cache(maxsize=1)
def import_onnxruntime() -> ModuleType:
    """`onnxruntime`, or BackendUnavailableError naming the extra to install; warns once about two builds."""
    message = conflicting_builds_message(installed_ort_builds())
    if message:
        log.warning(message)
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise BackendUnavailableError("No ONNX Runtime is installed here",
                                      expected=f"one of the distributions {', '.join(ORT_BUILDS[:2])}",
                                      found=f"ImportError: {exc}", fix=INSTALL_FIX) from exc
