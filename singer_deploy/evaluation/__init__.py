"""Evaluation (layer 7): artifact analysis, feature extraction, probes and the SiNGER-vs-FitNet study.

May import every layer below it (export and calibration included), never the pipeline. See docs/architecture.md.
"""
