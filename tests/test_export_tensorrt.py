"""TensorRT through Polygraphy: what needs no runtime (ONNX input and profile, the Polygraphy build config, sidecar,
realised-precision check, the errors without TensorRT) runs here; the engine build and run skip without TensorRT."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from singer_deploy.errors import BackendUnavailableError, ConfigError, ExportError
from singer_deploy.config import TensorRTBuildConfig
from singer_deploy.export.tensorrt import (TensorRTRunner, build_engine, check_engine_precision, create_config,
                                           layer_precision, onnx_io, profile_shapes, read_sidecar, sidecar_path,
                                           tensor_precision, write_sidecar)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _layer(name, kind, in_types, out_types):
    return {"Name": name, "LayerType": kind,
            "Inputs": [{"Name": f"{name}_in{i}", "Dimensions": [-1, 4, 48], "Format/Datatype": t}
                       for i, t in enumerate(in_types)],
            "Outputs": [{"Name": f"{name}_out", "Dimensions": [-1, 4, 48], "Format/Datatype": t}
                        for t in out_types]}


# Shaped like `IEngineInspector.get_engine_information(LayerInformationFormat.JSON)` of a DETAILED build (10.x).
FP16_ENGINE = {"Layers": [
    _layer("cast_in", "Reformat", ["Row major linear FP32 format"], ["Row major linear FP16 format"]),
    _layer("__myl_attn_0", "kgen", ["Half", "Half"], ["Half"]),
    _layer("__myl_LayerNorm_1", "kgen", ["Float"], ["Float"]),
    _layer("__myl_mlp_2", "gemm", ["Half"], ["Half"]),
    _layer("shape", "Shape", ["Int64"], ["Int64"]),
    _layer("cast_out", "Reformat", ["Half"], ["Float"]),
], "Bindings": ["images", "cls", "patch_tokens"]}
FP32_ENGINE = {"Layers": [_layer(f"l{i}", "kgen", ["Float"], ["Float"]) for i in range(5)]}
INT8_ENGINE = {"Layers": [
    _layer("q", "Quantize", ["Float"], ["Int8"]),
    {"Name": "gemm", "LayerType": "gemm", "Inputs": [{"Name": "a", "Format": "kLINEAR", "DataType": "Int8"}],
     "Outputs": [{"Name": "b", "Format": "kLINEAR", "DataType": "Float"}]},   # TensorRT 11 split keys
    _layer("ln", "kgen", ["Float"], ["Float"]),
]}


def test_profile_shapes():
    assert profile_shapes((3, 224, 224), 1, 8, 32) == {"min": (1, 3, 224, 224), "opt": (8, 3, 224, 224),
                                                       "max": (32, 3, 224, 224)}
    with pytest.raises(ConfigError, match="min_batch <= opt_batch"):
        profile_shapes((3, 224, 224), 4, 2, 8)
    with pytest.raises(ConfigError, match="fixed"):
        profile_shapes((3, -1, 224), 1, 1, 1)


def test_sidecar_round_trip_keeps_the_engine_untouched(tmp_path):
    engine = tmp_path / "student_fp16.engine"
    engine.write_bytes(b"PLAN")
    path = write_sidecar(engine, {"precision": "fp16", "profile": {"min": [1, 3, 28, 28]}})
    assert path == sidecar_path(engine) and path.name == "student_fp16.engine.json"
    assert read_sidecar(engine) == {"format": "tensorrt", "precision": "fp16", "profile": {"min": [1, 3, 28, 28]}}
    assert engine.read_bytes() == b"PLAN"
    with pytest.raises(ExportError, match="sidecar"):
        read_sidecar(tmp_path / "other.engine")


@pytest.mark.parametrize("text, expected", [
    ("Half", "fp16"), ("Row major linear FP16 format", "fp16"), ("Float", "fp32"), ("BFloat16", "bf16"),
    ("Thirty-two wide channel vectorized row major Int8 format.", "int8"), ("Int64", None), ("Bool", None),
])
def test_tensor_precision_strings(text, expected):
    assert tensor_precision(text) == expected


def test_layer_precision_is_the_lowest_typed_io():
    assert layer_precision(FP16_ENGINE["Layers"][0]) == "fp16"
    assert layer_precision(INT8_ENGINE["Layers"][1]) == "int8"
    assert layer_precision(FP16_ENGINE["Layers"][4]) is None


def test_precision_check_on_recorded_layer_reports():
    fp16 = check_engine_precision(json.dumps(FP16_ENGINE), "fp16")
    assert fp16.passed and fp16.counts == {"fp16": 4, "fp32": 1}
    silent_fp32 = check_engine_precision(FP32_ENGINE, "fp16")   # the "asked FP16, shipped FP32" failure
    assert not silent_fp32.passed and "only 0 of 5" in silent_fp32.message
    assert check_engine_precision(FP32_ENGINE, "fp32").passed
    assert not check_engine_precision(FP16_ENGINE, "fp32").passed
    assert check_engine_precision(INT8_ENGINE, "int8").passed
    assert not check_engine_precision(FP16_ENGINE, "fp16", min_fraction=0.9).passed
    with pytest.raises(ExportError, match="DETAILED"):
        check_engine_precision({"Layers": ["layer_a", "layer_b"]}, "fp16")   # LAYER_NAMES_ONLY build


def _identity_onnx(path, chw=(3, 28, 28)):
    """A one-node graph with the exported student's input (dynamic batch, fixed C, H, W) and two outputs."""
    import onnx
    from onnx import TensorProto, helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *chw])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *chw]) for name in ("cls", "tokens")]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["cls"]),
                               helper.make_node("Identity", ["images"], ["tokens"])], "g", [images], outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_io_gives_the_engine_input_and_outputs(tmp_path):
    assert onnx_io(_identity_onnx(tmp_path / "m.onnx")) == ("images", (3, 28, 28), ("cls", "tokens"))
    name, chw, _ = onnx_io(_identity_onnx(tmp_path / "dynamic.onnx", chw=(3, "height", 28)))
    with pytest.raises(ConfigError, match="fixed"):   # the profile needs a fixed resolution
        profile_shapes(chw)


