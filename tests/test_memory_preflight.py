"""Settings whose images cannot fit in memory are refused before anything is allocated (singer_deploy/memory.py,
pipeline/preflight.py `check_data_memory`): exit 2 with expected / found / fix, never an OOM kill or exit 70.

The long fuzzer run found it: `data.eval_n: 1000000000000` generated and stacked images until the kernel's OOM
killer ended the process at 22 GB (docs/reliability.md). The sizes below are beyond any machine's memory, so the
tests hold on every host; the available figure itself is read, never assumed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from singer_deploy.errors import EXIT_INPUT, ConfigError
from singer_deploy.memory import Need, available_memory, check_fits

from test_reliability import cli, config_file

BEYOND_ANY_HOST = 10 ** 12   # images (of 3x64x64 float32: 89,407 TiB) or indices (7.28 TiB)

# The child's address space is capped at its size after the imports (torch maps its libraries when imported) plus
# 3 GiB: had the run started to make the images, an allocation would fail there (exit 70) instead of filling the
# machine's memory.
CAPPED_CHILD = """
import resource, sys
from pathlib import Path
import singer_deploy.pipeline.api
from singer_deploy.pipeline.cli import main
size = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 3 * 2 ** 30, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the capped child reads /proc/self/status")
def test_a_held_out_set_beyond_memory_is_refused_before_any_image_is_made(tmp_path):
    config = config_file(tmp_path, data={"eval_n": BEYOND_ANY_HOST})
    done = subprocess.run([sys.executable, "-c", CAPPED_CHILD, "check-config", str(config)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == EXIT_INPUT, done.stderr
    assert "these settings need more memory than this machine has available" in done.stderr
    assert f"data.eval_n: {BEYOND_ANY_HOST} held-out images of 3x64x64 float32" in done.stderr
    assert "(the address-space limit (ulimit -v) less this process's size)" in done.stderr
    assert "Fix: lower data.eval_n" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("changes, key", [
    ({"data": {"n": BEYOND_ANY_HOST}}, "data.n"),                            # each epoch's order of the images
    ({"train": {"batch_size": BEYOND_ANY_HOST}}, "train.batch_size"),        # one batch of images
    ({"export": {"formats": ["onnx"], "benchmark": True, "batch_sizes": [1, BEYOND_ANY_HOST]}},
     "export.batch_sizes"),                                                 # a timed batch
])
def test_run_settings_beyond_memory_exit_2_naming_the_setting(tmp_path, capsys, changes, key):
    out = tmp_path / "out"
    code, err = cli(capsys, "run", config_file(tmp_path, **changes), "--out-dir", out)
    assert code == EXIT_INPUT and f"Fix: lower {key} (or run on a machine with more memory)" in err
    assert "Expected: at most " in err and "Found: at least " in err
    assert not out.exists()   # refused before the run directory is made


def test_calibration_beyond_memory_exit_2_when_exporting_a_model(tmp_path, capsys):
    # An export-only run checks what exporting holds (not training's batch): here INT8 calibration on 10**8 images.
    out = tmp_path / "exported"
    code, err = cli(capsys, "export", "vit_tiny_patch16_224", "--formats", "onnx", "--precision", "int8", "--out",
                    out, "student.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
                    "data.n=100000000", f"export.calibration_size={BEYOND_ANY_HOST}")
    assert code == EXIT_INPUT and "Export: these settings need more memory" in err
    assert "export.calibration_size: 100000000 INT8 calibration images" in err
    assert "Fix: lower export.calibration_size" in err and not out.exists()


def test_available_memory_is_read_from_this_host():
    available = available_memory()
    if available is None:
        pytest.skip("no /proc/meminfo, cgroup or address-space limit to read here (not Linux)")
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < available[0] <= total


def test_check_fits_refuses_only_what_exceeds_the_available_memory():
    available = available_memory()
    if available is None:
        pytest.skip("no memory figure to read here (not Linux)")
    check_fits([Need("data.eval_n", "a few images", 2 ** 20)], "Training")   # 1 MiB fits anywhere this runs
    with pytest.raises(ConfigError, match="Fix: lower train.batch_size") as refused:
        check_fits([Need("data.eval_n", "held-out images", 2 ** 20),
                    Need("train.batch_size", "a batch", 2 * available[0])], "Training")
    assert "data.eval_n: held-out images = 1 MiB" in str(refused.value)


@pytest.mark.parametrize("planted, key", [({"embed_dim": 2 ** 31}, "teacher.planted.embed_dim or depth"),
                                          ({"depth": BEYOND_ANY_HOST}, "teacher.planted.embed_dim or depth"),
                                          ({"img_size": 2 ** 33}, "teacher.planted.img_size")])
def test_a_planted_teacher_beyond_memory_is_refused_before_it_is_built(tmp_path, capsys, planted, key):
    # The fuzzer's exit 70: the allocator's RuntimeError (or, below the kernel's overcommit limit, an OOM kill).
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher={"name": "planted", "planted": planted}))
    assert code == EXIT_INPUT and "Building the planted teacher: these settings need more memory" in err
    assert f"Fix: lower {key}" in err
