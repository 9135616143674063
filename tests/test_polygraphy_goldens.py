"""Goldens in Polygraphy's formats: `polygraphy run --load-inputs --load-outputs` with Polygraphy's own ONNX Runtime
runner and comparator passes and fails the same artifacts our `verify` does."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from singer_deploy.export.golden import REFERENCE_DIR, load_golden, verify, write_golden, write_reference
from singer_deploy.export.onnx import export_onnx
from singer_deploy.config import ParityPolicy
from singer_deploy.export.polygraphy_goldens import (polygraphy_command, polygraphy_tolerances,
                                                     write_polygraphy_reference)
from singer_deploy.export.runner import TorchRunner

pytest.importorskip("polygraphy", reason="polygraphy is part of the [test] extra")
POLICY = ParityPolicy.for_precision("fp32")


@pytest.fixture(scope="module")
def goldens(reg_student, reg_images, reg_artifacts, tmp_path_factory):
    """One shared reference set (+ its Polygraphy files) and the ONNX artifact's bundle pointing at it."""
    student, projector = reg_student
    outputs = TorchRunner(student, projector=projector).run(reg_images)
    root = tmp_path_factory.mktemp("goldens")
    arrays = write_reference(root / REFERENCE_DIR, inputs=reg_images, reference_outputs=outputs, model=student)
    write_polygraphy_reference(root / REFERENCE_DIR, reg_images, outputs)
    bundle = write_golden(root / "onnx-fp32", reference=arrays, policy=POLICY,
                          artifact_path=reg_artifacts["onnx"].path, model=student)
    return root, bundle, outputs


def _polygraphy(command: list[str]) -> subprocess.CompletedProcess:
    """Polygraphy's own CLI (`polygraphy run ...`) in a subprocess of this interpreter."""
    assert command[:2] == ["polygraphy", "run"]
    launcher = "import sys; from polygraphy.tools import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", launcher, *command[1:]], capture_output=True, text=True,
                          timeout=300)


def test_bundles_share_one_reference_set(goldens, reg_images):
    root, bundle, _ = goldens
    assert not (bundle / "golden.npz").exists()
    loaded = load_golden(bundle)
    assert loaded.manifest["arrays"] == "../reference/golden.npz"
    np.testing.assert_array_equal(loaded.inputs, reg_images)


def test_polygraphy_and_verify_agree_on_a_good_and_a_perturbed_artifact(goldens, reg_student, reg_artifacts,
                                                                       tmp_path):
    root, bundle, outputs = goldens
    good = reg_artifacts["onnx"].path
    assert verify(good, bundle).passed
    checked = _polygraphy(polygraphy_command(good, root / REFERENCE_DIR, POLICY, outputs))
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "PASSED" in checked.stdout + checked.stderr

    student, projector = reg_student
    perturbed = copy.deepcopy(student)
    with torch.no_grad():
        weight = perturbed.blocks[1].mlp.fc2.weight
        weight.add_(0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    bad = export_onnx(perturbed, tmp_path / "perturbed.onnx", projector=projector).path
    assert not verify(bad, bundle).passed
    rejected = _polygraphy(polygraphy_command(bad, root / REFERENCE_DIR, POLICY, outputs))
    assert rejected.returncode != 0
    assert "FAILED" in rejected.stdout + rejected.stderr


def test_tolerances_translate_the_policy(goldens):
    _, _, outputs = goldens
    fp32 = polygraphy_tolerances(POLICY, outputs)
    for name, array in outputs.items():
        assert fp32[name] == (pytest.approx(1e-4 * np.abs(array).max()), "max")
    int8 = polygraphy_tolerances(ParityPolicy.for_precision("int8"), outputs)
    assert {stat for _, stat in int8.values()} == {"quantile"}
    assert polygraphy_command("student_fp32.xml", "ref", POLICY, outputs) is None   # no OpenVINO runner
    assert polygraphy_command("student.engine", "ref", POLICY, outputs)[3:6] == ["--trt", "--model-type", "engine"]
