"""`train.loggers: [jsonl, tensorboard]`: TensorBoard event files with exactly metrics.jsonl's scalars."""

import json

import pytest

from singer_deploy.config import SingerConfig, TrainConfig
from singer_deploy.errors import ConfigError
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes
from singer_deploy.config import PlantedConfig
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
            singer=SingerConfig(rank=4, outlier_target="median"))
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
