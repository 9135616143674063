"""Reporting (layer 6): the self-contained HTML report and its figures.

Imports nothing from evaluation or pipeline. See docs/architecture.md.
"""
