"""ONNX Runtime builds: a clear error when none is installed, a warning when two fight over one import name,
and extras in pyproject.toml that never put two builds into one environment."""

from __future__ import annotations

import importlib
import logging
import sys
import tomllib
from pathlib import Path

import pytest

from singer_deploy.errors import BackendUnavailableError
from singer_deploy.export import runtimes

ROOT = Path(__file__).resolve().parents[1]


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_extras_never_install_two_ort_builds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    builds = set(runtimes.ORT_BUILDS)
    assert not core & builds, "the core must depend on no ONNX Runtime build"
    assert extras["cpu"] >= {"onnxruntime", "openvino", "nncf"}
    assert extras["gpu"] & builds == {"onnxruntime-gpu"}
    assert "onnxruntime" not in extras["gpu"]


def test_missing_onnxruntime_is_a_clear_backend_error(monkeypatch):
    runtimes.import_onnxruntime.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees without any build
    try:
        with pytest.raises(BackendUnavailableError, match=r"singer-deploy\[cpu\]"):
            runtimes.import_onnxruntime()
    finally:
        runtimes.import_onnxruntime.cache_clear()


def test_two_builds_warn_with_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(runtimes, "installed_ort_builds", lambda: ("onnxruntime", "onnxruntime-gpu"))
    runtimes.import_onnxruntime.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=runtimes.__name__):
            assert runtimes.import_onnxruntime() is importlib.import_module("onnxruntime")
    finally:
        runtimes.import_onnxruntime.cache_clear()
    assert "onnxruntime and onnxruntime-gpu are installed together" in caplog.text
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in caplog.text


def test_one_build_is_quiet():
    assert runtimes.conflicting_builds_message(("onnxruntime",)) is None
    assert runtimes.installed_ort_builds()  # the test extra installs exactly one build
