"""The layer rule of docs/architecture.md, checked on the source: imports only point down (or sideways).

Every module's imports are read with `ast` (deferred imports inside functions included) and each imported
singer_deploy module must sit in the same layer or a lower one than the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Installed package -> folder in this repository (pyproject.toml's package-dir mapping).
PACKAGE_DIRS = {"singer_deploy.export": ROOT / "export", "singer_deploy.calibration": ROOT / "calibration",
                "singer_deploy": ROOT / "singer_deploy"}

# Bottom (0) to top. A module not listed under a sub-package belongs to the root layer.
LAYERS = {
    "singer_deploy": 0,                 # config, errors, io, the lazy package facade
    "singer_deploy.models": 1,
    "singer_deploy.method": 2,
    "singer_deploy.train": 3,
    "singer_deploy.export": 4,
    "singer_deploy.calibration": 5,
    "singer_deploy.reporting": 6,
    "singer_deploy.evaluation": 7,
    "singer_deploy.pipeline": 8,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(min(len(parts), 2), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def source_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            modules.setdefault(name, path)   # the longer package prefix (export/calibration) wins
    return modules


def imported_modules(path: Path, module: str) -> set[str]:
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import submodule`
    return {m for m in found if m == "singer_deploy" or m.startswith("singer_deploy.")}


def test_every_module_has_a_layer():
    for module in source_modules():
        layer_of(module)


def test_imports_only_point_down():
    modules = source_modules()
    upward = []
    for module, path in sorted(modules.items()):
        own = layer_of(module)
        for target in sorted(imported_modules(path, module)):
            if target not in modules and target.rsplit(".", 1)[0] in modules:
                target = target.rsplit(".", 1)[0]            # `from module import name`
            if target in modules and layer_of(target) > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {layer_of(target)})")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from singer_deploy.pipeline.api import distill_and_export\n")
    assert "singer_deploy.pipeline.api" in imported_modules(bad, "singer_deploy.models.bad")
    assert layer_of("singer_deploy.pipeline.api") > layer_of("singer_deploy.models.bad")


@pytest.mark.parametrize("module", ["singer_deploy.export.parity", "singer_deploy.calibration.policy"])
def test_installed_subpackages_map_to_their_folders(module):
    assert module in source_modules()
