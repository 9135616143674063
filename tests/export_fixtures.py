"""Helpers of the export tests: tiny random-init timm ViTs and image batches (the fixtures are in conftest.py)."""

from __future__ import annotations

import numpy as np
import timm
import torch
from timm.layers import LayerScale

from singer_deploy.models.data import SyntheticShapes, image_array


def tiny_vit(name: str = "vit_small_patch14_reg4_dinov2", img_size: int = 28, seed: int = 0) -> torch.nn.Module:
    """A register-token ViT shrunk to depth 2 / dim 48 (4 register tokens + CLS = 5 prefix tokens).

    timm initialises DINOv2 LayerScale at 1e-5 and the class/register tokens at std 1e-6, which makes a random
    model nearly an identity map whose blocks no parity check could see. Trained models have layer scales of order
    0.1-1, so the fixture sets them (and the prefix tokens) to trained-like magnitudes.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=img_size, depth=2, embed_dim=48, num_heads=2,
                              num_classes=0).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.fill_(0.5)
        for token in (model.cls_token, getattr(model, "reg_token", None)):
            if token is not None:
                token.normal_(std=0.5)
    return model


def shape_images(n: int, img_size: int, patch_size: int, seed: int = 0) -> np.ndarray:
    """Normalised synthetic images (shapes on smooth backgrounds): image-like inputs, not white noise."""
    data = SyntheticShapes(n=n, img_size=img_size, patch_size=patch_size, seed=seed)
    return image_array(data)

