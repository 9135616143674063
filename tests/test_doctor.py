"""`singer-deploy doctor` on this machine: every runtime line is asked from the installed packages."""

import importlib
import importlib.metadata

import pytest

from singer_deploy.export import runtimes
from singer_deploy.export.hardware import host_capabilities
from singer_deploy.pipeline.doctor import doctor_checks


@pytest.fixture(scope="module")
def checks():
    return {check.topic: check for check in doctor_checks()}


def test_doctor_reports_the_runtimes_installed_here(checks):
    ort = importlib.import_module("onnxruntime")
    assert checks["ONNX Runtime"].ok and ort.__version__ in checks["ONNX Runtime"].detail
    assert "CPUExecutionProvider" in checks["ONNX Runtime"].detail
    assert checks["OpenVINO"].ok and "CPU" in checks["OpenVINO"].detail
    assert checks["CPU"].detail.startswith(host_capabilities().summary())
    assert checks["polygraphy"].detail == importlib.metadata.version("polygraphy")
    assert checks["format onnx"].ok and checks["format openvino"].ok


def test_doctor_names_what_tensorrt_lacks(checks):
    import torch

    try:
        importlib.metadata.version("tensorrt")
        has_trt = True
    except importlib.metadata.PackageNotFoundError:
        has_trt = False
    trt = checks["format tensorrt"]
    assert trt.ok == (has_trt and torch.cuda.is_available())
    if not has_trt:
        assert "tensorrt (pip install 'singer-deploy[gpu]')" in trt.detail
    if not torch.cuda.is_available():
        assert "a CUDA GPU" in trt.detail and not checks["CUDA"].ok


def test_doctor_flags_two_ort_builds(monkeypatch):
    monkeypatch.setattr(runtimes, "installed_ort_builds", lambda: ("onnxruntime", "onnxruntime-gpu"))
    flagged = {check.topic: check for check in doctor_checks()}["ONNX Runtime builds"]
    assert not flagged.ok and "pip uninstall -y onnxruntime onnxruntime-gpu" in flagged.detail
