"""kill -9 at random points of a real `singer-deploy run` (in training, in a checkpoint write, in export, in the
writes of the ONNX file, the OpenVINO IR pair and the goldens): started again, the run completes with the same
student as an uninterrupted run and leaves no temporary or lock file. After every kill, each file under a final name
in the export folder is complete (it parses and loads): artifacts are written under temporary names and renamed
into place (singer_deploy/io.py).

Each kill waits for its phase to show on disk (the metrics log, a temporary file or folder of the write, the export
folder), then a random extra delay (seeded), then sends SIGKILL to the real subprocess. A golden file is small: its
temporary name can come and go between two polls, so the subprocess sleeps before each fsync of a write, which keeps
every temporary file on disk for at least FSYNC_DELAY_S (the writes themselves stay the product's own).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import yaml
from safetensors.torch import load_file

from singer_deploy.export.openvino_core import openvino_core

from singer_deploy.pipeline.rundir import LOCK

CONFIG = {
    "teacher": {"name": "planted"},
    "student": {"name": "vit_tiny_patch16_224",
                "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}},
    "data": {"n": 32, "eval_n": 8, "flat_share": 0.08},
    "layers": [4],
    "singer": {"rank": 8, "preset": "published"},
    "train": {"steps": 6, "batch_size": 4, "log_every": 1, "checkpoint_every": 1},
    "export": {"formats": ["onnx", "openvino"], "benchmark": False},
}
# (phase, what shows on disk when the run is in it; `left` = the temporary files a previous kill left behind)
PHASES = [
    ("training", lambda out, left: (out / "metrics.jsonl").is_file()),
    ("checkpoint write", lambda out, left: bool(set(out.glob(".checkpoint.pt.*.tmp")) - left)),
    ("export", lambda out, left: (out / "export").is_dir()),
    ("ONNX write", lambda out, left: bool(set(out.glob("export/.student.onnx.*.tmp")) - left)),
    ("OpenVINO IR write", lambda out, left: bool(set(out.glob("export/.student_fp*.xml.*.tmp")) - left)),
    ("golden write", lambda out, left: bool(set(out.glob("export/goldens/**/.*.tmp")) - left)),
]
TIMEOUT_S = 600
FSYNC_DELAY_S = 0.03   # > 10 polls of kill_in_phase
# `python -m singer_deploy.pipeline.cli`, with every fsync (singer_deploy/io.py's writes) made FSYNC_DELAY_S slower
SLOW_FSYNC_CLI = ("import os, runpy, time; fsync = os.fsync; "
                  f"os.fsync = lambda fd: (time.sleep({FSYNC_DELAY_S}), fsync(fd))[1]; "
                  "runpy.run_module('singer_deploy.pipeline.cli', run_name='__main__', alter_sys=True)")


def start(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_FSYNC_CLI, "run", str(config), "--out-dir", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_in_phase(process: subprocess.Popen, out: Path, shows, delay_s: float) -> bool:
    """SIGKILL the run `delay_s` after `shows(out, left)` first holds; False when the run ended before that."""
    left = set(out.glob("**/.*.tmp"))
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if shows(out, left):
            time.sleep(delay_s)
            process.kill()
            process.wait()
            return True
        time.sleep(0.002)
    process.kill()
    raise AssertionError("the run did not reach its phase in time")


def trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def test_runs_killed_at_random_points_complete_with_the_same_student(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference = start(config, tmp_path / "reference")
    assert reference.wait(TIMEOUT_S) == 0, reference.stdout.read()

    rng = random.Random(15)
    out = tmp_path / "victim"
    killed_in = []
    for phase, shows in PHASES:
        if kill_in_phase(start(config, out), out, shows, delay_s=rng.uniform(0.0, 0.05)):
            killed_in.append(phase)
            assert_complete_under_final_names(out / "export")
    final = start(config, out)
    assert final.wait(TIMEOUT_S) == 0, final.stdout.read()

    assert [phase for phase, _ in PHASES] == killed_in
    expected, got = trained(tmp_path / "reference"), trained(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    assert not (out / LOCK).exists() and not (tmp_path / "victim-2").exists()


def assert_complete_under_final_names(folder: Path) -> None:
    """Every file under a final (not temporary) name loads whole: ONNX passes the checker, each IR reads with its
    .bin, JSON parses, .npz arrays read."""
    finals = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") and part.endswith(".tmp")
                                                                    for part in p.relative_to(folder).parts)]
    for path in finals:
        if path.suffix == ".onnx":
            onnx.checker.check_model(str(path))
        elif path.suffix == ".xml":
            assert path.with_suffix(".bin").is_file(), path
            openvino_core().read_model(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                [arrays[key] for key in arrays.files]
