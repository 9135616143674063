"""`train.loggers: [jsonl, tensorboard]`: TensorBoard event files with exactly metrics.jsonl's scalars, also across
a resume or a restart (read back with TensorBoard's own EventAccumulator, which applies the purge markers)."""

import json

import pytest

from singer_deploy.config import PlantedConfig, SingerConfig, TrainConfig
from singer_deploy.errors import ConfigError
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes
from singer_deploy.models.planted import build_planted_teacher
from singer_deploy.pipeline.runconfig import load_run_config
from singer_deploy.train.loggers import TENSORBOARD_DIR
from singer_deploy.train.loop import METRICS_LOG, distill

pytest.importorskip("tensorboard", reason="tensorboard is part of the [test] extra")


def _event_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path):
    planted = build_planted_teacher(PlantedConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, artifact_layer=2,
                                                  null_dim=4))
    student = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    data = SyntheticShapes(16, 32, 8, seed=0)
    train = TrainConfig(steps=4, batch_size=4, log_every=2, checkpoint_every=2, loggers=("jsonl", "tensorboard"))
    distill(planted.backbone, student, data, tmp_path, layers=[2], train=train, progress=False,
            singer=SingerConfig(rank=4, preset="published"))
    records = [json.loads(line) for line in (tmp_path / METRICS_LOG).read_text().splitlines()]
    scalars = _event_scalars(tmp_path / TENSORBOARD_DIR)
    expected = {key for record in records for key in record if key != "step"}
    assert set(scalars) == expected and any(key.startswith("target_hnr") for key in expected)
    for key in expected:
        assert [step for step, _ in scalars[key]] == [r["step"] for r in records]
        assert [value for _, value in scalars[key]] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_logger_names_are_validated():
    with pytest.raises(ConfigError, match="did you mean|loggers"):
        load_run_config({"train": {"loggers": ["jsonl", "tensorbord"]}})
    with pytest.raises(ConfigError, match="includes jsonl"):
        TrainConfig(loggers=("tensorboard",))


class _Killed(Exception):
    """Stands in for a kill -9 between two steps."""


def _tiny_run(small_planted, out_dir, train, kill_at_call=None, resume=True):
    """distill the session's small planted teacher; with kill_at_call, the run stops in that train_step call."""
    import singer_deploy.train.loop as loop

    student = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    data = SyntheticShapes(16, 32, 8, seed=0)
    real_step, calls = loop.train_step, []

    def step_or_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at_call:
            raise _Killed
        return real_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train_step", step_or_die)
        try:
            distill(small_planted.backbone, student, data, out_dir, layers=[2], train=train, progress=False,
                    singer=SingerConfig(rank=4, preset="published"), resume=resume)
        except _Killed:
            pass
    return [json.loads(line) for line in (out_dir / METRICS_LOG).read_text().splitlines()]


def _steps_and_values(scalars: dict, key: str) -> tuple[list[int], list[float]]:
    return [step for step, _ in scalars[key]], [value for _, value in scalars[key]]


def test_a_resumed_run_drops_the_tensorboard_events_logged_after_its_checkpoint(small_planted, tmp_path):
    train = TrainConfig(steps=5, batch_size=4, log_every=1, checkpoint_every=2, loggers=("jsonl", "tensorboard"))
    killed = _tiny_run(small_planted, tmp_path, train, kill_at_call=4)   # killed in step 4: checkpoint at step 2
    assert [r["step"] for r in killed] == [1, 2, 3]
    records = _tiny_run(small_planted, tmp_path, train)                   # resumes at step 3: logs 3 again
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2   # one file per session
    scalars = _event_scalars(tmp_path / TENSORBOARD_DIR)
    assert set(scalars) == {key for key in records[0] if key != "step"}
    for key in scalars:
        steps, values = _steps_and_values(scalars, key)
        assert steps == [1, 2, 3, 4, 5], key     # the killed session's step 3 is dropped, not shown twice
        assert values == pytest.approx([r[key] for r in records], rel=1e-6), key


def test_a_restarted_run_drops_every_tensorboard_event_of_the_earlier_attempt(small_planted, tmp_path):
    train = TrainConfig(steps=3, batch_size=4, log_every=1, checkpoint_every=1, loggers=("jsonl", "tensorboard"))
    _tiny_run(small_planted, tmp_path, train, kill_at_call=3)               # steps 1-2 logged and checkpointed
    records = _tiny_run(small_planted, tmp_path, train, resume=False)       # starts over at step 1
    scalars = _event_scalars(tmp_path / TENSORBOARD_DIR)
    for key in scalars:
        steps, values = _steps_and_values(scalars, key)
        assert steps == [1, 2, 3], key
        assert values == pytest.approx([r[key] for r in records], rel=1e-6), key
