"""CUDA checks (pytest -m gpu; benchmarks/gpu_check.py runs them): the whole pipeline on a GPU, kill-and-resume on
a GPU, finite bf16 losses with the frozen bf16 teacher. Each test skips, naming the reason, without CUDA or without
a package its stage needs (OpenVINO is optional: ONNX alone when it is missing)."""

import importlib.util
import json
import math

import pytest
import torch

from fault_injection import Armed, Killed

from singer_deploy.config import SingerConfig
from singer_deploy.devices import compute_dtype, module_device
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes
from singer_deploy.train.feed import StreamSampler
from singer_deploy.config import TrainConfig
from singer_deploy.train.loop import CHECKPOINT, METRICS_LOG, DistillStep, distill, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu tests need one")]

CUDA = torch.device("cuda")
TEACHER = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3)
STUDENT = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2)


def vit(kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    return load_backbone("vit_tiny_patch16_224", **kwargs)


def test_distill_and_export_end_to_end_on_cuda(tmp_path):
    pytest.importorskip("matplotlib", reason="the report draws with matplotlib, not installed here")
    from singer_deploy.pipeline.api import distill_and_export

    formats = ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    config = {"teacher": {"name": "vit_tiny_patch16_224", "kwargs": TEACHER},
              "student": {"name": "vit_tiny_patch16_224", "kwargs": STUDENT},
              "data": {"n": 64, "eval_n": 16}, "layers": [1],
              "singer": {"rank": 16, "preset": "published"},
              "train": {"steps": 20, "batch_size": 16, "log_every": 5, "checkpoint_every": 10, "device": "cuda"},
              "export": {"formats": formats}}
    run = distill_and_export(config, out_dir=str(tmp_path / "run"), progress=False)
    assert run.passed, run.parity
    manifest = json.loads((run.out_dir / "manifest.json").read_text())
    assert manifest["versions"]["cuda"] is True and manifest["passed"] is True
    assert {row["candidate"].split("/")[0] for row in run.parity} == set(formats)
    assert (run.out_dir / "report.html").is_file()
    records = [json.loads(line) for line in (run.out_dir / METRICS_LOG).read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss"]) for r in records)     # bf16 autocast: precision "auto" on CUDA


def test_distill_export_parity_and_analysis_on_cuda_without_the_report(tmp_path):
    """The stages after training take a student left on the GPU: export and parity from a CPU copy, analysis on
    the GPU with CPU results (what distill_and_export chains; this runs without matplotlib too)."""
    from singer_deploy.evaluation.analysis import analyse_artifacts
    from singer_deploy.export.pipeline import export_student
    from singer_deploy.models.data import stack_images

    teacher = vit(TEACHER)
    result = _run(tmp_path / "run", SyntheticShapes(32, 64, 8, flat_share=0.08, seed=1), precision="auto")
    assert module_device(result.student).type == "cuda"
    images = stack_images(SyntheticShapes(16, 64, 8, flat_share=0.08, seed=2)).numpy()
    formats = ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    projector = result.projectors.proj[str(result.teacher_layers[-1])]
    exported = export_student(result.student.model, tmp_path / "export", formats, img_size=64, projector=projector,
                              parity_images=images)
    assert exported.passed, exported.to_dict()
    assert module_device(result.student).type == "cuda"              # the caller's student stayed on the GPU
    analysis = analyse_artifacts(teacher, None, result, images, batch_size=5)
    assert {row["method"] for row in analysis.rows} >= {"raw teacher", "student", "student (projected)"}
    assert all(array.__class__.__module__ == "numpy" for array in analysis.norm_maps.values())


def _run(out_dir, data, precision: str = "fp32", steps: int = 6):
    train = TrainConfig(steps=steps, batch_size=8, checkpoint_every=3, log_every=1, warmup_steps=2, device="cuda",
                        precision=precision)
    return distill(vit(TEACHER), vit(STUDENT, seed=1), data, out_dir, layers=[1],
                   singer=SingerConfig(rank=8, preset="published"), train=train, progress=False)


def _max_difference(a, b) -> float:
    state_a, state_b = a.student.model.state_dict(), b.student.model.state_dict()
    return max((state_a[k].float() - state_b[k].float()).abs().max().item() for k in state_a)


def test_kill_and_resume_on_cuda(tmp_path):
    data = SyntheticShapes(64, 64, 8, flat_share=0.08, seed=1)   # 8 batches of 8 per epoch
    first, second = _run(tmp_path / "a", data), _run(tmp_path / "b", data)
    assert first.device.type == "cuda" and module_device(first.student).type == "cuda"
    # CUDA kernels need not be bit-deterministic run to run (atomics in attention backward), so the resumed run is
    # held to the spread of two uninterrupted runs (exact when the kernels are deterministic), plus fp32 rounding.
    spread = _max_difference(first, second)
    sampler = StreamSampler(len(data), 8, seed=0)
    poisoned = set(sampler.batch(4)) - {i for step in range(4) for i in sampler.batch(step)}
    with pytest.raises(Killed):   # dies reading batch 5 (in a DataLoader worker: default workers on CUDA)
        _run(tmp_path / "run", Armed(data, poisoned))
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == 3
    resumed = _run(tmp_path / "run", data)
    assert _max_difference(first, resumed) <= max(4 * spread, 1e-5), spread
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / METRICS_LOG).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bf16_step_with_a_frozen_bf16_teacher_gives_finite_losses(tmp_path):
    teacher, student = vit(TEACHER), vit(STUDENT, seed=1)
    step = DistillStep(teacher, student, [1, 3], [0, 1], SingerConfig(rank=8, preset="published"), "singer",
                       teacher_dtype=compute_dtype("auto", CUDA)).to(CUDA)
    frozen = step.teacher
    assert next(frozen.model.blocks[0].parameters()).dtype == torch.bfloat16
    assert next(teacher.parameters()).dtype == torch.float32 and module_device(teacher).type == "cpu"
    params = [p for p in step.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    images = torch.randn(16, 3, 64, 64, device=CUDA)
    for _ in range(5):
        terms = train_step(step, images, optimizer, None, step.clip_groups(), 1.0,
                           torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        assert all(torch.isfinite(v).item() for v in terms.values() if isinstance(v, torch.Tensor) and v.ndim == 0)
    run = _run(tmp_path / "bf16", SyntheticShapes(32, 64, 8, flat_share=0.08, seed=1), precision="bf16", steps=10)
    records = [json.loads(line) for line in (run.out_dir / METRICS_LOG).read_text().splitlines()]
    assert len(records) == 10 and all(math.isfinite(r[k]) for r in records for k in ("loss", "kd", "out", "info"))
