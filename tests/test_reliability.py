"""Nothing lost, nothing silent: each reproduction of issue 15 as a test through the CLI's main() (in-process).

Every test asserts the exit code of the documented contract (README "Exit codes"), the key words of the message, and
that nothing was lost: a victim directory's files survive, a concurrent run is refused, a resume with changed
settings is refused, weights of another model are rejected. The kill -9 fault-injection test is in
tests/test_fault_injection.py.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from singer_deploy import __version__
from singer_deploy.errors import EXIT_INPUT, EXIT_IO, EXIT_OK, EXIT_TRAINING, DataError
from singer_deploy.models.data import read_image
from singer_deploy.pipeline.cli import main
from singer_deploy.pipeline.rundir import LOCK, MARKER, RunLock

STUDENT_KW = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
VIT_TEACHER_KW = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}
TINY = {
    "teacher": {"name": "planted"},
    "student": {"name": "vit_tiny_patch16_224", "kwargs": STUDENT_KW},
    "data": {"n": 16, "eval_n": 4, "flat_share": 0.08},
    "layers": [4],
    "singer": {"rank": 8, "preset": "published"},
    "train": {"steps": 4, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "warmup_steps": 10},
    "export": {"formats": [], "benchmark": False},
}


def config_file(tmp_path: Path, name: str = "run.yaml", **changes) -> Path:
    """TINY with top-level sections replaced or merged (dicts merge one level deep)."""
    config = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) \
            else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv] + (["--no-progress"] if argv[0] in ("run", "distill") else []))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


def vit_weights(path: Path, drop: str | None = None, poison: bool = False, **kwargs) -> Path:
    """A state dict of a small timm ViT (with a 10-class head), optionally missing a block or holding a NaN."""
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**VIT_TEACHER_KW, **kwargs}).state_dict()
    state = {k: v for k, v in state.items() if not (drop and k.startswith(drop))}
    if poison:
        state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    return path


def vit_teacher(weights: Path | str, **kwargs) -> dict:
    return {"name": "vit_tiny_patch16_224", "weights": str(weights), "kwargs": {**VIT_TEACHER_KW, **kwargs}}


# 1. --overwrite never deletes what it did not create, and nothing is touched before the config is valid.

def test_overwrite_keeps_a_foreign_directory_that_holds_a_manifest(tmp_path, capsys):
    victim = tmp_path / "d"
    (victim / "src").mkdir(parents=True)
    (victim / "manifest.json").write_text("{}")
    (victim / "src" / "precious.txt").write_text("x")
    bad = config_file(tmp_path, "bad.yaml", train={"stpes": 3})
    code, err = cli(capsys, "run", bad, "--out-dir", victim, "--overwrite")
    assert code == EXIT_INPUT and "train.stpes: unknown key" in err
    assert (victim / "src" / "precious.txt").read_text() == "x" and (victim / "manifest.json").is_file()
    # A valid config does not delete it either: the directory has no run marker.
    code, err = cli(capsys, "run", config_file(tmp_path), "--out-dir", victim, "--overwrite")
    assert code == EXIT_INPUT and "not a singer-deploy run directory" in err and "nothing in this one" in err
    assert (victim / "src" / "precious.txt").read_text() == "x"
    assert sorted(p.name for p in victim.iterdir()) == ["manifest.json", "src"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished distill-only run of TINY (tests that change it work on a copy)."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["distill", str(config_file(root)), "--out-dir", str(root / "run"), "--no-progress"]) == EXIT_OK
    return root / "run"


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """TINY killed at step 3 of 4 (its checkpoint holds step 2), as the CLI left it."""
    from singer_deploy.train import loop

    root = tmp_path_factory.mktemp("killed")
    real, calls = loop.train_step, []

    def killed_at_step_3(*args, **kwargs):
        if len(calls) == 2:      # steps 0 and 1 ran (and were checkpointed); step 2 is interrupted
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train_step", killed_at_step_3)
        assert main(["distill", str(config_file(root)), "--out-dir", str(root / "run"), "--no-progress"]) == 130
    assert torch.load(root / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    return root / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def test_overwrite_refuses_a_run_directory_that_gained_foreign_files(finished, tmp_path, capsys, caplog):
    run = copy_of(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    code, err = cli(capsys, "distill", config_file(tmp_path), "--out-dir", run, "--overwrite")
    assert code == EXIT_INPUT and "notes.txt" in err
    assert (run / "notes.txt").read_text() == "mine" and (run / "manifest.json").is_file()
    (run / "notes.txt").unlink()
    # Without foreign files, --overwrite replaces the finished run in place.
    before = (run / "manifest.json").stat().st_mtime_ns
    assert cli(capsys, "distill", config_file(tmp_path), "--out-dir", run, "--overwrite")[0] == EXIT_OK
    assert (run / "manifest.json").stat().st_mtime_ns != before and (run / MARKER).is_file()
    assert not (run / LOCK).exists() and not list(run.rglob("*.tmp"))
    # And without --overwrite a finished run is kept; the message names the CLI flag, not a Python keyword.
    assert cli(capsys, "distill", config_file(tmp_path), "--out-dir", run)[0] == EXIT_OK
    assert "to replace it instead: --overwrite" in caplog.text
    assert (tmp_path / "run-2" / "manifest.json").is_file()


@pytest.mark.parametrize("section, value, words", [
    ("data", {"eval_n": 0}, "data.eval_n is too small"),
    ("data", {"flat_share": float("nan")}, "data.flat_share must be a share"),
    ("data", {"flat_share": -1.0}, "data.flat_share must be a share"),
    ("student", {"name": "planted"}, "the planted model is a teacher only"),
    ("teacher", {"weights": "/some/file.safetensors"}, "the planted teacher is built in code"),
    ("student", {"kwargs": {**STUDENT_KW, "depht": 3}}, "timm cannot build"),
    ("student", {"name": "vit_tiny_patch16_22"}, "timm has no model named"),
    ("student", {"name": "resnet18", "kwargs": {}}, "not a timm Vision Transformer"),
    ("student", {"kwargs": {**STUDENT_KW, "img_size": 32}}, "different input sizes"),
    ("singer", {"rank": 200}, "singer.rank exceeds the teacher's width"),
    ("student", {"weights": "/no/such/student.safetensors"}, "weights file does not exist"),
])
def test_check_config_fails_where_run_would_with_the_same_message(tmp_path, capsys, section, value, words):
    path = config_file(tmp_path, **{section: value})
    check_code, check_err = cli(capsys, "check-config", path)
    assert check_code == EXIT_INPUT and words in check_err
    out = tmp_path / "never"
    run_code, run_err = cli(capsys, "run", path, "--out-dir", out)
    assert run_code == EXIT_INPUT and run_err == check_err
    assert not out.exists()  # validated before any directory was made


def test_check_config_refuses_too_few_eval_images_before_training(tmp_path, capsys):
    path = config_file(tmp_path, data={"eval_n": 1}, export={"formats": ["onnx"], "benchmark": False})
    code, err = cli(capsys, "check-config", path)
    assert code == EXIT_INPUT and "eval_n" in err


def test_empty_and_binary_files_are_input_errors(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, err = cli(capsys, "check-config", empty)
    assert code == EXIT_INPUT and "is empty" in err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    code, err = cli(capsys, "run", binary)
    assert code == EXIT_INPUT and "not a text file" in err
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(128, 256)))
    code, err = cli(capsys, "check-config", config_file(tmp_path, data={"source": str(listing)}))
    assert code == EXIT_INPUT and "neither a folder nor a text list" in err


def test_lr_read_as_text_by_yaml_says_why(tmp_path, capsys):
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(TINY).replace("train:\n", "train:\n  lr: 1e-3\n"))
    code, err = cli(capsys, "check-config", path)
    assert code == EXIT_INPUT and "YAML read '1e-3' as text" in err and "lr: 1.0e-3" in err


def test_demo_steps_zero_is_refused_not_ignored(tmp_path, capsys):
    code, err = cli(capsys, "demo", "--steps", "0", "--out-dir", tmp_path / "demo")
    assert code == EXIT_INPUT and "steps" in err and not (tmp_path / "demo").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and __version__ in capsys.readouterr().out


# 2. Weights load strictly: only the classifier head may differ.

def test_weights_of_another_model_are_rejected(tmp_path, capsys):
    torch.manual_seed(0)
    resnet = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(resnet))
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher=vit_teacher(resnet), layers=[1]))
    assert code == EXIT_INPUT and "does not fit timm 'vit_tiny_patch16_224'" in err
    assert "missing from the file: blocks.0" in err and "unexpected in the file: bn1" in err
    out = tmp_path / "never"
    code, err = cli(capsys, "run", config_file(tmp_path, teacher=vit_teacher(resnet), layers=[1]), "--out-dir", out)
    assert code == EXIT_INPUT and "does not fit" in err and not out.exists()


def test_a_state_dict_missing_a_block_is_rejected(tmp_path, capsys):
    weights = vit_weights(tmp_path / "no_block3.safetensors", drop="blocks.3.")
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher=vit_teacher(weights), layers=[1]))
    assert code == EXIT_INPUT and "12 missing from the file: blocks.3." in err


def test_wrong_width_names_the_shapes_found(tmp_path, capsys):
    weights = vit_weights(tmp_path / "wide.safetensors", embed_dim=96)
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher=vit_teacher(weights), layers=[1]))
    assert code == EXIT_INPUT and "(96,) in the file vs (64,) in the model" in err
    assert "Found: ." not in err


def test_matching_weights_load_and_the_ignored_head_is_reported(tmp_path):
    from singer_deploy.models.backbone import load_backbone

    backbone = load_backbone("vit_tiny_patch16_224", weights=vit_weights(tmp_path / "ok.safetensors"),
                             **VIT_TEACHER_KW)
    assert backbone.weights_report["head_ignored"] == ["head.bias", "head.weight"]
    assert backbone.weights_report["loaded"] == len(backbone.model.state_dict())


@pytest.mark.parametrize("content, words", [
    (b"", "Cannot read the weights file"),
    (b"garbage bytes, not a checkpoint", "Cannot read the weights file"),
    ("truncated", "Cannot read the weights file"),
    ("nan", "holds non-finite values"),
])
def test_unreadable_or_poisoned_weights_are_input_errors(tmp_path, capsys, content, words):
    path = tmp_path / "teacher.safetensors"
    if content == "truncated":
        path.write_bytes(vit_weights(tmp_path / "full.safetensors").read_bytes()[:5000])
    elif content == "nan":
        vit_weights(path, poison=True)
    else:
        path.write_bytes(content)
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher=vit_teacher(path), layers=[1]))
    assert code == EXIT_INPUT and words in err


class _Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    witness = tmp_path / "pwned"
    path = tmp_path / "teacher.pt"
    torch.save({"blocks.0.norm1.weight": torch.ones(64), "evil": _Payload(witness)}, path)
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher=vit_teacher(path), layers=[1]))
    assert code == EXIT_INPUT and "Refused to load" in err and "nothing in it was executed" in err
    assert not witness.exists()


# 5. pretrained: true reads the local caches only.

def test_pretrained_never_downloads_and_names_the_cache(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1")  # unroutable: a request would hang, not fail fast
    teacher = {"name": "vit_tiny_patch16_224", "pretrained": True, "kwargs": VIT_TEACHER_KW}
    path = config_file(tmp_path, teacher=teacher, layers=[1])
    code, err = cli(capsys, "check-config", path)
    assert code == EXIT_INPUT and "not in the local caches" in err and "nothing is downloaded" in err
    assert str(tmp_path / "hf" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k") in err
    assert "weights: /path/to/model.safetensors" in err
    # The same name loads once its file is in the Hugging Face cache layout.
    snapshot = tmp_path / "hf" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    vit_weights(snapshot / "model.safetensors")
    code, err = cli(capsys, "check-config", path)
    assert code == EXIT_OK, err


# 3. One run per directory.

def test_a_concurrent_run_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / MARKER).write_text("{}")
    holder = RunLock(out / LOCK)
    holder.acquire()  # flock is per open file: this process's second open conflicts like another process's would
    try:
        code, err = cli(capsys, "distill", config_file(tmp_path), "--out-dir", out)
    finally:
        holder.release()
    assert code == EXIT_IO and "in use by another run" in err
    assert f"pid {os.getpid()} on {socket.gethostname()}" in err
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # the refused run wrote nothing


def test_a_stale_lock_of_a_dead_process_is_taken_over(killed, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = copy_of(killed, tmp_path)
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")   # what a kill -9 mid-write leaves
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then",
                                        "command": "singer-deploy run"}))
    assert cli(capsys, "distill", config_file(tmp_path), "--out-dir", out)[0] == EXIT_OK
    assert (out / "manifest.json").is_file() and not (out / LOCK).exists() and not list(out.rglob("*.tmp"))


def test_a_lock_from_another_host_is_not_taken_silently(tmp_path, capsys):
    out = tmp_path / "remote"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "then", "command": "x"}))
    code, err = cli(capsys, "distill", config_file(tmp_path), "--out-dir", out)
    assert code == EXIT_IO and "elsewhere.example" in err and f"delete {out / LOCK}" in err


# 4. Resume knows what it resumes.

@pytest.fixture
def unfinished(killed, tmp_path) -> Path:
    return copy_of(killed, tmp_path)


def steps_logged(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["lr"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_resuming_with_a_changed_run_is_refused(killed, tmp_path, capsys):
    checkpoint = (killed / "checkpoint.pt").read_bytes()
    for change, key in [(dict(train={"seed": 1}), "train.seed"),
                        (dict(data={"flat_share": 0.1}), "run.data.flat_share"),
                        (dict(student={"kwargs": {**STUDENT_KW, "mlp_ratio": 2.0}}), "run.student.kwargs.mlp_ratio"),
                        (dict(teacher={"name": "planted", "planted": {"rho": 12.0}}), "teacher.sha256")]:
        code, err = cli(capsys, "distill", config_file(tmp_path, "changed.yaml", **change), "--out-dir", killed)
        assert code == EXIT_INPUT and "belongs to a different run" in err and key in err, (key, err)
        assert "--restart" in err and "new out_dir" in err
    assert (killed / "checkpoint.pt").read_bytes() == checkpoint  # nothing lost
    assert not (killed / "manifest.json").exists() and not (killed / LOCK).exists()


def test_resuming_with_a_lower_lr_applies_it_and_records_it(unfinished, tmp_path, capsys):
    assert steps_logged(unfinished) == [(1, pytest.approx(1e-3 * 0.2)), (2, pytest.approx(1e-3 * 0.3))]
    path = config_file(tmp_path, "lower_lr.yaml", train={"lr": 1e-4})
    assert cli(capsys, "distill", path, "--out-dir", unfinished)[0] == EXIT_OK
    # Warmup factor (step + 1) / 10: the resumed steps run at the new base lr, not the checkpoint's.
    assert steps_logged(unfinished)[2:] == [(3, pytest.approx(1e-4 * 0.4)), (4, pytest.approx(1e-4 * 0.5))]
    manifest = json.loads((unfinished / "manifest.json").read_text())
    assert manifest["config_history"] == [{"step": 2, "changed": {"train.lr": {"from": 1e-3, "to": 1e-4}}}]
    assert manifest["config"]["train"]["lr"] == 1e-4


@pytest.mark.parametrize("flag", ["--restart", "--overwrite"])
def test_restart_and_overwrite_start_an_unfinished_run_over(unfinished, tmp_path, capsys, flag):
    path = config_file(tmp_path, "reseeded.yaml", train={"seed": 1})
    assert cli(capsys, "distill", path, "--out-dir", unfinished, flag)[0] == EXIT_OK
    assert [step for step, _ in steps_logged(unfinished)] == [1, 2, 3, 4]
    manifest = json.loads((unfinished / "manifest.json").read_text())
    assert manifest["config"]["train"]["seed"] == 1 and manifest["config_history"] == []


def test_the_api_takes_resume_false(unfinished, tmp_path):
    from singer_deploy.pipeline.api import distill_and_export

    changed = yaml.safe_load(config_file(tmp_path, "api.yaml", train={"seed": 2}).read_text())
    result = distill_and_export(changed, out_dir=unfinished, resume=False, progress=False)
    assert result.out_dir == unfinished and [s for s, _ in steps_logged(unfinished)] == [1, 2, 3, 4]


# 6. I/O failures are exit 5, with the place named; nothing half-written stays.

def test_out_dir_that_is_a_file_or_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    for out, words in ((blocker, "is a file"), (blocker / "sub", "lies under a file")):
        code, err = cli(capsys, "distill", config_file(tmp_path), "--out-dir", out)
        assert code == EXIT_IO and words in err
    assert blocker.read_text() == "keep"


def _make_read_only(folder: Path) -> bool:
    """Make folder unwritable by this process (chmod, or chattr +i for root); False when neither works here."""
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    folder.chmod(0o755)
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_read_only_location_is_an_io_error(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    if not _make_read_only(parent):
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        code, err = cli(capsys, "distill", config_file(tmp_path), "--out-dir", parent / "run")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], capture_output=True)
        parent.chmod(0o755)
    assert code == EXIT_IO and "Cannot create the run directory" in err and not (parent / "run").exists()


def test_disk_full_while_checkpointing_is_an_io_error(tmp_path, capsys):
    out = tmp_path / "full"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing write()
    # Files may not grow past 64 KiB: the run's small files fit, its first checkpoint (~500 KiB) does not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        code, err = cli(capsys, "distill", config_file(tmp_path), "--out-dir", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert code == EXIT_IO and "checkpoint.pt" in err and "EFBIG" in err
    assert not list(out.rglob("*.tmp")) and not (out / "checkpoint.pt").exists()
    assert not (out / LOCK).exists()


def test_a_failed_run_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    from singer_deploy.errors import TrainingError
    from singer_deploy.pipeline import api

    def stops(*args, **kwargs):
        raise TrainingError("stopped before writing anything")
    monkeypatch.setattr(api, "distill", stops)
    code, err = cli(capsys, "distill", config_file(tmp_path), "--out-dir", tmp_path / "gone")
    assert code == EXIT_TRAINING and not (tmp_path / "gone").exists()


# 7-9. Decoding, messages and leftovers.

def test_sixteen_bit_png_keeps_its_grey_levels(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    pixels = np.asarray(read_image(tmp_path / "ramp16.png"), dtype=np.float64)
    assert pixels.shape == (64, 64, 3)
    np.testing.assert_allclose(pixels[..., 0], ramp / 257.0, atol=0.5)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_and_truncated_images_are_data_errors(tmp_path, capsys):
    bomb = tmp_path / "images" / "bomb.png"
    bomb.parent.mkdir()
    bomb.write_bytes(_png_header_only(40_000, 40_000))   # 1.6 gigapixels declared in 60 bytes
    with pytest.raises(DataError, match="DecompressionBombError"):
        read_image(bomb)
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[:300])
    with pytest.raises(DataError, match="Cannot read image"):
        read_image(truncated)
    # A folder of nothing but a bomb is refused before training, not with a traceback.
    code, err = cli(capsys, "check-config", config_file(tmp_path, data={"source": str(bomb.parent)}))
    assert code == EXIT_INPUT and "No readable images" in err


def test_nan_before_the_first_checkpoint_says_none_is_kept(tmp_path, capsys):
    path = config_file(tmp_path, train={"lr": 1e30, "adapter_lr": 1e30, "grad_clip": None, "checkpoint_every": 50,
                                        "steps": 6})
    code, err = cli(capsys, "distill", path, "--out-dir", tmp_path / "nan")
    assert code == EXIT_TRAINING and "non-finite" in err
    assert "no checkpoint was written yet" in err and "last good checkpoint" not in err


def test_a_teacher_with_nan_weights_is_blamed_not_the_lr(tmp_path):
    from singer_deploy.errors import ModelError
    from singer_deploy.models.backbone import load_backbone
    from singer_deploy.train.loop import distill

    teacher = load_backbone("vit_tiny_patch16_224", **VIT_TEACHER_KW)
    with torch.no_grad():
        teacher.model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    student = load_backbone("vit_tiny_patch16_224", **STUDENT_KW)
    with pytest.raises(ModelError, match="teacher's weights hold non-finite values") as caught:
        distill(teacher, student, [{"image": torch.zeros(3, 64, 64)}], tmp_path, layers=[1], progress=False)
    assert "no learning rate can fix this" in caught.value.fix


def test_finished_run_files_are_strict_json_with_normal_modes(finished):
    out = finished
    umask = os.umask(0)
    os.umask(umask)
    for name in ("manifest.json", "student/model.safetensors", "refiner.safetensors", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

    def no_constants(name):
        raise ValueError(f"non-JSON constant {name}")
    json.loads((out / "manifest.json").read_text(), parse_constant=no_constants)
    assert not list(out.rglob("*.tmp")) and not (out / LOCK).exists()


def test_golden_problems_are_input_errors_and_verify_names_what_changed(tmp_path, capsys):
    from singer_deploy.export.golden import write_golden
    from singer_deploy.export.onnx import export_onnx
    from singer_deploy.config import ParityPolicy
    from singer_deploy.export.runner import TorchRunner
    from singer_deploy.export.student import ExportableStudent
    from singer_deploy.models.backbone import load_backbone

    torch.manual_seed(0)
    student = ExportableStudent(load_backbone("vit_tiny_patch16_224", **STUDENT_KW).model.eval())
    artifact = export_onnx(student, tmp_path / "student.onnx").path
    images = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    bundle = write_golden(tmp_path / "golden", inputs=images, reference_outputs=TorchRunner(student).load().run(images),
                          policy=ParityPolicy.for_precision("fp32"), artifact_path=artifact, model=student)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["environment"]["onnxruntime"] = "0.0.1"
    manifest["artifact"]["sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code = main(["verify", str(artifact), str(bundle)])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "artifact bytes differ from the golden's" in out
    assert "environment differs from the golden's: " in out and "onnxruntime 0.0.1 -> " in out
    del manifest["policy"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, err = cli(capsys, "verify", artifact, bundle)
    assert code == EXIT_INPUT and "missing policy" in err
    (bundle / "manifest.json").write_text("{ not json")
    code, err = cli(capsys, "verify", artifact, bundle)
    assert code == EXIT_INPUT and "not valid JSON" in err
