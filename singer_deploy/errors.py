"""One exception family. Every message says what was expected, what was found and what to do next."""

from __future__ import annotations

import os


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


class StorageError(SingerDeployError, OSError):
    """A file or directory cannot be written or read: the disk is full, the place is read-only, a path that should
    be a directory is a file, or another run holds the output directory."""


class RunLockedError(StorageError):
    """Another live run holds the output directory's lock."""


# The one exit-code contract of the command line (README "Exit codes"). Exit 1 is only ever a failed parity gate.
EXIT_OK, EXIT_PARITY, EXIT_INPUT, EXIT_BACKEND, EXIT_TRAINING, EXIT_IO = 0, 1, 2, 3, 4, 5
# Checked in order: a subclass before its base (BackendUnavailableError is an ExportError, StorageError an OSError).
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ParityError, EXIT_PARITY), (BackendUnavailableError, EXIT_BACKEND), (TrainingError, EXIT_TRAINING),
    (StorageError, EXIT_IO), (SingerDeployError, EXIT_INPUT), (OSError, EXIT_IO))


def exit_code(error: BaseException) -> int | None:
    """The documented exit code of an error, or None when it is not one this SDK raises on purpose (a bug)."""
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return code
    return None


def shown_path(path) -> str:
    """A path as a message shows it: a relative one with the directory it was resolved against (the working
    directory), so "does not exist" says where it was looked for."""
    text = str(path)
    return text if os.path.isabs(text) else f"{text} (resolved against {os.getcwd()})"


def whole_sentences(text: str, limit: int = 300) -> str:
    """The first line of a library's message, cut at a sentence end within `limit` characters, never mid-sentence
    (the first sentence is kept whole even when longer)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    kept: list[str] = []
    for sentence in line.replace(". ", ".\n").split("\n"):
        if kept and len(" ".join([*kept, sentence])) > limit:
            break
        kept.append(sentence)
    return " ".join(kept)
