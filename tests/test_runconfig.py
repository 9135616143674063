import pytest

from singer_deploy.errors import ConfigError
from singer_deploy.config import RunConfig
from singer_deploy.pipeline.runconfig import load_run_config


def test_defaults_and_demo_config_load(tmp_path):
    assert isinstance(load_run_config({}), RunConfig)
    from singer_deploy.pipeline.cli import demo_config_path
    config = load_run_config(demo_config_path())
    assert config.teacher.name == "planted"
    assert config.singer == load_run_config({}).singer.__class__(rank=8)   # the default preset, "faithful"
    assert (config.singer.outlier_target, config.singer.info_tokens, config.singer.adapter_init) == (
        "subspace", "normal", "subspace")
    assert config.export.formats == ("onnx", "openvino")
    auto = load_run_config({"export": {"precision": "auto", "target": "amx"}}).export
    assert (auto.precision, auto.target, auto.calibration_size) == ("auto", "amx", 300)


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
    ({"export": {"target": "avx1024"}}, r"Unknown export target.*avx512_vnni"),
    ({"export": {"precision": "auto", "formats": ["onnx", "tensorrt"]}}, r"'auto' chooses among CPU artifacts"),
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


def test_a_config_built_in_code_is_validated_like_one_read_from_yaml():
    from singer_deploy.config import ExportSpec, ModelSpec, TensorRTBuildConfig

    with pytest.raises(ConfigError, match="cannot carry precision bf16"):
        ExportSpec(formats=("onnx", "openvino"), precision="bf16")
    with pytest.raises(ConfigError, match="batch_sizes must list positive integers"):
        ExportSpec(batch_sizes=(1, 0))
    with pytest.raises(ConfigError, match="batch_sizes must list positive integers"):
        ExportSpec(batch_sizes=())
    with pytest.raises(ConfigError, match="layers: index beyond the teacher's depth"):
        RunConfig(layers=(42,))
    with pytest.raises(ConfigError, match="planted model is a teacher only"):
        RunConfig(student=ModelSpec(name="planted"))
    with pytest.raises(ConfigError, match="batch range is out of order"):
        TensorRTBuildConfig(min_batch=8, opt_batch=4)


def test_keyword_overrides_change_a_run_config_without_a_dict_round_trip(monkeypatch):
    from singer_deploy.config import ExportSpec, TrainConfig
    from singer_deploy.pipeline.api import _resolve_config

    base = RunConfig(export=ExportSpec(formats=("onnx",), calibration_size=7), train=TrainConfig(steps=5))
    monkeypatch.setattr(RunConfig, "to_dict", lambda self: pytest.fail("RunConfig was turned into a dict"))
    shortcuts = dict(teacher=None, student="vit_small_patch16_224", data=None, out_dir="runs/x", layers=[2],
                     formats=["ov"], precision="int8", method="fitnet")
    config = _resolve_config(base, shortcuts, {})
    assert config.student.name == "vit_small_patch16_224" and config.out_dir == "runs/x" and config.layers == (2,)
    assert config.export == ExportSpec(formats=("ov",), precision="int8", calibration_size=7)
    assert config.train == TrainConfig(steps=5, method="fitnet") and config.teacher == base.teacher
    with pytest.raises(ConfigError, match=r"train\.stpes: unknown key"):
        _resolve_config(base, {**shortcuts, "method": None}, {"train": {"stpes": 1}})


def test_the_config_and_cli_modules_start_without_torch():
    import subprocess
    import sys

    code = ("import sys, singer_deploy, singer_deploy.config, singer_deploy.pipeline.cli; "
            "heavy = sorted({'torch', 'timm', 'peft', 'onnx', 'openvino'} & set(sys.modules)); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
