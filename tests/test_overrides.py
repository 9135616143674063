"""`key=value` overrides: YAML-typed values merged into the config, validated exactly like the YAML file's keys."""

import pytest

from singer_deploy.errors import ConfigError
from singer_deploy.pipeline.overrides import apply_overrides, parse_override
from singer_deploy.pipeline.runconfig import load_run_config

RAW = {"train": {"steps": 300, "batch_size": 32}, "export": {"formats": ["onnx"]}, "layers": [4]}


def test_values_are_read_as_yaml_and_merged_into_sections():
    merged = apply_overrides(RAW, ["train.steps=100", "export.formats=[onnx, openvino]", "export.precision=fp16",
                                   "singer.rank=8", "student.name=vit_tiny_patch16_224",
                                   "student.kwargs.img_size=64", "train.adapter_lr=null",
                                   "export.benchmark=false"])
    config = load_run_config(merged)
    assert config.train.steps == 100 and config.train.batch_size == 32
    assert config.export.formats == ("onnx", "openvino") and config.export.precision == "fp16"
    assert config.singer.rank == 8 and config.student.kwargs == {"img_size": 64}
    assert config.train.adapter_lr is None and config.export.benchmark is False
    assert RAW["train"]["steps"] == 300          # the source mapping is not modified


@pytest.mark.parametrize("item, message", [
    ("train.stpes=100", "train.stpes: unknown key.*did you mean 'steps'"),
    ("trian.steps=100", "trian: unknown key.*did you mean 'train'"),
    ("train.steps=lots", "train.steps: wrong type"),
])
def test_bad_keys_and_values_fail_like_yaml_keys(item, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(apply_overrides(RAW, [item]))


@pytest.mark.parametrize("item, message", [
    ("train.steps", "Cannot read the override"),
    ("=3", "Cannot read the override"),
    ("train..steps=3", "Cannot read the override"),
    ("train.steps=[1,", "not valid YAML"),
    ("layers.first=3", "layers is a value, not a section"),
])
def test_malformed_overrides_say_how_to_write_them(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RAW, [item])


def test_later_items_win_and_empty_values_are_null():
    assert parse_override("train.adapter_lr=") == (["train", "adapter_lr"], None)
    assert apply_overrides({}, ["train.steps=1", "train.steps=2"]) == {"train": {"steps": 2}}
