"""Which teacher layers are distilled, which student block feeds each, and how student tokens meet teacher tokens.

Token layout (timm): [CLS?, registers..., patches]; `num_prefix_tokens` counts CLS + registers.
Tokens entering L_kd, on both sides: the CLS token when BOTH models have one, then the patch tokens on the TEACHER's
grid. Registers never enter L_kd: a student may have none, or a different number, and registers carry no position
to match. The student's projected patch grid is resampled bilinearly to the teacher's grid when they differ (e.g. a
/14 teacher and a /16 student at the same image size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from singer_deploy.models.backbone import check_block_index, has_class_token
from singer_deploy.errors import ModelError


def resolve_teacher_layers(layers: Sequence[int], depth: int, *, append_last: bool = True) -> list[int]:
    """Distilled teacher layers D, ascending, non-negative: user layers plus (by default) the last block.

    Negative indices count from the end (-1 = last block). The last entry is the "final" layer of the losses.
    """
    resolved = sorted({check_block_index(layer, depth, "teacher") for layer in layers})
    if append_last and depth - 1 not in resolved:
        resolved.append(depth - 1)
    if not resolved:
        raise ModelError("No teacher layers to distil", expected="at least one block index", found="[]",
                         fix="pass layers=[-1] or keep append_last=True")
    return resolved


def map_layers(teacher_layers: Sequence[int], teacher_depth: int, student_depth: int, *,
               force_last: bool = False) -> list[int]:
    """Student block for each teacher layer: Hungarian assignment on relative depth, distinct student blocks.

    Reference-code rule (docs/method.md, "Distilled layers and the layer mapping"): teacher position l / L_T,
    student position k / (L_S - 1), cost |t - s|.
    The asymmetric normalisation maps 12 -> 12 blocks {8, 11} to {7, 10}, leaving the student's last block
    untrained; force_last pins the teacher's last block (L_T - 1), when distilled, to the student's last block
    and assigns the rest among the remaining student blocks.
    """
    teacher = [check_block_index(layer, teacher_depth, "teacher") for layer in teacher_layers]
    if len(teacher) > student_depth:
        raise ModelError("More teacher layers than student blocks", expected=f"at most {student_depth} layers "
                         f"(the student has {student_depth} blocks)", found=str(teacher),
                         fix="distil fewer teacher layers or use a deeper student")
    mapping: dict[int, int] = {}
    students = list(range(student_depth))
    if force_last and teacher_depth - 1 in teacher:
        mapping[teacher.index(teacher_depth - 1)] = student_depth - 1
        students.pop()
    rest = [i for i in range(len(teacher)) if i not in mapping]
    if rest:
        t_pos = np.array([teacher[i] / teacher_depth for i in rest])[:, None]
        s_pos = np.linspace(0.0, 1.0, student_depth)[students][None, :]
        rows, cols = linear_sum_assignment(np.abs(t_pos - s_pos))
        mapping.update({rest[r]: students[c] for r, c in zip(rows, cols)})
    return [int(mapping[i]) for i in range(len(teacher))]


@dataclass(frozen=True)
class TokenLayout:
    """Where CLS, registers and patches sit in a (B, prefix + h*w, D) token tensor."""

    num_prefix_tokens: int
    has_cls: bool
    grid: tuple[int, int]

    @classmethod
    def of(cls, backbone: nn.Module) -> TokenLayout:
        """Layout of a lead `Backbone` (or anything with `.model`, `.num_prefix_tokens`, `.grid_size`)."""
        return cls(int(backbone.num_prefix_tokens), has_class_token(backbone), tuple(backbone.grid_size))

    def split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(prefix tokens, patch tokens)."""
        expected = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        if tokens.shape[1] != expected:
            raise ModelError("Token count does not match the layout", expected=f"{expected} tokens "
                             f"({self.num_prefix_tokens} prefix + {self.grid[0]}x{self.grid[1]} patches)",
                             found=f"{tokens.shape[1]} tokens", fix="feed block outputs of the matching model")
        return tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]


