"""Regression tests for exported engines, for your own CI (pytest picks up the `golden_check` fixture that
singer-deploy installs as a pytest plugin).

    RUN_DIR=runs/demo pytest examples/test_my_engines.py

Each test re-runs an exported artifact on the golden bundle written at export time (inputs, reference outputs,
tolerances, model hash, environment fingerprint) and fails with the parity table when it drifts. An artifact whose
runtime is missing on this machine (e.g. a TensorRT engine on a CPU box) is skipped with the reason.
"""

import os
from pathlib import Path

import pytest

RUN_DIR = Path(os.environ.get("RUN_DIR", "runs/demo"))
ARTIFACTS = {
    "onnx-fp32": "export/student.onnx",
    "openvino-fp32": "export/student_fp32.xml",
    "openvino-fp16": "export/student_fp16.xml",
}


@pytest.mark.parametrize("bundle, artifact", sorted(ARTIFACTS.items()))
def test_exported_artifact_still_matches_its_golden(golden_check, bundle, artifact):
    if not (RUN_DIR / artifact).is_file():
        pytest.skip(f"{RUN_DIR / artifact} does not exist: run `singer-deploy demo` first or set RUN_DIR")
    golden_check(RUN_DIR / artifact, RUN_DIR / "export" / "goldens" / bundle)
