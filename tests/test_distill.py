"""The distillation loop: exact resume after a kill, non-finite losses, torchrun (2 gloo processes), the method flag,
output files and run-identity checks. Tiny planted teacher (32 px, 4 blocks) and a 2-block student; CPU only."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from singer_deploy.config import SingerConfig, TrainConfig
from singer_deploy.errors import ConfigError, TrainingError
from singer_deploy.method.metrics import artifact_metrics
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.train.loop import CHECKPOINT, METRICS_LOG, distill

SINGER = SingerConfig(rank=4, preset="published")
LAYERS = [2]  # + the teacher's last block (3); student blocks 0 and 1


def make_student(seed: int = 0):
    torch.manual_seed(seed)
    return load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def train_config(**overrides) -> TrainConfig:
    settings = dict(steps=6, batch_size=4, checkpoint_every=3, log_every=1, warmup_steps=2, device="cpu")
    return TrainConfig(**{**settings, **overrides})


class Faulty(Dataset):
    """Wraps a data set; after `after` item reads it either raises (a killed process) or serves poisoned images."""

    class Killed(Exception):
        pass

    def __init__(self, data: Dataset, after: int, fault: str):
        self.data, self.after, self.fault, self.reads = data, after, fault, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        item = self.data[index]
        if self.reads <= self.after:
            return item
        if self.fault == "kill":
            raise Faulty.Killed(f"killed at read {self.reads}")
        return {**item, "image": torch.full_like(item["image"], float(self.fault))}


@pytest.fixture(scope="module")
def teacher(small_planted):
    return small_planted.backbone


@pytest.fixture(scope="module")
def data():
    return SyntheticShapes(16, 32, 8, flat_share=0.08, seed=1)


@pytest.fixture(scope="module")
def reference(teacher, data, tmp_path_factory):
    """Uninterrupted 6-step runs, one per method."""
    runs = {}
    for method in ("singer", "fitnet"):
        out = tmp_path_factory.mktemp(f"reference-{method}")
        runs[method] = distill(teacher, make_student(), data, out, layers=LAYERS, singer=SINGER,
                               train=train_config(method=method), progress=False)
    return runs


def trained_tensors(result) -> dict[str, torch.Tensor]:
    tensors = {f"student.{k}": v for k, v in result.student.model.state_dict().items()}
    tensors.update({f"projectors.{k}": v for k, v in result.projectors.state_dict().items()})
    if result.refiner is not None:
        tensors.update({f"refiner.{k}": v for k, v in result.refiner.state_dict().items()})
    return tensors


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0.0, msg=key)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method", ["singer", "fitnet"])
def test_killed_run_resumes_to_the_same_weights(teacher, data, reference, tmp_path, method):
    # Killed while reading the 5th batch: 4 updates done, the checkpoint holds 3, so update 4 is redone.
    with pytest.raises(Faulty.Killed):
        distill(teacher, make_student(), Faulty(data, after=16, fault="kill"), tmp_path, layers=LAYERS,
                singer=SINGER, train=train_config(method=method), progress=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 3
    assert [r["step"] for r in read_jsonl(tmp_path / METRICS_LOG)] == [1, 2, 3, 4]
    # A fresh process builds the student again (its init is irrelevant: the checkpoint replaces it).
    resumed = distill(teacher, make_student(seed=1), data, tmp_path, layers=LAYERS, singer=SINGER,
                      train=train_config(method=method), progress=False)
    assert_same_tensors(trained_tensors(resumed), trained_tensors(reference[method]))
    assert [r["step"] for r in read_jsonl(tmp_path / METRICS_LOG)] == [1, 2, 3, 4, 5, 6]
    expected_loss = [r["loss"] for r in read_jsonl(reference[method].out_dir / METRICS_LOG)]
    assert [r["loss"] for r in read_jsonl(tmp_path / METRICS_LOG)] == expected_loss


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(teacher, data, reference, tmp_path, poison):
    with pytest.raises(TrainingError, match="non-finite at step 5 of 6") as caught:
        distill(teacher, make_student(), Faulty(data, after=16, fault=poison), tmp_path, layers=LAYERS,
                singer=SINGER, train=train_config(), progress=False)
    assert "last good checkpoint" in caught.value.fix
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 3
    for tensors in state["modules"].values():
        assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (tmp_path / "student" / "model.safetensors").exists()
    # The fix the error names works: resuming on clean data ends where an uninterrupted run ends.
    resumed = distill(teacher, make_student(), data, tmp_path, layers=LAYERS, singer=SINGER, train=train_config(),
                      progress=False)
    assert_same_tensors(trained_tensors(resumed), trained_tensors(reference["singer"]))


def test_method_flag_outputs_and_metrics_log(teacher, data, reference):
    singer, fitnet = reference["singer"], reference["fitnet"]
    assert singer.teacher_layers == fitnet.teacher_layers == [2, 3]
    assert singer.student_layers == fitnet.student_layers == [0, 1]
    assert fitnet.refiner is None and singer.refiner is not None
    assert set(fitnet.files) == {"student", "projectors", "distill_config"}
    assert set(singer.files) == {"student", "projectors", "distill_config", "refiner"}
    for run in (singer, fitnet):
        assert all(path.is_file() for path in run.files.values())
        assert (run.out_dir / CHECKPOINT).is_file()
        saved = load_file(str(run.files["student"]))
        assert_same_tensors(saved, {k: v for k, v in run.student.model.state_dict().items()})
        config = json.loads(run.files["distill_config"].read_text())
        assert config["teacher_layers"] == [2, 3] and config["student_layers"] == [0, 1]
        # No loss reaches the student's final norm; it is frozen (DDP needs every trained parameter used).
        assert not run.student.model.norm.weight.requires_grad

    images = stack_images(data)
    with torch.no_grad():
        raw = teacher.forward_taps(images, [2])[2][:, teacher.num_prefix_tokens:]
    raw_hnr = artifact_metrics(raw)["hnr"]
    assert raw_hnr > 0.03  # the tiny planted teacher does have artifacts to log

    fitnet_log, singer_log = read_jsonl(fitnet.out_dir / METRICS_LOG), read_jsonl(singer.out_dir / METRICS_LOG)
    assert [r["step"] for r in singer_log] == [1, 2, 3, 4, 5, 6]
    for record in fitnet_log:
        assert {"loss", "kd", "lr", "target_hnr_2", "target_e_out_2", "target_hnr_3"} <= record.keys()
        assert not {"out", "info"} & record.keys()
        assert record["loss"] == record["kd"]
        # FitNet's target is the raw teacher: its logged artifact share is the teacher's, on 4-image batches.
        assert record["target_hnr_2"] > 0.03
    for record in singer_log:
        assert {"loss", "kd", "out", "info", "kd_2", "out_2", "info_2", "kd_3", "out_3", "info_3",
                "target_hnr_2", "target_e_out_2", "target_r_max_3"} <= record.keys()
        assert all(math.isfinite(v) for v in record.values())
        expected = SINGER.w_kd * record["kd"] + SINGER.w_out * record["out"] + SINGER.w_info * record["info"]
        assert record["loss"] == pytest.approx(expected, rel=1e-5)


def test_finished_run_is_not_trained_again(teacher, data, reference):
    again = distill(teacher, make_student(seed=3), data, reference["singer"].out_dir, layers=LAYERS, singer=SINGER,
                    train=train_config(), progress=False)
    assert_same_tensors(trained_tensors(again), trained_tensors(reference["singer"]))
    assert len(read_jsonl(reference["singer"].out_dir / METRICS_LOG)) == 6


@pytest.mark.parametrize("change, named", [
    (dict(train=train_config(steps=8)), "train.steps"),
    (dict(train=train_config(method="fitnet")), "singer.alpha"),
    (dict(train=train_config(seed=1)), "train.seed"),
    (dict(singer=SingerConfig(rank=2, preset="published")), "singer.rank"),
    (dict(layers=[1]), "layers.teacher"),
])
def test_resuming_a_different_run_is_a_config_error(teacher, data, reference, change, named):
    arguments = dict(layers=LAYERS, singer=SINGER, train=train_config())
    arguments.update(change)
    with pytest.raises(ConfigError, match=f"different run.*changed: .*{named}") as caught:
        distill(teacher, make_student(), data, reference["singer"].out_dir, progress=False, **arguments)
    assert "new out_dir" in caught.value.fix and "--restart" in caught.value.fix


def test_resuming_with_another_student_architecture_is_a_config_error(teacher, data, reference):
    torch.manual_seed(0)
    wider = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(ConfigError, match="student weights of another shape"):
        distill(teacher, wider, data, reference["singer"].out_dir, layers=LAYERS, singer=SINGER,
                train=train_config(), progress=False)


def test_resume_false_starts_over(teacher, data, reference, tmp_path):
    first = distill(teacher, make_student(), data, tmp_path, layers=LAYERS, singer=SINGER,
                    train=train_config(steps=3), progress=False)
    again = distill(teacher, make_student(), data, tmp_path, layers=LAYERS, singer=SINGER, train=train_config(),
                    resume=False, progress=False)
    assert first.steps == 3 and again.steps == 6
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 6
    assert_same_tensors(trained_tensors(again), trained_tensors(reference["singer"]))


_TORCHRUN_SCRIPT = """
    import sys
    import torch
    import torch.distributed as dist
    from singer_deploy.models.backbone import load_backbone
    from singer_deploy.config import PlantedConfig, SingerConfig, TrainConfig
    from singer_deploy.models.data import SyntheticShapes
    from singer_deploy.models.planted import build_planted_teacher
    from singer_deploy.train.loop import distill

    teacher = build_planted_teacher(PlantedConfig(**{config})).backbone
    data = SyntheticShapes(16, 32, 8, flat_share=0.08, seed=1)
    for method in ("fitnet", "singer"):
        torch.manual_seed(0)
        student = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                num_heads=2)
        train = TrainConfig(method=method, steps=4, batch_size=4, checkpoint_every=2, log_every=1, warmup_steps=2,
                            device="cpu")
        distill(teacher, student, data, f"{{sys.argv[1]}}/{{method}}", layers=[2],
                singer=SingerConfig(rank=4, preset="published"), train=train, progress=False)
    print(f"rank {{dist.get_rank()}} of {{dist.get_world_size()}} done", flush=True)
    dist.destroy_process_group()
