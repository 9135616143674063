"""Models and data (layer 1): timm backbone taps, the planted-artifact teacher, image sources.

Imports only the root modules (config, errors, io). See docs/architecture.md.
"""
