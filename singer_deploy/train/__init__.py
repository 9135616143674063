"""Training (layer 3): the distillation loop, its sampler, checkpoints and distributed set-up.

Imports method, models and the root modules only. See docs/architecture.md.
"""