class TokenAligner:
    """Brings student and teacher tokens into the common L_kd layout [CLS?; teacher-grid patches]."""

    def __init__(self, student: TokenLayout, teacher: TokenLayout):
        self.student_layout, self.teacher_layout = student, teacher
        self.keeps_cls = student.has_cls and teacher.has_cls

    def teacher(self, tokens: Tensor) -> Tensor:
        """Teacher tokens (B, prefix_T + N_T, D) -> (B, [1] + N_T, D)."""
        prefix, patches = self.teacher_layout.split(tokens)
        return self._join(prefix, patches)

    def student(self, tokens: Tensor) -> Tensor:
        """Projected student tokens (B, prefix_S + N_S, D) -> (B, [1] + N_T, D), patches resampled if needed."""
        prefix, patches = self.student_layout.split(tokens)
        return self._join(prefix, resample_grid(patches, self.student_layout.grid, self.teacher_layout.grid))

    def _join(self, prefix: Tensor, patches: Tensor) -> Tensor:
        # timm puts CLS first, registers after it.
        return torch.cat([prefix[:, :1], patches], dim=1) if self.keeps_cls else patches


def resample_grid(patches: Tensor, source: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Bilinear resampling of patch tokens (B, h*w, D) from grid `source` to grid `target`."""
    if tuple(source) == tuple(target):
        return patches
    b, _, d = patches.shape
    image = patches.transpose(1, 2).reshape(b, d, *source)
    image = F.interpolate(image, size=tuple(target), mode="bilinear", align_corners=False)
    return image.flatten(2).transpose(1, 2)


class Projectors(nn.Module):
    """Per-layer student -> teacher projectors P_l = Linear(d_S, d_T) with bias, followed by token alignment.

    Trained with the student. The last one (`last`) is exported with it, as the `projected` output; the others are
    training-only. Keys of `proj` are str(teacher layer).
    """

    def __init__(self, teacher_layers: Sequence[int], student_dim: int, teacher_dim: int, aligner: TokenAligner):
        super().__init__()
        self.proj = nn.ModuleDict({str(layer): nn.Linear(student_dim, teacher_dim) for layer in teacher_layers})
        self.aligner = aligner

    def forward(self, layer: int, student_tokens: Tensor) -> Tensor:
        """Student block output (B, prefix_S + N_S, d_S) -> (B, [1] + N_T, d_T) in the L_kd layout."""
        return self.aligner.student(self.proj[str(layer)](student_tokens))

    @property
    def last(self) -> nn.Linear:
        return last_projector(self.proj)

    def patches(self, layer: int, student_tokens: Tensor) -> Tensor:
        """Only the projected patch tokens (B, N_T, d_T) on the teacher's grid (the kept CLS token dropped)."""
        aligned = self(layer, student_tokens)
        return aligned[:, 1:] if self.aligner.keeps_cls else aligned


def last_projector(proj: Mapping[str, nn.Module]) -> nn.Module:
    """The projector of the deepest distilled teacher layer (keys are str(teacher layer)): it maps the student's last
    block into teacher space, and the export ships it as the `projected` output."""
    return proj[str(max(int(layer) for layer in proj))]


def load_projectors(state: Mapping[str, Tensor]) -> nn.ModuleDict:
    """The `proj` Linear layers back from a saved Projectors state dict ("proj.<layer>.weight" / ".bias")."""
    layers = sorted({int(key.split(".")[1]) for key in state if key.startswith("proj.")})
    proj = nn.ModuleDict()
    for layer in layers:
        weight = state[f"proj.{layer}.weight"]
        proj[str(layer)] = nn.Linear(weight.shape[1], weight.shape[0])
        proj[str(layer)].load_state_dict({"weight": weight, "bias": state[f"proj.{layer}.bias"]})
    return proj
