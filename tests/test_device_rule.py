"""The device rule (singer_deploy/devices.py) where a CPU can check it: training leaves the caller's teacher alone
and hands modules back on its device in fp32; every later stage accepts modules and images it must copy, cast or
batch, without touching the caller's objects; bf16 training runs through the whole pipeline; image folders at
the model's own size (not its pretrained size) train, and keep exactly flat patches flat in the evaluation images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_api import QUICK_EXPORT, TINY as API_TINY

from singer_deploy.config import SingerConfig
from singer_deploy.devices import compute_dtype, cpu_copy, module_device, on_cpu
from singer_deploy.evaluation.analysis import analyse_artifacts
from singer_deploy.export.pipeline import export_student
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.config import PlantedConfig
from singer_deploy.models.planted import build_planted_teacher
from singer_deploy.pipeline.api import build_data, build_models, distill_and_export
from singer_deploy.pipeline.runconfig import load_run_config
from singer_deploy.config import TrainConfig
from singer_deploy.train.loop import distill

CPU = torch.device("cpu")
# test_api's tiny planted-teacher run, on the CPU, 2 steps, ONNX only, no latency table.
TINY = {**API_TINY, "data": {"n": 16, "eval_n": 12, "flat_share": 0.08}, "export": QUICK_EXPORT,
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "device": "cpu"}}


def tiny_student(**kwargs):
    torch.manual_seed(0)
    return load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         **kwargs)


def test_precision_names_map_to_one_compute_dtype():
    assert compute_dtype("auto", CPU) is None and compute_dtype("fp32", CPU) is None
    assert compute_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert compute_dtype("bf16", CPU) is torch.bfloat16 and compute_dtype("fp16", CPU) is torch.float16


def test_cpu_copy_leaves_the_original_where_and_as_it_is():
    student = tiny_student().to(torch.bfloat16).train()
    copy = cpu_copy(student)
    assert all(p.dtype == torch.float32 for p in copy.parameters()) and not copy.training
    assert all(p.dtype == torch.bfloat16 for p in student.parameters()) and student.training
    assert copy.model.blocks[0].attn.qkv.weight.data_ptr() != student.model.blocks[0].attn.qkv.weight.data_ptr()
    fp32 = tiny_student()
    assert on_cpu(fp32) is fp32 and on_cpu(student) is not student


def test_export_accepts_a_module_it_must_copy_and_never_touches_it(tmp_path):
    """A student in bf16 weights and train mode (as a trainer might leave it) exports from an fp32 CPU copy."""
    student = tiny_student().to(torch.bfloat16).train()
    images = torch.randn(12, 3, 32, 32).numpy()
    result = export_student(student, tmp_path, ["onnx"], img_size=32, parity_images=images, write_goldens=False)
    assert result.passed, result.to_dict()
    assert student.training and next(student.parameters()).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    teacher = build_planted_teacher(PlantedConfig(img_size=32, patch_size=8, embed_dim=64, depth=4,
                                                  artifact_layer=2, null_dim=4))
    train = TrainConfig(steps=2, batch_size=4, log_every=1, checkpoint_every=2, device="cpu", precision="bf16")
    before = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    result = distill(teacher.backbone, tiny_student(), SyntheticShapes(8, 32, 8, flat_share=0.08, seed=1),
                     tmp_path_factory.mktemp("bf16"), layers=[2], singer=SingerConfig(rank=4, preset="published"),
                     train=train, progress=False)
    return teacher, before, result


def test_training_reads_the_teacher_and_hands_back_fp32_modules_on_its_device(trained):
    teacher, before, result = trained
    after = teacher.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert result.device == CPU
    for module in (result.student, result.projectors, result.refiner):
        assert module_device(module) == CPU
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_analysis_batches_any_image_container_and_returns_cpu_arrays(trained):
    teacher, _, result = trained
    images = stack_images(SyntheticShapes(10, 32, 8, flat_share=0.08, seed=2))
    whole = analyse_artifacts(teacher.backbone, None, result, images, teacher, batch_size=10)
    batched = analyse_artifacts(teacher.backbone, None, result, images.numpy(), teacher, batch_size=3)
    assert len(whole.rows) == len(batched.rows) > 0
    for a, b in zip(whole.rows, batched.rows):
        assert a.keys() == b.keys() and a["method"] == b["method"] and a["layer"] == b["layer"]
        for key in a.keys() - {"method", "layer"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["method"], key)
    for name, array in batched.norm_maps.items():
        assert isinstance(array, np.ndarray) and array.shape[0] == 10, name


def test_bf16_training_runs_through_the_whole_pipeline(tmp_path):
    config = {**TINY, "train": {**TINY["train"], "precision": "bf16"}}
    run = distill_and_export(config, out_dir=str(tmp_path / "run"), progress=False)
    assert run.passed
    records = [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r[key]) for r in records for key in ("loss", "kd", "out", "info"))
    assert (run.out_dir / "report.html").is_file() and (run.out_dir / "export" / "student.onnx").is_file()


def write_shapes_folder(folder, n: int, size: int = 64, patch: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = SyntheticShapes(n, size, patch, flat_share=0.08, seed=3)
    for i in range(n):
        Image.fromarray((shapes.render(i)[0] * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")


def flat_patch_count(images: np.ndarray, patch: int = 8) -> int:
    """Patches whose pixels are exactly one colour, over a batch (B, 3, H, W)."""
    b, c, h, w = images.shape
    blocks = images.reshape(b, c, h // patch, patch, w // patch, patch)
    spread = blocks.max(axis=(3, 5)) - blocks.min(axis=(3, 5))
    return int((spread.max(axis=1) == 0).sum())


def test_a_64px_image_folder_trains_and_keeps_flat_patches_flat(tmp_path):
    """The planted teacher and the student are made at 64 px; timm's pretrained config of the architecture says
    224 px and crop_pct 0.9. The folder's images are 64 px: evaluation must neither resize nor crop them."""
    write_shapes_folder(tmp_path / "imgs", 20)
    (tmp_path / "imgs" / "010_truncated.png").write_bytes((tmp_path / "imgs" / "010.png").read_bytes()[:100])
    # eval_n is capped at a fifth of the files (4 of 21); 5 steps of 4 read all 17 training files, so every file is
    # read at least once, for training or evaluation.
    config = load_run_config({**TINY, "data": {"source": str(tmp_path / "imgs"), "eval_n": 8},
                              "train": {**TINY["train"], "steps": 5, "checkpoint_every": 5}})
    teacher = build_models(config).teacher
    train_data, eval_images = build_data(config, teacher)
    mean, std = (np.array(teacher.data_config()[key], dtype=np.float32)[:, None, None] for key in ("mean", "std"))
    files = {p.name: (np.asarray(Image.open(p), dtype=np.float32).transpose(2, 0, 1) / 255 - mean) / std
             for p in sorted((tmp_path / "imgs").glob("*.png")) if "truncated" not in p.name}
    for image in eval_images:   # each held-out image is one file, pixel for pixel, flat patches included
        same = [f for f in files.values() if np.abs(image - f).max() < 1e-5]
        assert len(same) == 1 and flat_patch_count(image[None]) == flat_patch_count(same[0][None]) >= 1
    # Training items are augmented (random resized crop + flip): not the evaluation view of their file.
    item = train_data[0]
    assert item["image"].shape == (3, 64, 64)
    assert np.abs(item["image"].numpy() - files[item["path"].rsplit("/", 1)[-1]]).max() > 0.1
    run = distill_and_export(config.to_dict(), out_dir=str(tmp_path / "run"), progress=False)
    assert run.passed
    deepest = str(run.summary["teacher_layers"][-1])   # the planted teacher fires on flat patches
    assert run.summary["artifacts"][deepest]["raw teacher"]["hnr_4"] > 0.01
    # The truncated file is skipped where it is met (21 files listed, none opened at start) and counted once.
    record = json.loads((run.out_dir / "manifest.json").read_text())["data"]
    assert record["listed"] == 21
    assert record["skipped_images"]["count"] == 1
    assert list(record["skipped_images"]["files"]) == [str(tmp_path / "imgs" / "010_truncated.png")]
    assert run.summary["unreadable images skipped"].startswith("1 of 21 files")
