"""Reading a run configuration (YAML file or dict) for `distill_and_export`, validated before any work starts.

The dataclasses and their validation live in singer_deploy/config.py (RunConfig and its sections); this module
reads the YAML file. Unknown keys, wrong types and impossible combinations fail with a ConfigError that names the
key, e.g. `train.stpes: unknown key (did you mean 'steps'?)`. What a config needs from the machine (packages, local
hub models) is checked by pipeline/preflight.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from singer_deploy.config import RunConfig, from_mapping
from singer_deploy.errors import ConfigError, shown_path


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file (not yet validated), with clear errors for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("The config file does not exist", expected="a YAML file", found=shown_path(path),
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
    return from_mapping(RunConfig, source if isinstance(source, dict) else read_config_file(source))
