"""`key=value` overrides on the command line (`singer-deploy run cfg.yaml train.steps=100 export.precision=fp16`).

Dotted keys address nested sections, values are read as YAML (`100` an int, `[onnx, openvino]` a list, `true` a
bool, `null` None), and the result is merged into the config's raw mapping before validation, so a mistyped key
fails exactly like one in the YAML file (`train.stpes: unknown key ... did you mean 'steps'?`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import yaml

from singer_deploy.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], object]:
    """("train.steps=100") -> (["train", "steps"], 100)."""
    key, sep, text = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(part.strip() for part in path):
        raise ConfigError(f"Cannot read the override {item!r}", expected="KEY=VALUE with a dotted key, e.g. "
                          "train.steps=100 or export.formats=[onnx,openvino]", found=item,
                          fix="write the key, '=', then the value (quote it for the shell if it has spaces)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"The value of {key} is not valid YAML", expected="a YAML scalar, list or mapping",
                          found=text, fix="e.g. 3, 0.5, true, fp16, [onnx, openvino]") from err
    return [part.strip() for part in path], value


def apply_overrides(raw: dict, items: Sequence[str]) -> dict:
    """A copy of `raw` with every `key=value` item merged in (later items win)."""
    merged = copy.deepcopy(raw)
    for item in items:
        path, value = parse_override(item)
        section = merged
        for depth, part in enumerate(path[:-1]):
            current = section.setdefault(part, {})
            if current is None:
                current = section[part] = {}
            if not isinstance(current, dict):
                where = ".".join(path[:depth + 1])
                raise ConfigError(f"{where} is a value, not a section", expected=f"{where}=VALUE",
                                  found=item, fix=f"set {where} as a whole, e.g. {where}={current!r}")
            section = current
        section[path[-1]] = value
    return merged
