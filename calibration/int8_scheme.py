"""How INT8 weights and activations are encoded for the CPU (or GPU) that will run the artifact.

On x86-64 CPUs without VNNI or AMX (AVX2, plain AVX-512) INT8 GEMM kernels multiply u8 activations by s8 weights
with VPMADDUBSW, which adds pairs of products into a saturating 16-bit lane; large weights times large
activations clip there. Both quantizers document the remedy, quantizing weights to 7 bits (half the range):

- NNCF (`OverflowFix`): FIRST_LAYER (its default) protects only the first layer; ENABLE halves the range of every
  MatMul / Convolution weight. On an AVX2 host the default lets a ViT's cls-token cosine fall below 0.99 in the
  INT8 gate (tests/test_calibration_quantize.py), ENABLE restores it. VNNI and AMX accumulate
  in 32 bits, so there the default stays, as NNCF's authors and OpenVINO's own tools use it.
- ONNX Runtime (`quantize_static` docstring, "Choosing parameters for CPU inference"): x86-64 without VNNI:
  QUInt8 activations, QInt8 weights, reduce_range=True; with VNNI: the same types, reduce_range=False.
- TensorRT consumes Q/DQ graphs with symmetric signed INT8 on both sides and no range reduction (its INT8 tensor
  cores do not saturate); that scheme is independent of any CPU target.

The choice follows the deployment target (export.target), never the build host, and is recorded per artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from singer_deploy.errors import ConfigError
from singer_deploy.export.hardware import CpuCapabilities, resolve_target

CONSUMERS: tuple[str, ...] = ("openvino", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Int8Scheme:
    """One artifact's INT8 encoding and why it was chosen."""

    consumer: str                    # the runtime that will execute the artifact
    target: str                      # the CPU target name ("host" resolved to its ISA) or "gpu" for TensorRT
    half_range_weights: bool         # 7-bit weights (NNCF overflow fix ENABLE / ORT reduce_range)
    symmetric_activations: bool      # signed symmetric INT8 activations (TensorRT) vs asymmetric UINT8 (ORT CPU)
    reason: str

    @property
    def nncf_overflow_fix(self) -> str:
        """NNCF's OverflowFix value: "enable" (every weight) or "first_layer_only" (NNCF's default)."""
        return "enable" if self.half_range_weights else "first_layer_only"

    def to_dict(self) -> dict:
        return {**asdict(self), "nncf_overflow_fix": self.nncf_overflow_fix if self.consumer == "openvino" else None}


def int8_scheme(consumer: str, target: str | CpuCapabilities | None = None) -> Int8Scheme:
    """The INT8 encoding `consumer` ("openvino", "onnxruntime", "tensorrt") should use for `target`."""
    if consumer not in CONSUMERS:
        raise ConfigError(f"Unknown INT8 consumer {consumer!r}", expected=f"one of {CONSUMERS}", found=repr(consumer),
                          fix="openvino for NNCF IRs, onnxruntime for CPU Q/DQ, tensorrt for engine builds")
    if consumer == "tensorrt":
        return Int8Scheme(consumer, "gpu", False, True, "TensorRT: symmetric signed INT8 Q/DQ, no range reduction")
    caps = resolve_target(target)
    name = caps.isa if caps.name == "host" else caps.name
    if caps.int8_without_saturation:
        why = f"{name} has {'AMX' if caps.amx else 'VNNI'}: 32-bit INT8 accumulation, full 8-bit weight range"
        half = False
    else:
        why = f"{name} has no VNNI/AMX: u8 x s8 pairs saturate 16-bit lanes, weights quantized to 7 bits"
        half = True
    # NNCF's MIXED preset (ModelType.TRANSFORMER) quantizes activations asymmetrically itself.
    return Int8Scheme(consumer, name, half, False, why)
