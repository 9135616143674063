"""The deployable student graph: image -> last-block tokens (before the final norm), split by name.

Distillation matches raw residual-stream tokens, so the exported graph returns those, not `forward_features`
(which applies the final norm). Register tokens are excluded from `patch_tokens` through timm's own
`num_prefix_tokens`, never by slicing `[:, 1:]`.
"""

from __future__ import annotations

import torch
from torch import nn

from singer_deploy.models.backbone import has_class_token
from singer_deploy.errors import ModelError

INPUT_NAME = "images"
# Every runner returns outputs under these names, in this order ("projected" only when a projector is attached).
OUTPUT_NAMES: tuple[str, ...] = ("cls", "patch_tokens", "projected")


def _unwrap_vit(model: nn.Module) -> nn.Module:
    """Accept a timm VisionTransformer or anything holding one as `.model` (the SDK's Backbone)."""
    vit = getattr(model, "model", model)
    needed = ("forward_intermediates", "num_prefix_tokens", "blocks", "patch_embed")
    missing = [name for name in needed if not hasattr(vit, name)]
    if missing:
        raise ModelError("The student is not a timm VisionTransformer-family model",
                         expected=f"a module with {', '.join(needed)} (or a Backbone whose .model has them)",
                         found=f"{type(model).__name__} without {', '.join(missing)}",
                         fix="create the student with timm.create_model('vit_...') or load_backbone(...)")
    return vit


class ExportableStudent(nn.Module):
    """Wraps a timm ViT student (+ optional projector) into a graph with named outputs.

    forward(images) -> tuple in `output_names` order:
      cls          (B, D)     class token of the last block; the mean patch token when the model has no class token
      patch_tokens (B, N, D)  last-block patch tokens, prefix (class + register) tokens removed
      projected    (B, N, Dt) projector(patch_tokens); only when a projector is given (the teacher-space features)
    """

    def __init__(self, student: nn.Module, projector: nn.Module | None = None):
        super().__init__()
        self.vit = _unwrap_vit(student)
        self.projector = projector
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        self.has_class_token = has_class_token(self.vit)
        self.last_block = len(self.vit.blocks) - 1
        if projector is not None and isinstance(projector, nn.Linear):
            embed_dim = int(getattr(self.vit, "embed_dim", projector.in_features))
            if projector.in_features != embed_dim:
                raise ModelError("The projector does not take the student's token width",
                                 expected=f"nn.Linear({embed_dim}, d_teacher)",
                                 found=f"nn.Linear({projector.in_features}, {projector.out_features})",
                                 fix="pass the projector trained with this student")

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.projector is not None else OUTPUT_NAMES[:2]

    @property
    def cls_source(self) -> str:
        return "class_token" if self.has_class_token else "patch_mean"

    @property
    def img_size(self) -> tuple[int, int]:
        size = self.vit.patch_embed.img_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    @property
    def input_chw(self) -> tuple[int, int, int]:
        """(C, H, W) of the one fixed input size the graph takes."""
        return (int(getattr(self.vit.patch_embed.proj, "in_channels", 3)), *self.img_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # timm's public intermediates API: raw block output (norm=False), prefix tokens split off by
        # num_prefix_tokens, NLC layout (no reshape to a grid, which would bake H/W into the graph twice).
        (last,) = self.vit.forward_intermediates(
            images, indices=[self.last_block], return_prefix_tokens=self.num_prefix_tokens > 0, norm=False,
            output_fmt="NLC", intermediates_only=True)
        patches, prefix = last if self.num_prefix_tokens > 0 else (last, None)
        cls = prefix[:, 0] if self.has_class_token else patches.mean(dim=1)
        if self.projector is None:
            return cls, patches
        return cls, patches, self.projector(patches)
