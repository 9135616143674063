"""One exception family. Every message says what was expected, what was found and what to do next."""

from __future__ import annotations


class SingerDeployError(Exception):
    """Base class of every error this SDK raises on purpose."""

    def __init__(self, problem: str, *, expected: str | None = None, found: str | None = None,
                 fix: str | None = None):
        parts = [problem.rstrip(".") + "."]
        if expected is not None:
            parts.append(f"Expected: {expected}.")
        if found is not None:
            parts.append(f"Found: {found}.")
        if fix is not None:
            parts.append(f"Fix: {fix}.")
        super().__init__(" ".join(parts))
        self.problem, self.expected, self.found, self.fix = problem, expected, found, fix


class ConfigError(SingerDeployError, ValueError):
    """A configuration value or combination is invalid (raised before any work starts)."""


class ModelError(SingerDeployError, ValueError):
    """A model name, weights file, state dict or layer index does not fit."""


class DataError(SingerDeployError, ValueError):
    """An image source is missing, empty, or holds only unreadable files."""


class TrainingError(SingerDeployError, RuntimeError):
    """Distillation cannot go on (for example a non-finite loss)."""


class ExportError(SingerDeployError, RuntimeError):
    """An export, build or runner step failed."""


class BackendUnavailableError(ExportError):
    """The runtime a backend needs (TensorRT, CUDA, OpenVINO ...) is not installed or has no device here."""


class ParityError(SingerDeployError, AssertionError):
    """An exported artifact disagrees with PyTorch beyond its precision's gate.

    `report` holds the measured numbers so callers (and the CLI) can print them.
    """

    def __init__(self, problem: str, *, report: dict | None = None, **kwargs):
        super().__init__(problem, **kwargs)
        self.report = report or {}
