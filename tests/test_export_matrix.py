"""Every CPU format subset x every precision through `singer-deploy export RUN_DIR` and through `run`.

One distilled run is shared: each combination exports its student again (the export-only path the CLI's `export`
takes), and must exit 0 leaving exactly the artifacts and golden bundles that combination promises, each of which
re-verifies against its bundle through `singer-deploy verify`. `run` itself is exercised with the OpenVINO-only
reduced precisions that once exited 70 (issue 21).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from singer_deploy.errors import EXIT_INPUT, EXIT_OK
from singer_deploy.export.golden import verify
from singer_deploy.export.hardware import host_capabilities
from singer_deploy.pipeline.cli import main

STUDENT_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = {
    "teacher": {"name": "planted", "planted": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4,
                                               "artifact_layer": 2, "null_dim": 4}},
    "student": {"name": "vit_tiny_patch16_224", "kwargs": STUDENT_KW},
    "data": {"n": 24, "eval_n": 12, "flat_share": 0.08},
    "layers": [3],
    "singer": {"rank": 8, "preset": "published"},
    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2},
    "export": {"formats": [], "benchmark": False, "calibration_size": 16, "golden_size": 4},
}

SUBSETS = (("onnx",), ("openvino",), ("onnx", "openvino"))
PRECISIONS = ("fp32", "fp16", "int8", "auto")

# File each artifact key is written to (OpenVINO IRs come with a .bin beside the .xml).
FILES = {"onnx/fp32": "student.onnx", "onnx/fp16": "student_fp16.onnx", "onnx/int8": "student_int8.onnx",
         "openvino/fp32": "student_fp32.xml", "openvino/fp16": "student_fp16.xml", "openvino/int8": "student_int8.xml",
         "openvino/bf16": "student_fp32.xml"}   # the FP32 IR, run at the bf16 inference precision hint
# The inference precision hint each OpenVINO artifact is gated and shipped with (auto: FP16 computes in FP16 where
# this host can).
HINTS = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "f32"}


def expected_artifacts(fmt: str, precision: str) -> set[str]:
    """What one format leaves for one requested precision (the contract of docs/export.md)."""
    host = host_capabilities()
    if precision == "auto":   # every candidate the host computes natively is built, gated and kept
        native = {"fp32", "int8"} | ({"fp16"} if host.fp16 or fmt == "openvino" else set()) | \
            ({"bf16"} if host.bf16 and fmt == "openvino" else set())
        return {f"{fmt}/{p}" for p in native}
    built = {precision} | ({"fp32"} if precision == "int8" else set())   # INT8 is measured against FP32
    if fmt == "openvino":
        built |= {"fp32", "fp16"}                                        # the IR pair is always written
    return {f"{fmt}/{p}" for p in built}


def expected_shipped(formats: tuple[str, ...], precision: str) -> set[str] | None:
    """Formats with one shipped artifact; None when every artifact ships (a single plain precision)."""
    return set(formats) if precision in ("int8", "auto") else None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("matrix")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["distill", str(config), "--out-dir", str(root / "run"), "--no-progress"]) == EXIT_OK
    return root / "run"


def check_export(out: Path, formats: tuple[str, ...], precision: str) -> dict:
    """The export manifest in `out` holds exactly the promised artifacts, each on disk with a passing golden."""
    manifest = json.loads((out / "export_manifest.json").read_text())
    expected = set().union(*(expected_artifacts(f, precision) for f in formats))
    assert set(manifest["artifacts"]) == expected, (formats, precision)
    shipped = manifest["shipped"]
    assert (None if shipped is None else set(shipped)) == expected_shipped(formats, precision)
    assert manifest["passed"] is True
    host = host_capabilities()
    for key, record in manifest["artifacts"].items():
        path = Path(record["path"])
        assert path.name == FILES[key] and path.is_file(), key
        if path.suffix == ".xml":
            assert path.with_suffix(".bin").is_file(), key
        bundle = out / "goldens" / key.replace("/", "-")
        assert Path(record["golden_dir"]) == bundle and (bundle / "manifest.json").is_file(), key
        if key.startswith("openvino/"):
            fmt_precision = key.split("/")[1]
            hint = "f16" if precision == "auto" and fmt_precision == "fp16" and host.fp16 else HINTS[fmt_precision]
            assert record["runner_options"] == {"inference_precision": hint}, key
            bundle_manifest = json.loads((bundle / "manifest.json").read_text())
            assert bundle_manifest["runner_options"] == record["runner_options"], key
            # verify (and so the CLI and the pytest fixture) runs the IR at the hint it was gated with.
            report = verify(path, bundle)
            assert report.passed and report.notes["runner"]["requested_precision_hint"] == hint, key
        elif shipped is None or key in shipped.values():
            assert main(["verify", str(path), str(bundle)]) == EXIT_OK, key
    assert (out / "goldens" / "reference" / "golden.npz").is_file()
    return manifest


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("formats", SUBSETS, ids="+".join)
def test_export_run_dir_leaves_what_each_format_and_precision_promise(run_dir, formats, precision, tmp_path,
                                                                      capsys):
    out = tmp_path / "export"
    code = main(["export", str(run_dir), "--formats", *formats, "--precision", precision, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    manifest = check_export(out, formats, precision)
    if precision == "auto":
        rows = {row["key"]: row for row in manifest["precision_decision"]["table"]}
        assert set(manifest["shipped"].values()) <= set(manifest["artifacts"]) <= set(rows)
        assert all(f"auto {key}: " in captured.out for key in rows)


def test_bf16_is_an_openvino_precision_and_refused_for_onnx(run_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["export", str(run_dir), "--formats", "openvino", "--precision", "bf16", "--out", str(out)]) == EXIT_OK
    manifest = check_export(out, ("openvino",), "bf16")
    realised = manifest["artifacts"]["openvino/bf16"]["runner"]["realised_precision"]
    if host_capabilities().bf16:
        assert realised == "bf16"
    code = main(["export", str(run_dir), "--formats", "onnx", "openvino", "--precision", "bf16", "--out",
                 str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT and "onnx cannot carry precision bf16" in err.lower() and "Traceback" not in err


@pytest.mark.parametrize("precision", ("fp16", "int8"))
def test_run_with_openvino_alone_at_a_reduced_precision(tmp_path, precision, capsys):
    config = tmp_path / "ov.yaml"
    config.write_text(yaml.safe_dump({**TINY, "export": {**TINY["export"], "formats": ["openvino"],
                                                         "precision": precision}}))
    code = main(["run", str(config), "--out-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == EXIT_OK, capsys.readouterr().err
    manifest = check_export(tmp_path / "run" / "export", ("openvino",), precision)
    # The model card says how each shipped artifact was gated: a deployment runs it the same way.
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    shipped = manifest["artifacts"] if manifest["shipped"] is None else manifest["shipped"].values()
    for key in shipped:
        assert f"- {key}: inference_precision={manifest['artifacts'][key]['runner_options']['inference_precision']}" \
            in card


def test_batch_sizes_are_checked_before_any_work(run_dir, tmp_path, capsys):
    code = main(["export", str(run_dir), "--precision", "auto", "--batch-sizes", "1", "0", "--out",
                 str(tmp_path / "never")])
    assert code == EXIT_INPUT and "batch_sizes must list positive integers" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
