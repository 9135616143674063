"""Golden reference sets in NVIDIA Polygraphy's own formats, so `polygraphy run` checks an artifact against them.

    polygraphy run student.onnx --onnxrt --load-inputs goldens/reference/polygraphy_inputs.json \
        --load-outputs goldens/reference/polygraphy_outputs.json --atol cls:... --rtol 0 --check-error-stat max

The inputs file is a Polygraphy data-loader JSON (a list of feed dicts, `polygraphy.json.save_json`), the outputs
file a `RunResults` of one iteration (`RunResults.save`), both written through Polygraphy's public API. Polygraphy
compares elementwise errors, not our cosine / kNN metrics, so each bundle records the command with tolerances
translated from its parity policy (`polygraphy_tolerances`): where the policy gates the scale-relative max abs
error (FP32) the translation is exact (atol = max_abs_rel x max|reference|, error stat "max"); for reduced
precisions it is an approximation of the p99 token error gate (atol = rel_err_p99 x RMS of the reference, error
stat "quantile" at 0.99). Our `verify` stays the full check.
"""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path
from types import ModuleType

import numpy as np

from singer_deploy.config import ParityPolicy
from singer_deploy.errors import BackendUnavailableError
from singer_deploy.export.student import INPUT_NAME
from singer_deploy.io import atomic_path

INPUTS_NAME, OUTPUTS_NAME = "polygraphy_inputs.json", "polygraphy_outputs.json"
RESULTS_RUNNER = "singer-deploy-golden"
ERROR_QUANTILE = 0.99
# Polygraphy's runner flags per artifact suffix; it has no OpenVINO runner.
_RUNNER_FLAGS = {".onnx": ("--onnxrt",), ".engine": ("--trt", "--model-type", "engine")}


def import_polygraphy() -> ModuleType:
    try:
        return importlib.import_module("polygraphy")
    except ImportError as exc:
        raise BackendUnavailableError("Polygraphy is not installed here", expected="the polygraphy package",
                                      found=f"ImportError: {exc}",
                                      fix="pip install 'singer-deploy[polygraphy]' (pure Python, any machine)") from exc


def write_polygraphy_reference(reference_dir: str | Path, inputs: np.ndarray, outputs: dict[str, np.ndarray],
                               input_name: str = INPUT_NAME) -> tuple[Path, Path]:
    """Write `polygraphy_inputs.json` (one iteration feeding `inputs`) and `polygraphy_outputs.json` (the
    reference outputs as one iteration of a RunResults) into reference_dir; returns both paths."""
    import_polygraphy()
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    reference_dir = Path(reference_dir)
    inputs_path, outputs_path = reference_dir / INPUTS_NAME, reference_dir / OUTPUTS_NAME
    with atomic_path(inputs_path) as tmp:
        save_json([{input_name: np.ascontiguousarray(inputs, np.float32)}], str(tmp))
    results = RunResults([(RESULTS_RUNNER, [IterationResult(
        {k: np.ascontiguousarray(v, np.float32) for k, v in outputs.items()}, runner_name=RESULTS_RUNNER)])])
    with atomic_path(outputs_path) as tmp:
        results.save(str(tmp))
    return inputs_path, outputs_path


def polygraphy_tolerances(policy: ParityPolicy, outputs: dict[str, np.ndarray]) -> dict[str, tuple[float, str]]:
    """{output: (atol, error stat)} translating `policy` into Polygraphy's elementwise comparator (module doc)."""
    tolerances = {}
    for name, array in outputs.items():
        array = np.asarray(array, np.float64)
        if policy.max_abs_rel is not None:
            tolerances[name] = (policy.max_abs_rel * float(np.abs(array).max()), "max")
        else:
            tolerances[name] = ((policy.rel_err_p99 or 0.0) * float(np.sqrt(np.mean(array ** 2))), "quantile")
    return tolerances


def polygraphy_command(artifact_path: str | Path, reference_dir: str | Path, policy: ParityPolicy,
                       outputs: dict[str, np.ndarray]) -> list[str] | None:
    """The `polygraphy run` argument list checking `artifact_path` against the reference set, or None for formats
    Polygraphy cannot run (OpenVINO IR, Torch-TensorRT programs)."""
    flags = _RUNNER_FLAGS.get(Path(artifact_path).suffix)
    if flags is None:
        return None
    reference_dir = Path(reference_dir)
    tolerances = polygraphy_tolerances(policy, outputs)
    command = ["polygraphy", "run", str(artifact_path), *flags,
               "--load-inputs", str(reference_dir / INPUTS_NAME), "--load-outputs", str(reference_dir / OUTPUTS_NAME),
               "--rtol", "0", "--atol", *(f"{name}:{atol:.6g}" for name, (atol, _) in tolerances.items()),
               "--check-error-stat", *(f"{name}:{stat}" for name, (_, stat) in tolerances.items())]
    if any(stat == "quantile" for _, stat in tolerances.values()):
        command += ["--error-quantile", str(ERROR_QUANTILE)]
    return command


def command_line(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
