"""TensorRT engines from the exported ONNX, one path for TensorRT 10.x and 11.x, and their runner, through NVIDIA's
Polygraphy (`polygraphy.backend.trt`: NetworkFromOnnxPath, CreateConfig, EngineBytesFromNetwork, TrtRunner), which
NVIDIA keeps in step with TensorRT's API.

TensorRT 11 removed the precision builder flags (FP16/INT8/BF16), precision constraints and the INT8 calibrators;
networks are strongly typed, so the precision must already be in the ONNX (FP16 cast graph or INT8 Q/DQ, produced by
singer_deploy.calibration). The same code runs on 10.x by asking for a STRONGLY_TYPED network. Because other SDKs
shipped FP32 engines after that change without noticing, the precision the engine *actually* runs is read back with
the engine inspector and checked (docs/export.md, "TensorRT").

Metadata lives in a sidecar JSON (`model.engine.json`), never prepended to the plan, so trtexec and Polygraphy can
still open the engine. TensorRT and Polygraphy are imported only when an engine is built or run.

Nothing here could be run on the machines this SDK was developed on (no TensorRT, no CUDA): the build and the runner
are unverified. What needs no runtime (the ONNX's input and profile, the Polygraphy build config, the sidecar, the
layer-precision check, the errors when TensorRT is missing) is unit-tested.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from singer_deploy.config import TensorRTBuildConfig, normalize_precision
from singer_deploy.errors import BackendUnavailableError, ConfigError, ExportError
from singer_deploy.export.golden import artifact_sha256
from singer_deploy.export.polygraphy_goldens import import_polygraphy
from singer_deploy.export.runner import Runner, require_file
from singer_deploy.io import atomic_write_bytes

SIDECAR_SUFFIX = ".json"
LAYERS_SUFFIX = ".layers.json"

# Smallest share of typed engine layers that must run in the requested reduced precision. Low on purpose:
# LayerNorm / Softmax stay FP32 by policy and TensorRT fuses whole blocks into few Myelin layers, so the share
# of reduced-precision layers is well below 1 even for a correct engine. Zero reduced layers always fails.
REALISED_MIN_FRACTION = {"fp16": 0.25, "bf16": 0.25, "int8": 0.1}

_REDUCED = ("int8", "fp8", "fp16", "bf16")
# Order matters: "BFloat16" also contains "Float", "Half" must win over a generic float match.
_DTYPE_PATTERNS = (("int8", re.compile(r"int8", re.I)), ("fp8", re.compile(r"fp8|e4m3|e5m2", re.I)),
                   ("bf16", re.compile(r"bf16|bfloat16", re.I)), ("fp16", re.compile(r"fp16|half", re.I)),
                   ("fp32", re.compile(r"fp32|float", re.I)))
_RANK = {"int8": 0, "fp8": 1, "fp16": 2, "bf16": 2, "fp32": 3}


# ----------------------------------------------------------------------------------------------- pure logic

def profile_shapes(chw: tuple[int, int, int], min_batch: int = 1, opt_batch: int = 8,
                   max_batch: int = 32) -> dict[str, tuple[int, int, int, int]]:
    """Optimisation-profile shapes for a dynamic batch at one fixed resolution."""
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise ConfigError("Invalid TensorRT batch profile", expected="1 <= min_batch <= opt_batch <= max_batch",
                          found=f"min={min_batch}, opt={opt_batch}, max={max_batch}",
                          fix="order the three batch sizes")
    if len(chw) != 3 or any(int(d) <= 0 for d in chw):
        raise ConfigError("The engine input needs a fixed (C, H, W)", expected="three positive ints",
                          found=str(tuple(chw)), fix="export the ONNX at a fixed img_size")
    c, h, w = (int(d) for d in chw)
    return {"min": (min_batch, c, h, w), "opt": (opt_batch, c, h, w), "max": (max_batch, c, h, w)}


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def write_sidecar(engine_path: str | Path, metadata: dict) -> Path:
    """Write `<engine>.json` next to the engine (atomically); the engine file itself stays a plain plan."""
    path = sidecar_path(engine_path)
    atomic_write_bytes(path, json.dumps({"format": "tensorrt", **metadata}, indent=2, sort_keys=True,
                                        default=str).encode())
    return path


def read_sidecar(engine_path: str | Path) -> dict:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ExportError("The TensorRT engine has no sidecar metadata", expected=f"{path.name} beside the engine",
                          found=f"{path} missing", fix="rebuild with build_engine, or copy the .json with the engine")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError("The TensorRT sidecar is not valid JSON", expected="a JSON object",
                          found=f"{path}: {exc}", fix="rebuild the engine") from exc


def tensor_precision(description: str) -> str | None:
    """Map an inspector datatype string ("Half", "Row major linear FP16 format", "Int8", "Float") to a name."""
    for name, pattern in _DTYPE_PATTERNS:
        if pattern.search(description):
            return name
    return None   # Int32 / Int64 / Bool shape tensors carry no compute precision


def _tensor_descriptions(layer: dict) -> list[str]:
    found = []
    for side in ("Inputs", "Outputs"):
        for tensor in layer.get(side) or []:
            if isinstance(tensor, dict):
                # TensorRT 10 writes "Format/Datatype"; 11 splits it into "Format" and "DataType".
                for key, value in tensor.items():
                    if key.lower() in ("format/datatype", "datatype") and isinstance(value, str):
                        found.append(value)
    return found


def layer_precision(layer: dict) -> str | None:
    """The lowest floating precision among a layer's typed inputs/outputs (where its math can run), or None."""
    precisions = [p for p in map(tensor_precision, _tensor_descriptions(layer)) if p is not None]
    return min(precisions, key=_RANK.__getitem__) if precisions else None


