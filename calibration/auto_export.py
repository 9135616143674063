"""Export for a target CPU with precision "auto": build the native candidates, gate, time, ship the fastest.

    result, decision = export_auto(student, out_dir, ("onnx", "openvino"), img_size=224,
                                   parity_images=held_out, calib_images=training_subset)
    result.shipped   # {"onnx": "onnx/int8", "openvino": "openvino/fp32"}; decision.rows say why

Every candidate is exported once (export_student with several precisions), gated against eager PyTorch on the parity
images, and - when the target is this host - timed by export.bench on the same images in one interleaved run (the
runners parity opened, so parity's settings). The decision (auto_precision.decide) and its table go into the export
manifest next to the host and target capabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from singer_deploy.calibration.auto_precision import AutoDecision, Candidate, auto_candidates, decide
from singer_deploy.calibration.converters import export_converters
from singer_deploy.export.bench import benchmark_runners
from singer_deploy.export.hardware import CpuCapabilities, resolve_target, target_is_host
from singer_deploy.export.pipeline import DEFAULT_GOLDEN_SIZE, ExportResult, export_student


@dataclass
class AutoExport:
    result: ExportResult
    decision: AutoDecision
    latency: list[dict]        # the candidates' benchmark rows (empty when the target is not this host)


def export_auto(student: nn.Module, out_dir: str | Path, formats: Sequence[str], *, img_size: int | Sequence[int],
                parity_images: np.ndarray, calib_images: np.ndarray | None, projector: nn.Module | None = None,
                target: str | CpuCapabilities | None = None, budget_s: float = 2.0,
                write_goldens: bool = True, golden_size: int = DEFAULT_GOLDEN_SIZE,
                polygraphy_goldens: bool = False) -> AutoExport:
    """Build, gate and (on the target itself) time every native candidate of `formats`; ship the fastest passing
    one per format. Without `calib_images` INT8 is not a candidate (recorded as "not built")."""
    caps = resolve_target(target)
    plan = auto_candidates(list(formats), caps)
    native = [p for _, p, why in plan if why is None and (p != "int8" or calib_images is not None)]
    precisions = tuple(dict.fromkeys(["fp32", *native]))
    result = export_student(student, out_dir, formats, img_size=img_size, projector=projector, precision=precisions,
                            calib_images=calib_images, parity_images=parity_images, write_goldens=write_goldens,
                            golden_size=golden_size, polygraphy_goldens=polygraphy_goldens,
                            converters=export_converters(caps))
    benchmarked = target_is_host(caps)
    built = {key: record for key, record in result.artifacts.items() if record.precision in precisions}
    latency = benchmark_runners({k: r.runner for k, r in built.items()}, parity_images, budget_s=budget_s,
                                parity={k: r.parity.passed for k, r in built.items()}) if benchmarked else []
    p50 = {row["runner"]: row["p50_ms"] for row in latency}
    candidates = []
    for fmt, precision, why in plan:
        record = result.artifacts.get(f"{fmt}/{precision}")
        not_native = why or (None if record is not None else "not built: INT8 needs calibration images")
        candidates.append(Candidate(
            fmt, precision, not_native=not_native,
            gate_passed=None if record is None or record.parity is None else record.parity.passed,
            gate_failures=[] if record is None or record.parity is None else record.parity.failures(),
            p50_ms=p50.get(f"{fmt}/{precision}") if why is None else None,
            realised=None if record is None else record.runner_info.get("realised_precision")))
    decision = decide(candidates, caps, benchmarked=benchmarked)
    result.shipped = dict(decision.chosen)
    result.notes.update(target=caps.to_dict(), precision_decision=decision.to_dict())
    result.write_manifest()
    return AutoExport(result, decision, latency)
