"""One OpenVINO Core per process: with two, the CPU plugin leaves the thread on a freed signal stack and the next
Python signal handler segfaults (export/openvino_core.py; docs/export.md, "One OpenVINO Core per process")."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="OpenVINO is not installed (the [cpu] extra)")

ROOT = Path(__file__).resolve().parents[1]

# Runners opened and dropped out of order, the capability probe and a model read, then a signal whose Python handler
# needs the thread's alternate signal stack (as Ctrl-C or a DataLoader's SIGCHLD would).
SCRIPT = textwrap.dedent("""
    import gc, os, signal
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops
    from singer_deploy.export.hardware import host_capabilities
    from singer_deploy.export.openvino import OpenVINORunner
    from singer_deploy.export.openvino_core import openvino_core

    x = ops.parameter([1, 3, 8, 8], np.float32, name="images")
    ov.save_model(ov.Model([ops.relu(x)], [x]), "tiny.xml", compress_to_fp16=False)
    host_capabilities()
    first, second = OpenVINORunner("tiny.xml").load(), OpenVINORunner("tiny.xml").load()
    first.run(np.ones((1, 3, 8, 8), np.float32))
    del first; gc.collect()
    openvino_core().read_model("tiny.xml")
    del second; gc.collect()
    handled = []
    signal.signal(signal.SIGUSR1, lambda *_: handled.append(True))
    os.kill(os.getpid(), signal.SIGUSR1)
    print("handled" if handled else "not handled")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="the signal alternate stack check is Linux-specific")
def test_a_signal_after_openvino_runners_come_and_go_is_handled(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode} (-11 is the segfault)\n{result.stderr[-2000:]}"
    assert result.stdout.strip().endswith("handled") and "not handled" not in result.stdout


def test_the_package_makes_no_core_of_its_own():
    """Every `Core()` goes through openvino_core(): a second Core is what brings the crash back."""
    offenders = []
    for folder in ("singer_deploy", "export", "calibration", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "openvino_core.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Core"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