def parse_layer_information(info: str | dict | list) -> list[dict]:
    """Layers of an engine-inspector JSON (string, parsed dict with "Layers", or a bare list)."""
    if isinstance(info, str):
        info = json.loads(info)
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    return [layer for layer in layers if isinstance(layer, dict)]


@dataclass
class PrecisionCheck:
    requested: str
    counts: dict[str, int]             # typed layers per realised precision
    reduced_fraction: float            # share of typed layers in the requested reduced precision
    passed: bool
    message: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_engine_precision(layer_info: str | dict | list, requested: str, *,
                           min_fraction: float | None = None) -> PrecisionCheck:
    """Does the built engine run the precision that was asked for? Judged from per-layer datatypes."""
    requested = normalize_precision(requested)
    layers = parse_layer_information(layer_info)
    counts: dict[str, int] = {}
    for layer in layers:
        precision = layer_precision(layer)
        if precision is not None:
            counts[precision] = counts.get(precision, 0) + 1
    typed = sum(counts.values())
    if typed == 0:
        raise ExportError("The engine layer report carries no datatypes",
                          expected="layer information from an engine built with ProfilingVerbosity.DETAILED",
                          found=f"{len(layers)} layers without Format/Datatype entries",
                          fix="rebuild with build_engine (it sets DETAILED profiling verbosity)")
    if requested == "fp32":
        reduced = {p: n for p, n in counts.items() if p in _REDUCED}
        passed = not reduced
        message = ("all typed layers run in FP32" if passed
                   else f"FP32 was requested but layers run in {reduced}")
        return PrecisionCheck(requested, counts, sum(reduced.values()) / typed, passed, message)
    need = REALISED_MIN_FRACTION[requested] if min_fraction is None else min_fraction
    fraction = counts.get(requested, 0) / typed
    passed = counts.get(requested, 0) > 0 and fraction >= need
    message = (f"{fraction:.0%} of typed layers run in {requested} (needs >= {need:.0%})" if passed else
               f"{requested} was requested but only {counts.get(requested, 0)} of {typed} typed layers run in it "
               f"({counts}); the ONNX probably carries no {requested} casts / Q/DQ nodes")
    return PrecisionCheck(requested, counts, fraction, passed, message)


# ------------------------------------------------------------------------------- build settings (no runtime)

