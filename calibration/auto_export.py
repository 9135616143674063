"""Export for a target CPU with precision "auto": build the native candidates, gate, time, ship the fastest.

    result, decision = export_auto(student, out_dir, ("onnx", "openvino"), img_size=224,
                                   parity_images=held_out, calib_images=training_subset)
    result.shipped   # {"onnx": "onnx/int8", "openvino": "openvino/fp32"}; decision.rows say why

Every candidate is exported once (export_student with several precisions), gated against eager PyTorch on the parity
images, and - when the target is this host - timed by export.bench on the same images in one interleaved run per
deployment batch size (the runners parity opened, so each OpenVINO candidate at the hint it was gated with). The
decision (auto_precision.decide) and its table go into the export manifest next to the host and target capabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from singer_deploy.calibration.auto_precision import AutoDecision, Candidate, auto_candidates, decide, realised_reason
from singer_deploy.calibration.converters import export_converters
from singer_deploy.export.bench import benchmark_runners
from singer_deploy.export.hardware import CpuCapabilities, host_capabilities, resolve_target, target_is_host
from singer_deploy.export.pipeline import DEFAULT_GOLDEN_SIZE, ExportResult, export_student


@dataclass
class AutoExport:
    result: ExportResult
    decision: AutoDecision
    latency: list[dict]        # the candidates' benchmark rows, every batch size (empty when not timed here)


def export_auto(student: nn.Module, out_dir: str | Path, formats: Sequence[str], *, img_size: int | Sequence[int],
                parity_images: np.ndarray, calib_images: np.ndarray | None, projector: nn.Module | None = None,
                target: str | CpuCapabilities | None = None, budget_s: float = 2.0,
                write_goldens: bool = True, golden_size: int = DEFAULT_GOLDEN_SIZE,
                polygraphy_goldens: bool = False, batch_sizes: Sequence[int] = (1,)) -> AutoExport:
    """Build, gate and (on the target itself) time every native candidate of `formats` at each of `batch_sizes`;
    ship the fastest passing one per format at the first batch size. Without `calib_images` INT8 is not a candidate
    (recorded as "not built")."""
    caps = resolve_target(target)
    plan = auto_candidates(list(formats), caps)
    native = [p for _, p, why in plan if why is None and (p != "int8" or calib_images is not None)]
    precisions = tuple(dict.fromkeys(["fp32", *native]))
    # The FP16 IR is an FP16 candidate only where it can be gated computing in FP16: target and host have the kernels.
    hints = {"fp16": "f16"} if caps.fp16 and host_capabilities().fp16 else {}
    result = export_student(student, out_dir, formats, img_size=img_size, projector=projector, precision=precisions,
                            calib_images=calib_images, parity_images=parity_images, write_goldens=write_goldens,
                            golden_size=golden_size, polygraphy_goldens=polygraphy_goldens,
                            converters=export_converters(caps), openvino_hints=hints)
    benchmarked = target_is_host(caps)
    batch_sizes = tuple(batch_sizes)
    built = {key: record for key, record in result.artifacts.items() if record.precision in precisions}
    latency = [row for batch in batch_sizes for row in benchmark_runners(
        {k: r.runner for k, r in built.items()}, parity_images, budget_s=budget_s, batch=batch,
        parity={k: r.parity.passed for k, r in built.items()})] if benchmarked else []
    p50 = {(row["runner"], row["batch"]): row["p50_ms"] for row in latency}
    candidates = []
    for fmt, precision, why in plan:
        key = f"{fmt}/{precision}"
        record = result.artifacts.get(key)
        realised = None if record is None else record.runner_info.get("realised_precision")
        not_native = why or (realised_reason(precision, realised) if record is not None
                             else "not built: INT8 needs calibration images")
        timed = {b: p50[(key, b)] for b in batch_sizes if (key, b) in p50} if why is None else {}
        candidates.append(Candidate(
            fmt, precision, not_native=not_native,
            gate_passed=None if record is None or record.parity is None else record.parity.passed,
            gate_failures=[] if record is None or record.parity is None else record.parity.failures(),
            p50_ms=timed.get(batch_sizes[0]), realised=realised, p50_ms_at=timed,
            runner_options={} if record is None else dict(record.runner_options)))
    decision = decide(candidates, caps, benchmarked=benchmarked, batch_sizes=batch_sizes)
    result.shipped = dict(decision.chosen)
    result.notes.update(target=caps.to_dict(), precision_decision=decision.to_dict())
    result.write_manifest()
    return AutoExport(result, decision, latency)
