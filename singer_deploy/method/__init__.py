"""The SiNGER method (layer 2): artifact metrics, nullspace bases, peft refiners, losses, layer alignment.

Imports models and the root modules only. See docs/architecture.md and docs/method.md.
"""
