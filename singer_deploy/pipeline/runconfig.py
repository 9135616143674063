"""The run configuration (YAML or dict) for `distill_and_export`, validated before any work starts.

Unknown keys, wrong types and impossible combinations fail with a ConfigError that names the key, e.g.
`train.stpes: unknown key (did you mean 'steps'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from singer_deploy.config import SingerConfig, TrainConfig
from singer_deploy.errors import ConfigError, SingerDeployError

PLANTED = "planted"


@dataclass(frozen=True)
class ModelSpec:
    """A timm model name (or "planted" for the built-in planted-artifact teacher), with optional local weights.

    timm's sources work too: `local-dir:/path` (config.json + weights) and `hf-hub:org/name`, resolved from the
    local Hugging Face cache only (singer_deploy/models/hub.py); they bring their own weights."""

    name: str = PLANTED
    weights: str | None = None
    pretrained: bool = False
    kwargs: dict = field(default_factory=dict)        # passed to timm.create_model (img_size, depth, ...)
    planted: dict = field(default_factory=dict)       # PlantedConfig fields when name == "planted"


@dataclass(frozen=True)
class DataSpec:
    """"synthetic" (offline generator) or a folder / list file of images."""

    source: str = "synthetic"
    n: int = 512                   # synthetic training images
    eval_n: int = 64               # held-out images for parity, metrics and the report
    flat_share: float = 0.08       # synthetic: share of exactly flat patches (where planted artifacts land)
    seed: int = 0
    crop_pct: float | None = None  # folders: eval centre-crop fraction; None = 1.0 when the images already have the
                                   # model's input size, else the teacher's pretrained crop_pct
    augment: bool = True           # folders: timm's training transform (random resized crop + flip) for training

    def __post_init__(self):
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError("data.crop_pct must lie in (0, 1]", expected="0 < crop_pct <= 1",
                              found=repr(self.crop_pct),
                              fix="use 1.0 for images already at the model's size, or leave it unset")


@dataclass(frozen=True)
class ExportSpec:
    formats: tuple[str, ...] = ("onnx", "openvino")
    precision: str = "fp32"
    calibration_size: int = 64     # images for INT8 calibration (the field's advice for ViTs is a few hundred)
    benchmark: bool = True
    golden_size: int = 32          # images in the run's shared golden reference set (all artifacts point at it)
    polygraphy_goldens: bool = False   # also write the goldens in Polygraphy's formats (needs polygraphy)


@dataclass(frozen=True)
class RunConfig:
    teacher: ModelSpec = ModelSpec()
    student: ModelSpec = ModelSpec(name="vit_tiny_patch16_224")
    data: DataSpec = DataSpec()
    layers: tuple[int, ...] = ()
    singer: SingerConfig = SingerConfig()
    train: TrainConfig = TrainConfig()
    export: ExportSpec = ExportSpec()
    out_dir: str = "runs/singer"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file (not yet validated), with clear errors for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("The config file does not exist", expected="a YAML file", found=str(path),
                          fix="check the path (examples/ has working configs)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text file", expected="a UTF-8 YAML file",
                          found=f"binary content ({err.reason} at byte {err.start})",
                          fix="pass the YAML config (examples/demo.yaml is one)") from err
    except OSError as err:
        raise ConfigError(f"Cannot read the config file {path}", expected="a readable file",
                          found=f"{type(err).__name__}: {err.strerror or err}", fix="check the path and its "
                          "permissions") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML", expected="a YAML mapping", found=str(err).splitlines()[0],
                          fix="fix the YAML syntax") from err
    if raw is None:
        raise ConfigError(f"The config file {path} is empty", expected="key: value pairs (at least the teacher, "
                          "student and data sections)", found="an empty document",
                          fix="start from examples/demo.yaml")
    if not isinstance(raw, dict):
        raise ConfigError("The config must be a mapping", expected="key: value pairs at the top level",
                          found=type(raw).__name__, fix="see examples/demo.yaml")
    return raw


def load_run_config(source: str | Path | dict) -> RunConfig:
    """Parse and validate a YAML file or a dict into a RunConfig."""
    raw = source if isinstance(source, dict) else read_config_file(source)
    config = _build(RunConfig, raw, "")
    _check_combinations(config)
    return config


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping", expected="key: value pairs",
                          found=repr(raw), fix=f"write {prefix} as a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            raise ConfigError(f"{name}: unknown key", expected=f"one of {', '.join(fields)}", found=str(key),
                              fix=f"did you mean '{close[0]}'?" if close else "remove it")
        values[key] = _convert(hints[key], value, name)
    try:
        return cls(**values)
    except SingerDeployError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _convert(hint, value: Any, name: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _type_error(name, "a mapping", value)
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise _type_error(name, hint.__name__, value)
    if hint is float:
        if isinstance(value, str) and _is_number(value):
            # YAML 1.1 (PyYAML) reads 1e-3 as text: a float needs a dot ("1.0e-3") or the plain form ("0.001").
            raise ConfigError(f"{name}: YAML read {value!r} as text, not a number", expected="a number",
                              found=f"the string {value!r} (YAML needs a dot in the mantissa to read an exponent "
                                    "as a number)", fix=f"write {name.rsplit('.', 1)[-1]}: {_yaml_float(value)}")
        raise _type_error(name, "a number", value)
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_float(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else repr(float(text))


def _type_error(name: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{name}: wrong type", expected=expected, found=f"{value!r} ({type(value).__name__})",
                       fix=f"set {name} to {expected}")


def _check_combinations(config: RunConfig) -> None:
    from singer_deploy.export.formats import check_precision, normalize_precision, resolve_format

    formats = [resolve_format(name) for name in config.export.formats]
    precision = normalize_precision(config.export.precision)
    for fmt in formats:
        check_precision(fmt, precision)
    if "tensorboard" in config.train.loggers and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.loggers: tensorboard is not installed", expected="the tensorboard package",
                          found="no module named tensorboard",
                          fix="pip install 'singer-deploy[tensorboard]', or drop tensorboard from train.loggers")
    if config.export.golden_size < 1:
        raise ConfigError("export.golden_size must be at least 1", expected="an int >= 1 (default 32)",
                          found=str(config.export.golden_size), fix="e.g. golden_size: 32")
    if precision == "int8" and config.export.calibration_size < 1:
        raise ConfigError("export.precision: INT8 needs calibration data", expected="export.calibration_size >= 1",
                          found=str(config.export.calibration_size), fix="set calibration_size (e.g. 300)")
    if config.data.source != "synthetic" and not Path(config.data.source).expanduser().exists():
        raise ConfigError("data.source: the image source does not exist", expected="'synthetic' or a folder/list",
                          found=config.data.source, fix="check the path")
    from singer_deploy.models.hub import is_hub_name, resolve_model_source

    for role in ("teacher", "student"):
        spec = getattr(config, role)
        if is_hub_name(spec.name):
            resolve_model_source(spec.name)  # a missing folder or cache entry fails here, before any work
    if config.teacher.name == PLANTED:
        from singer_deploy.models.planted import PlantedConfig

        try:
            planted = PlantedConfig(**config.teacher.planted)
        except TypeError as err:
            raise ConfigError(f"teacher.planted: {err}", expected="PlantedConfig fields",
                              found=str(sorted(config.teacher.planted)), fix="see singer_deploy.models.planted") from err
        for layer in config.layers:
            if not -planted.depth <= layer < planted.depth:
                raise ConfigError("layers: index beyond the teacher's depth",
                                  expected=f"indices in [-{planted.depth}, {planted.depth - 1}]", found=str(layer),
                                  fix="pick an existing teacher block")
