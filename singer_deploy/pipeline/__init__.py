"""The pipeline (top layer): distill_and_export, run directories, export-only runs and the CLI.

The only layer that composes training, export, calibration, evaluation and reporting. See docs/architecture.md.
"""