"""


def test_torchrun_two_gloo_processes(small_planted, teacher, data, tmp_path):
    script = tmp_path / "ddp_distill.py"
    config = {k: getattr(small_planted.config, k) for k in ("img_size", "patch_size", "embed_dim", "depth",
                                                    "artifact_layer", "null_dim")}
    script.write_text(textwrap.dedent(_TORCHRUN_SCRIPT.format(config=config)))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 0 of 2 done" in done.stdout and "rank 1 of 2 done" in done.stdout
    for method, files in (("fitnet", ["student", "projectors"]), ("singer", ["student", "projectors", "refiner"])):
        for name in files:
            assert (out / method / name / "model.safetensors" if name == "student"
                    else out / method / f"{name}.safetensors").is_file()
        assert (out / method / "distill_config.json").is_file()
        assert [r["step"] for r in read_jsonl(out / method / METRICS_LOG)] == [1, 2, 3, 4]
    # Two ranks of 4 images read disjoint halves of the global batch of 8 and average gradients: FitNet's plain MSE
    # then matches one process with batch 8 (SiNGER's pooled L_out is not a mean over images, so only FitNet).
    single = distill(teacher, make_student(), data, tmp_path / "single", layers=LAYERS, singer=SINGER,
                     train=train_config(method="fitnet", steps=4, batch_size=8, checkpoint_every=2),
                     progress=False)
    ddp_student = load_file(str(out / "fitnet" / "student" / "model.safetensors"))
    single_student = {k: v for k, v in single.student.model.state_dict().items()}
    assert_same_tensors(ddp_student, single_student, atol=2e-5)


_TORCHRUN_NAN_SCRIPT = """
    import sys
    import torch
    import torch.distributed as dist
    from singer_deploy.errors import TrainingError
    from singer_deploy.models.backbone import load_backbone
    from singer_deploy.models.data import SyntheticShapes
    from singer_deploy.config import TrainConfig
    from singer_deploy.train.loop import distill
    from singer_deploy.config import PlantedConfig
    from singer_deploy.models.planted import build_planted_teacher

    class PoisonedOnRank1(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data
        def __len__(self):
            return len(self.data)
        def __getitem__(self, index):
            item = self.data[index]
            return {{**item, "image": item["image"] * float("nan")}} if dist.get_rank() == 1 else item

    teacher = build_planted_teacher(PlantedConfig(**{config})).backbone
    torch.manual_seed(0)
    student = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    train = TrainConfig(method="fitnet", steps=4, batch_size=2, checkpoint_every=2, log_every=2, device="cpu")
    try:
        distill(teacher, student, PoisonedOnRank1(SyntheticShapes(8, 32, 8, seed=1)), sys.argv[1], layers=[2],
                train=train, progress=False)
    except TrainingError as err:
        print(f"rank {{dist.get_rank()}} stopped: {{err.problem}}", flush=True)
    dist.destroy_process_group()
"""


def test_torchrun_a_non_finite_loss_on_one_rank_stops_every_rank(small_planted, tmp_path):
    script = tmp_path / "ddp_nan.py"
    config = {k: getattr(small_planted.config, k) for k in ("img_size", "patch_size", "embed_dim", "depth",
                                                    "artifact_layer", "null_dim")}
    script.write_text(textwrap.dedent(_TORCHRUN_NAN_SCRIPT.format(config=config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path / "out")]
    # Before the all-reduced check, rank 1 raised alone and rank 0 waited in the next gradient all-reduce forever.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} stopped: The loss became non-finite at step 1 of 4" in done.stdout, done.stdout
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
