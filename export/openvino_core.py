"""The OpenVINO import and the process's one `ov.Core`, in a module without torch so capability probes stay light.

Why one Core per process (docs/export.md, "One OpenVINO Core per process"): every `ov.Core` loads its own CPU plugin,
and the plugin installs a signal alternate stack on the thread that loads it and puts back the one it found when it is
destroyed. With two plugins alive, that put-back is not last-in-first-out: the thread is left pointing at the freed
stack of the first plugin, and the next Python signal handler (Ctrl-C, a DataLoader's SIGCHLD) segfaults the process.
One Core that lives as long as the process keeps its plugin, and so the stack, alive.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from singer_deploy.errors import BackendUnavailableError


def import_openvino() -> ModuleType:
    try:
        return importlib.import_module("openvino")
    except ImportError as exc:
        raise BackendUnavailableError("OpenVINO is not installed here", expected="the openvino package",
                                      found=f"ImportError: {exc}", fix="pip install 'singer-deploy[cpu]' (openvino + nncf)") from exc


@functools.cache
def openvino_core():
    """The `ov.Core` every OpenVINO call of this package uses (see the module docstring for why only one)."""
    return import_openvino().Core()