def onnx_io(onnx_path: str | Path) -> tuple[str, tuple[int, int, int], tuple[str, ...]]:
    """(input name, fixed (C, H, W), output names) of an exported ONNX, read from the graph without the weights."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ExportError("The engine needs exactly one image input", expected="1 graph input",
                          found=str([value.name for value in inputs]), fix="export the student with export_onnx")
    dims = inputs[0].type.tensor_type.shape.dim
    chw = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims[1:])
    return inputs[0].name, chw, tuple(value.name for value in graph.output)


def create_config(input_name: str, shapes: dict[str, tuple[int, ...]], config: TensorRTBuildConfig):
    """Polygraphy's CreateConfig for one strongly typed build.

    No precision flag is set, whatever the precision: the precision is in the ONNX (FP16 casts or INT8 Q/DQ from
    singer_deploy.calibration), TensorRT 11 has no such flags and 10.x rejects them on strongly typed networks
    (docs/export.md, "TensorRT"). TF32 stays off unless allowed (FP32 engines must meet the FP32 gate). Polygraphy
    builds with DETAILED profiling verbosity by default, which the layer-precision check needs. The workspace limit
    is set at build time (`_workspace_limit`): its key is a TensorRT enum.
    """
    from polygraphy.backend.trt import CreateConfig, Profile

    profile = Profile().add(input_name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    cache = str(config.timing_cache) if config.timing_cache and Path(config.timing_cache).is_file() else None
    return CreateConfig(tf32=config.allow_tf32, fp16=False, bf16=False, int8=False, profiles=[profile],
                        builder_optimization_level=int(config.optimization_level), load_timing_cache=cache)


# ------------------------------------------------------------------------------------------- runtime-facing

def import_tensorrt() -> ModuleType:
    """TensorRT (through Polygraphy) and a CUDA device, or BackendUnavailableError saying which is missing."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise BackendUnavailableError("TensorRT is not available here: the tensorrt package is not installed",
                                      expected="tensorrt >= 10 and an NVIDIA GPU", found=f"ImportError: {exc}",
                                      fix="pip install 'singer-deploy[gpu]' on a CUDA machine, or use onnx/openvino"
                                      ) from exc
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT is not available here: no CUDA device",
                                      expected="an NVIDIA GPU visible to torch", found="torch.cuda.is_available() "
                                      "is False", fix="run the TensorRT steps on a GPU machine")
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError("TensorRT is too old", expected="TensorRT 10.x or 11.x",
                                      found=trt.__version__, fix="pip install 'tensorrt>=10'")
    import_polygraphy()
    return trt


@dataclass
class TensorRTBuild:
    engine_path: Path
    sidecar_path: Path
    layers_path: Path
    precision: str
    precision_check: PrecisionCheck
    seconds: float
    tensorrt_version: str


def _workspace_limit(trt, workspace_bytes: int):
    def apply(builder, network, builder_config) -> None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    return apply


def _build_plan(trt, onnx_path: Path, input_name: str, shapes: dict, config: TensorRTBuildConfig) -> bytes:
    """The serialized engine: Polygraphy's NetworkFromOnnxPath (strongly typed) -> CreateConfig -> build."""
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig
    from polygraphy.exception import PolygraphyException

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    builder_config = PostprocessConfig(create_config(input_name, shapes, config),
                                       _workspace_limit(trt, config.workspace_bytes))
    cache = str(config.timing_cache) if config.timing_cache else None
    try:
        return bytes(EngineBytesFromNetwork(network, config=builder_config, save_timing_cache=cache)())
    except PolygraphyException as exc:
        raise ExportError("TensorRT could not build the engine", expected="an ONNX graph TensorRT parses and builds",
                          found=str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
                          fix="see the TensorRT log above (parser errors name the op); raise workspace_bytes if "
                              "the builder ran out of memory") from exc


