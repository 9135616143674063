"""Calibration sets and the reduced-precision (FP16 / INT8) policy for every backend."""
