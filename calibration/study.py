"""INT8 artifact study: do high-norm artifact tokens in a student make it harder to quantize?

Two FP32 students (say a FitNet and a SiNGER student of the same planted-artifact teacher) are quantized with the
same policy and the same calibration images on OpenVINO (NNCF) and ONNX Q/DQ; each INT8 model is compared with its
own FP32 artifact on the normal (non-artifact) tokens, next to the activation-range statistics that explain it.

Out of sample: the comparison images must not be calibration images (checked by per-image hash; a DataError
otherwise), since a gate measured on the images the ranges were fitted to flatters the INT8 model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from singer_deploy.calibration.activation_stats import activation_range_stats, residual_blocks, summarize_ranges
from singer_deploy.calibration.holdout import image_hashes
from singer_deploy.calibration.policy import DEFAULT_POLICY
from singer_deploy.config import PrecisionPolicy
from singer_deploy.calibration.quantize import artifact_runner, reduce_precision, run_all
from singer_deploy.calibration.selection import CalibrationSet
from singer_deploy.calibration.source import ImageSource, load_calibration_images
from singer_deploy.export.onnx import export_onnx
from singer_deploy.export.openvino import export_openvino
from singer_deploy.export.parity import compare_outputs
from singer_deploy.export.student import ExportableStudent
from singer_deploy.errors import DataError
from singer_deploy.method.metrics import DEFAULT_K, artifact_metrics, cosine_summary, high_norm_mask, token_cosines


def _token_cosines(ref: np.ndarray, cand: np.ndarray, k: float) -> dict[str, float]:
    ref_t, cand_t = torch.from_numpy(ref), torch.from_numpy(cand)
    artifacts = high_norm_mask(ref_t, k)
    cos = token_cosines(ref_t, cand_t)
    # The mean hides the tail a retrieval user hits: report the worst 1% and the worst normal token too.
    normal = cosine_summary(cos[~artifacts])
    return {"normal_token_cosine": normal["mean"], "normal_token_cosine_p1": normal["p1"],
            "normal_token_cosine_min": normal["min"],
            "artifact_token_cosine": cosine_summary(cos[artifacts])["mean"],
            "all_token_cosine": cosine_summary(cos)["mean"],
            "artifact_token_share": float(artifacts.float().mean())}


def _study_one(model: nn.Module, projector: nn.Module | None, calibration: CalibrationSet, eval_images: np.ndarray,
               out: Path, backends: tuple[str, ...], policy: PrecisionPolicy, k: float) -> dict:
    wrapper = ExportableStudent(model, projector).eval()
    onnx_path = export_onnx(wrapper, out / "student_fp32.onnx").path
    sources = {"onnx": onnx_path}
    if "openvino" in backends:
        sources["openvino"] = export_openvino(onnx_path, out, fp16=False).fp32_xml
    result: dict = {"backends": {}}
    for backend in backends:
        reduced = reduce_precision(sources[backend], precision="int8", backend=backend, output_dir=out,
                                   calibration=calibration, policy=policy, check=False)
        ref = run_all(artifact_runner(sources[backend], backend), eval_images)
        cand = run_all(artifact_runner(reduced.artifact, backend), eval_images)
        parity = compare_outputs(ref, cand, "int8", reference_name=f"{backend}-fp32", candidate_name=f"{backend}-int8")
        result["backends"][backend] = {**_token_cosines(ref["patch_tokens"], cand["patch_tokens"], k),
                                       "parity_passed": parity.passed, "parity": parity.to_dict(),
                                       "realised": reduced.realised.to_dict()}
        result.setdefault("fp32_artifact_metrics", artifact_metrics(torch.from_numpy(ref["patch_tokens"]), k))
    result["activation_ranges"] = summarize_ranges(activation_range_stats(wrapper, eval_images))
    result["residual_ranges"] = summarize_ranges(activation_range_stats(wrapper, eval_images, layers=residual_blocks,
                                                                        capture="output"))
    return result


def int8_artifact_study(model_a: nn.Module, model_b: nn.Module, calib_images: ImageSource, eval_images: ImageSource, *,
                        names: tuple[str, str] = ("a", "b"), projectors: tuple[nn.Module | None, nn.Module | None]
                        = (None, None), backends: tuple[str, ...] = ("openvino", "onnx"),
                        policy: PrecisionPolicy = DEFAULT_POLICY, k: float = DEFAULT_K,
                        work_dir: str | Path | None = None) -> dict:
    """Quantize both students to INT8 with one policy and one calibration set; per student and backend return the
    INT8-vs-own-FP32 cosine on normal tokens (not high-norm at k x median in the FP32 output), on artifact tokens,
    the full INT8 parity report, the realised precision, the FP32 artifact metrics, and range statistics of the
    Linear inputs (what INT8 quantizes) and of the residual stream (block outputs, where artifact tokens live).
    """
    calib = load_calibration_images(calib_images)
    eval_images = load_calibration_images(eval_images)
    record = out_of_sample_record(calib, eval_images)
    calibration = CalibrationSet(images=calib, indices=np.arange(len(calib)), method="given", seed=0,
                                 source_size=len(calib))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        return {name: {**_study_one(model, projector, calibration, eval_images, root / name, tuple(backends), policy,
                                    k), "calibration": record}
                for name, model, projector in zip(names, (model_a, model_b), projectors)}


def out_of_sample_record(calib: np.ndarray, eval_images: np.ndarray) -> dict:
    """Refuse evaluation images that are also calibration images (equal pixels); the record says what was checked."""
    calibrated = set(image_hashes(calib))
    overlap = sum(h in calibrated for h in image_hashes(eval_images))
    if overlap:
        raise DataError("The INT8 study would compare on images it calibrated on",
                        expected="evaluation images disjoint from the calibration images",
                        found=f"{overlap} of {len(eval_images)} evaluation images are calibration images",
                        fix="calibrate on training images and compare on held-out ones")
    return {"calibration_images": len(calib), "eval_images": len(eval_images), "overlap": 0,
            "checked_by": "per-image sha256 of the float32 pixels"}
