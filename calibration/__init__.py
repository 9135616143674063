"""Calibration sets and the reduced-precision (FP16 / INT8) policy for every backend."""

from singer_deploy.calibration.cache import cached_calibration_set
from singer_deploy.calibration.converters import export_converters
from singer_deploy.calibration.policy import DEFAULT_POLICY
from singer_deploy.config import PrecisionPolicy
from singer_deploy.calibration.quantize import ReducedModel, quantize_student, reduce_precision
from singer_deploy.calibration.realised import RealisedPrecision, realised_precision
from singer_deploy.calibration.selection import CalibrationSet, select_calibration_set

__all__ = [
    "DEFAULT_POLICY", "CalibrationSet", "PrecisionPolicy", "RealisedPrecision", "ReducedModel",
    "cached_calibration_set", "export_converters", "quantize_student", "realised_precision", "reduce_precision",
    "select_calibration_set",
]