def test_polygraphy_build_config_is_strongly_typed_with_one_batch_profile(tmp_path):
    """The engine's precision comes from the ONNX, so no precision flag and no calibrator are set for any precision
    (TensorRT 11 has neither; 10.x rejects them on strongly typed networks). TF32 follows allow_tf32, the batch
    profile the build config, and a timing cache is loaded once it exists."""
    shapes = profile_shapes((3, 28, 28), 1, 4, 8)
    cache = tmp_path / "timing.cache"
    config = create_config("images", shapes, TensorRTBuildConfig(min_batch=1, opt_batch=4, max_batch=8,
                                                                 optimization_level=5, timing_cache=cache))
    assert not any((config.fp16, config.bf16, config.int8, config.fp8, config.tf32)) and config.calibrator is None
    assert config.builder_optimization_level == 5 and config.timing_cache_path is None   # no cache file yet
    (profile,) = config.profiles
    assert list(profile) == ["images"]
    assert (tuple(profile["images"].min), tuple(profile["images"].opt), tuple(profile["images"].max)) == \
        ((1, 3, 28, 28), (4, 3, 28, 28), (8, 3, 28, 28))
    cache.write_bytes(b"cache")
    config = create_config("images", shapes, TensorRTBuildConfig(min_batch=1, opt_batch=4, max_batch=8,
                                                                 timing_cache=cache, allow_tf32=True))
    assert config.tf32 and config.timing_cache_path == str(cache)


def test_importing_the_tensorrt_module_loads_neither_tensorrt_nor_polygraphy():
    code = ("import sys, singer_deploy.export.tensorrt; "
            "print(sorted(m for m in ('tensorrt', 'polygraphy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and CUDA are available here: the unavailable path cannot be shown")
def test_tensorrt_steps_say_not_available_here(tmp_path):
    onnx_file = _identity_onnx(tmp_path / "m.onnx")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not available here") as build_error:
        build_engine(onnx_file, tmp_path / "m.engine", precision="fp32")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"PLAN")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not available here") as run_error:
        TensorRTRunner(engine).load()
    for error in (build_error.value, run_error.value):
        assert error.expected and error.found and error.fix   # what the CLI prints, with exit code 3
        if importlib.util.find_spec("tensorrt") is None:
            assert "ImportError" in error.found and "singer-deploy[gpu]" in error.fix
    assert not engine.with_name("m.engine.json").exists()   # nothing is written before the runtime is found


def test_tensorrt_build_and_run_on_a_gpu(tmp_path):
    if not HAVE_TRT:
        pytest.skip("TensorRT is not installed (or there is no CUDA device): the engine build and TrtRunner cannot run")
    from export_fixtures import shape_images, tiny_vit
    from singer_deploy.export.onnx import export_onnx
    from singer_deploy.export.parity import compare_outputs
    from singer_deploy.export.runner import TorchRunner

    student = tiny_vit()
    onnx_path = export_onnx(student, tmp_path / "s.onnx").path
    built = build_engine(onnx_path, tmp_path / "s.engine", precision="fp32",
                         config=TensorRTBuildConfig(min_batch=1, opt_batch=4, max_batch=8,
                                                    timing_cache=tmp_path / "tc.bin"))
    assert built.precision_check.passed and read_sidecar(built.engine_path)["precision"] == "fp32"
    images = shape_images(12, 28, 14)
    report = compare_outputs(TorchRunner(student).run(images), TensorRTRunner(built.engine_path).run(images),
                             "fp32")
    assert report.passed, report.markdown()
