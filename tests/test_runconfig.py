import pytest

from singer_deploy.errors import ConfigError
from singer_deploy.pipeline.runconfig import RunConfig, load_run_config


def test_defaults_and_demo_config_load(tmp_path):
    assert isinstance(load_run_config({}), RunConfig)
    from singer_deploy.pipeline.cli import demo_config_path
    config = load_run_config(demo_config_path())
    assert config.teacher.name == "planted" and config.singer.outlier_target == "median"
    assert config.export.formats == ("onnx", "openvino")


@pytest.mark.parametrize("raw, message", [
    ({"train": {"stpes": 3}}, r"train\.stpes: unknown key.*did you mean 'steps'"),
    ({"tacher": {}}, r"tacher: unknown key.*teacher"),
    ({"train": {"steps": "many"}}, r"train\.steps: wrong type"),
    ({"train": {"steps": 0}}, r"steps must be a positive integer"),
    ({"singer": {"alpha": 1.5}}, r"alpha"),
    ({"train": {"adapter_lr": -1.0}}, r"adapter_lr must be a positive number"),
    ({"train": {"warmup_steps": -2}}, r"warmup_steps must be an integer >= 0"),
    ({"train": {"momentum": 1.5}}, r"momentum out of range"),
    ({"layers": [42]}, r"layers: index beyond the teacher's depth"),
    ({"export": {"precision": "int8", "calibration_size": 0}}, r"INT8 needs calibration data"),
    ({"export": {"formats": ["tflite"]}}, r"tflite"),
    ({"data": {"source": "/no/such/folder"}}, r"data\.source"),
    ({"teacher": {"planted": {"depht": 4}}}, r"teacher\.planted"),
])
def test_bad_configs_fail_before_any_work_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(raw)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