def _engine_layer_information(trt, plan: bytes) -> dict:
    from polygraphy.backend.trt import EngineFromBytes

    inspector = EngineFromBytes(plan)().create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str,
                 config: TensorRTBuildConfig | None = None, strict: bool = True) -> TensorRTBuild:
    """ONNX (precision already in the graph) -> strongly typed engine + sidecar + layer report, through Polygraphy.

    `precision` names what the ONNX carries (fp32 / fp16 / bf16 / int8); it is checked against the built engine
    and, when `strict`, a mismatch raises ExportError (the engine stays on disk for inspection). The plan is written
    atomically (singer_deploy/io.py) rather than with Polygraphy's SaveEngine, so a killed build leaves no half
    engine.
    """
    trt = import_tensorrt()
    precision = normalize_precision(precision)
    config = config or TensorRTBuildConfig()
    onnx_path = require_file(onnx_path, "ONNX")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    input_name, chw, output_names = onnx_io(onnx_path)
    shapes = profile_shapes(chw, config.min_batch, config.opt_batch, config.max_batch)
    plan = _build_plan(trt, onnx_path, input_name, shapes, config)
    atomic_write_bytes(engine_path, plan)
    seconds = time.perf_counter() - start
    layer_info = _engine_layer_information(trt, plan)
    layers_path = engine_path.with_name(engine_path.name + LAYERS_SUFFIX)
    atomic_write_bytes(layers_path, json.dumps(layer_info, indent=1).encode())
    check = check_engine_precision(layer_info, precision)
    import torch

    side = write_sidecar(engine_path, {
        "precision": precision, "precision_check": check.to_dict(), "tensorrt": trt.__version__,
        "input_name": input_name, "input_chw": list(chw), "profile": {k: list(v) for k, v in shapes.items()},
        "output_names": list(output_names), "onnx_sha256": artifact_sha256(onnx_path), "tf32": config.allow_tf32,
        "workspace_bytes": config.workspace_bytes, "optimization_level": config.optimization_level,
        "device": torch.cuda.get_device_name(), "compute_capability": list(torch.cuda.get_device_capability()),
        "build_seconds": seconds, "layers_file": layers_path.name})
    if strict and not check.passed:
        raise ExportError("The built engine does not run the requested precision", expected=precision,
                          found=check.message, fix="produce the precision in the ONNX (singer_deploy.calibration) "
                          f"and rebuild; engine kept at {engine_path} for inspection")
    return TensorRTBuild(engine_path, side, layers_path, precision, check, seconds, trt.__version__)


class TensorRTRunner(Runner):
    """Runs a .engine through Polygraphy's TrtRunner (name-based I/O, dynamic batch within the profile)."""

    name = "tensorrt"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._runner = None
        self._input_name = ""
        self._max_batch = 1

    def _load(self) -> None:
        require_file(self.path, "TensorRT engine")
        trt = import_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.exception import PolygraphyException

        try:
            runner = TrtRunner(EngineFromBytes(self.path.read_bytes()))
            runner.activate()
        except PolygraphyException as exc:
            raise ExportError("TensorRT cannot deserialize the engine", expected="a plan built by this TensorRT "
                              "version on this GPU family", found=f"{self.path}: {exc}",
                              fix="rebuild the engine here (plans are not portable across versions/GPUs)") from exc
        inputs = list(runner.get_input_metadata())
        if len(inputs) != 1:
            runner.deactivate()
            raise ExportError("The engine must have exactly one image input", expected="1 input",
                              found=f"{inputs}", fix="export the student with export_onnx")
        engine = runner.engine
        self._input_name = inputs[0]
        self.output_names = tuple(name for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
                                  if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT)
        self.input_chw = tuple(int(d) for d in engine.get_tensor_shape(self._input_name))[1:]
        self._max_batch = int(engine.get_tensor_profile_shape(self._input_name, 0)[2][0])
        self._runner = runner
        sidecar = read_sidecar(self.path) if sidecar_path(self.path).is_file() else {}
        self.info = {"runtime": f"tensorrt {trt.__version__} (polygraphy TrtRunner)", "device": "cuda",
                     "max_batch": self._max_batch, "precision": sidecar.get("precision"), "path": str(self.path)}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # Batches larger than the profile's max are run in profile-sized chunks.
        parts = [self._runner.infer({self._input_name: batch[i:i + self._max_batch]}, copy_outputs_to_host=True)
                 for i in range(0, len(batch), self._max_batch)]
        return {name: np.concatenate([np.asarray(p[name], dtype=np.float32) for p in parts])
                for name in self.output_names}
