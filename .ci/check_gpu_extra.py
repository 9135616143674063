"""Check from resolved requirements that `pip install '.[gpu]'` never pulls the CPU `onnxruntime`.

The [gpu] extra cannot be installed on a machine without CUDA, and TensorRT's library wheels are fetched from
NVIDIA's package host at build time, so this resolves what pip can resolve from PyPI without installing anything:

1. the core package plus every [gpu] requirement that is not a TensorRT wheel, fully (`pip install --dry-run
   --report`, dependencies included), and
2. the TensorRT requirements' own declared dependencies (`--no-deps`; their metadata, not their libraries),

then fails if any ONNX Runtime build other than onnxruntime-gpu appears. Usage: python .ci/check_gpu_extra.py
(needs PyPI; about a minute). Not part of .ci/run: it tests the package index, not this code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT_BUILDS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"}
NEEDS_NVIDIA_HOST = ("tensorrt", "torch-tensorrt")


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def resolve(requirements: list[str], *, deps: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), "-c", str(ROOT / "constraints.txt"), *([] if deps else ["--no-deps"]),
                   *requirements]
        subprocess.run(command, check=True, cwd=ROOT)
        return json.loads(report.read_text())


def main() -> int:
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pypi_part = [r for r in gpu if name_of(r) not in NEEDS_NVIDIA_HOST]
    nvidia_part = [r for r in gpu if name_of(r) in NEEDS_NVIDIA_HOST]
    full = resolve([str(ROOT), *pypi_part], deps=True)
    installed = {name_of(item["metadata"]["name"]): item["metadata"]["version"] for item in full["install"]}
    print(f"resolved core + {pypi_part}: {len(installed)} distributions; ONNX Runtime builds: "
          f"{ {k: v for k, v in installed.items() if k in ORT_BUILDS} }")
    declared = {}
    for requirement in nvidia_part:
        try:
            item = resolve([requirement], deps=False)["install"][0]["metadata"]
        except subprocess.CalledProcessError:
            print(f"{requirement}: its metadata cannot be built here (its sdist downloads from NVIDIA's host)")
            continue
        declared[item["name"]] = [name_of(r) for r in item.get("requires_dist", [])]
        print(f"{item['name']} {item['version']} declares: {', '.join(declared[item['name']])}")
    ort = {k for k in installed if k in ORT_BUILDS} | {d for deps in declared.values() for d in deps
                                                       if d in ORT_BUILDS}
    if ort != {"onnxruntime-gpu"}:
        print(f"FAIL: the [gpu] extra brings ONNX Runtime builds {sorted(ort)}; expected onnxruntime-gpu only")
        return 1
    print("ok: [gpu] brings onnxruntime-gpu and no other ONNX Runtime build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
