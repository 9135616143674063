"""Session-wide fixtures: built once per test session and shared by every module that asks for them.

Helpers that build models or images without being fixtures stay in tests/export_fixtures.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export_fixtures import shape_images, tiny_vit

from singer_deploy.config import PlantedConfig
from singer_deploy.models.planted import PlantedTeacher, build_planted_teacher

# The small planted teacher of the distillation and method-study tests (4 blocks, artifacts at block 2).
SMALL_PLANTED = PlantedConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, artifact_layer=2, null_dim=4)


@pytest.fixture(scope="session")
def small_planted() -> PlantedTeacher:
    """Built once; tests only read it (training freezes the teacher and never writes its weights)."""
    return build_planted_teacher(SMALL_PLANTED)


@pytest.fixture(scope="session")
def reg_student() -> tuple[torch.nn.Module, torch.nn.Linear]:
    student = tiny_vit()
    torch.manual_seed(1)
    return student, torch.nn.Linear(48, 64)


@pytest.fixture(scope="session")
def reg_images() -> np.ndarray:
    return shape_images(16, 28, 14)


@pytest.fixture(scope="session")
def reg_artifacts(reg_student, tmp_path_factory) -> dict:
    """The register-token student (with projector) exported once per session: ONNX, OpenVINO FP32 IR and FP16 IR."""
    from singer_deploy.export.onnx import export_onnx
    from singer_deploy.export.openvino import export_openvino

    student, projector = reg_student
    out = tmp_path_factory.mktemp("reg_artifacts")
    onnx_export = export_onnx(student, out / "student.onnx", projector=projector)
    ir = export_openvino(onnx_export.path, out, stem="student")
    return {"dir": out, "onnx": onnx_export, "ov_fp32": ir.fp32_xml, "ov_fp16": ir.fp16_xml}
