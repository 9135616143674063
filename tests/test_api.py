"""The one-call pipeline end to end on a tiny configuration (CPU), and the CLI around it."""

import json
import re

import pytest

from singer_deploy.pipeline.api import PipelineResult, distill_and_export
from singer_deploy.pipeline.cli import EXIT_INPUT, EXIT_OK, EXIT_PARITY, format_summary, main

TINY = {
    "teacher": {"name": "planted"},
    "student": {"name": "vit_tiny_patch16_224",
                "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    "data": {"n": 32, "eval_n": 12, "flat_share": 0.08},
    "layers": [4],
    "singer": {"rank": 8, "preset": "published"},
    "train": {"steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 2},
    "export": {"formats": ["onnx", "openvino"]},
}
# For tests about run directories: one format, no latency benchmark.
QUICK_EXPORT = {"formats": ["onnx"], "benchmark": False}


# Every runner the module's finished run loaded (a runner loads once; opening an artifact again is a new runner).
LOADED_RUNNERS: list = []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from singer_deploy.export.runner import Runner

    out = tmp_path_factory.mktemp("run") / "tiny"
    original = Runner.load

    def recording_load(self):
        if not self._loaded:
            LOADED_RUNNERS.append(self)
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Runner, "load", recording_load)
        return distill_and_export(TINY, out_dir=str(out), progress=False)


def test_pipeline_writes_a_self_explaining_run_directory(finished):
    out = finished.out_dir
    assert finished.passed
    for name in ("manifest.json", "student/model.safetensors", "student/config.json", "projectors.safetensors", "refiner.safetensors",
                 "refined_teacher.safetensors", "metrics.jsonl", "report.html", "export/student.onnx"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["train"]["steps"] == 4 and manifest["passed"] is True
    assert {"torch", "timm", "onnxruntime", "openvino"} <= set(manifest["versions"])
    assert set(finished.summary["parity"]) == {"onnx/fp32", "openvino/fp32", "openvino/fp16"}
    artifacts = finished.summary["artifacts"]
    assert set(artifacts) == {"4", "7"}                     # every distilled layer, not only the last
    for layer in ("4", "7"):
        assert artifacts[layer]["raw teacher"]["hnr_4"] > 0.05 and artifacts[layer]["clean twin"]["hnr_4"] < 0.01
        assert artifacts[layer]["raw teacher"]["artifact_ratio"] > 5 > 1.5 > artifacts[layer]["clean twin"][
            "artifact_ratio"]
        # 4 steps leave the artifacts: the verdict says so, per layer, next to the ratios it rests on.
        assert finished.summary["artifacts remain"][layer].startswith("artifacts REMAIN in refined teacher")
    rows = manifest["artifact_metrics"]
    assert {(row["method"], row["layer"]) for row in rows} >= {(source, layer) for layer in (4, 7) for source in
                                                              ("raw teacher", "clean twin", "refined teacher",
                                                               "student", "student (projected)")}
    assert manifest["summary"]["artifacts remain"] == finished.summary["artifacts remain"]
    assert set(finished.summary["nullspace k below tau"]) == {"4", "7"}
    assert {row["runner"] for row in finished.latency} >= {"pytorch/fp32", "onnx/fp32"}


def test_the_benchmark_reuses_the_runners_the_export_opened(finished):
    artifacts = set(finished.summary["parity"])
    # OpenVINO IRs are timed at parity's f32 hint and again at the plugin's deployment default.
    defaults = {f"{key}@default" for key in artifacts if key.startswith("openvino/")}
    assert {row["runner"] for row in finished.latency} == artifacts | {"pytorch/fp32"} | defaults
    # One runner per artifact plus the eager reference (plus the deployment-default ones): none opened twice.
    assert len(LOADED_RUNNERS) == len(artifacts) + 1 + len(defaults)
    rows = {row["runner"]: row for row in finished.latency}
    assert rows["onnx/fp32"]["parity"] == "pass" and rows["onnx/fp32"]["realised_precision"] == "fp32"
    assert rows["openvino/fp32@default"]["realised_precision"] and rows["pytorch/fp32"]["parity"] is None
    assert {row["runner"]: row["info"] for row in finished.latency}["onnx/fp32"] == \
        next(r.info for r in LOADED_RUNNERS if r.info.get("provider"))


def test_parity_and_latency_rows_keep_the_producers_schema_to_the_manifest(finished):
    manifest = json.loads((finished.out_dir / "manifest.json").read_text())
    export_manifest = json.loads((finished.out_dir / "export" / "export_manifest.json").read_text())
    assert manifest["parity"] == json.loads(json.dumps(finished.parity))
    assert manifest["latency"] == json.loads(json.dumps(finished.latency, default=str))
    assert {(row["candidate"], row["output"]) for row in manifest["parity"]} == {
        (key, output) for key, a in export_manifest["artifacts"].items() for output in a["parity"]["outputs"]}
    for row in manifest["parity"]:   # the same names and numbers as each artifact's ParityReport
        stored = export_manifest["artifacts"][row["candidate"]]["parity"]
        assert row["precision"] == stored["precision"] and row["passed"] == stored["outputs"][row["output"]]["passed"]
        metrics = stored["outputs"][row["output"]]["metrics"]
        assert {k: v for k, v in row.items() if k not in ("candidate", "precision", "output", "passed")} == \
            {k: metrics[k] for k in row if k in metrics}
    assert {"runner", "p50_ms", "throughput_ips", "speedup_vs_pytorch/fp32"} <= set(manifest["latency"][0])


def test_report_holds_pictures_and_tables(finished):
    html = (finished.out_dir / "report.html").read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) >= 4
    for needle in ("onnx", "openvino", "raw teacher", "refined teacher", "clean twin"):
        assert needle in html
    assert "http://" not in html and "https://" not in html


def test_a_finished_run_is_not_clobbered(finished):
    again = distill_and_export(TINY, out_dir=str(finished.out_dir), progress=False, export=QUICK_EXPORT,
                               train={**TINY["train"], "steps": 2})
    assert again.out_dir == finished.out_dir.parent / f"{finished.out_dir.name}-2"
    assert json.loads((finished.out_dir / "manifest.json").read_text())["config"]["train"]["steps"] == 4


def test_an_interrupted_run_resumes(tmp_path, monkeypatch):
    import singer_deploy.pipeline.api as api

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after distillation wrote its final checkpoint
    monkeypatch.setattr(api, "export", crash)
    with pytest.raises(KeyboardInterrupt):
        distill_and_export(TINY, out_dir=str(tmp_path / "r"), progress=False, export=QUICK_EXPORT)
    monkeypatch.undo()
    lines_before = (tmp_path / "r" / "metrics.jsonl").read_text().count("\n")
    result = distill_and_export(TINY, out_dir=str(tmp_path / "r"), progress=False, export=QUICK_EXPORT)
    assert result.out_dir == tmp_path / "r"
    # The resumed run found the finished checkpoint and trained no further step.
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count("\n") == lines_before


def test_cli_exit_codes(tmp_path, finished, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stpes: 3}\n")
    assert main(["check-config", str(bad)]) == EXIT_INPUT
    assert "train.stpes: unknown key" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == EXIT_INPUT
    golden = next((finished.out_dir / "export" / "goldens").glob("onnx-fp32"))
    assert main(["verify", str(finished.out_dir / "export" / "student.onnx"), str(golden)]) == EXIT_OK


def test_cli_verify_fails_on_a_perturbed_artifact(tmp_path, finished):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(finished.out_dir / "export" / "student.onnx"))
    init = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    array = numpy_helper.to_array(init).copy()
    array += 0.5 * array.std()
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(model, str(perturbed))
    golden = finished.out_dir / "export" / "goldens" / "onnx-fp32"
    assert main(["verify", str(perturbed), str(golden)]) == EXIT_PARITY


def test_a_redirected_cli_run_logs_plain_progress_lines_and_the_verdict(tmp_path):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "run")}))
    log = tmp_path / "log.txt"
    with log.open("w") as out:    # a file, as in CI: not a terminal
        done = subprocess.run([sys.executable, "-c", "import sys; from singer_deploy.pipeline.cli import main; "
                               "sys.exit(main())", "distill", str(config)], stdout=out, stderr=subprocess.STDOUT,
                              timeout=600)
    text = log.read_text()
    assert done.returncode == EXIT_OK, text[-3000:]
    assert "\r" not in text                                         # no progress-bar redraws
    progress = [line for line in text.splitlines() if line.startswith("INFO distil[singer] step ")]
    assert progress[0].startswith("INFO distil[singer] step 2/4 (50%) | loss ") and " img/s | ETA " in progress[0]
    assert progress[-1].startswith("INFO distil[singer] step 4/4 (100%) | loss ") and "| done in " in progress[-1]
    assert any(line.startswith("Verdict: ") for line in text.splitlines())


def test_keyword_shortcuts_and_a_distill_only_run(tmp_path):
    import singer_deploy

    result = singer_deploy.distill_and_export(
        TINY, teacher="planted", out_dir=tmp_path / "short", formats=[], method="fitnet", progress=False,
        train={**TINY["train"], "steps": 2})
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["config"]["train"]["method"] == "fitnet" and manifest["config"]["export"]["formats"] == []
    assert result.passed and result.parity == [] and not (result.out_dir / "export").exists()
    assert "not run" in (result.out_dir / "report.html").read_text().lower()


def test_cli_bench_and_export_on_a_finished_run(finished, tmp_path, capsys):
    assert main(["bench", str(finished.out_dir), "--json", str(tmp_path / "bench.json")]) == EXIT_OK
    table = capsys.readouterr().out
    assert "pytorch/fp32" in table and "openvino/fp16" in table
    assert json.loads((tmp_path / "bench.json").read_text())[0]["runner"] == "pytorch/fp32"
    assert main(["export", str(finished.out_dir), "--formats", "ov", "--out", str(tmp_path / "ov")]) == EXIT_OK
    assert (tmp_path / "ov" / "student_fp32.xml").is_file()


def test_cli_help_reads_well(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "run", "distill", "export", "bench", "verify", "check-config"):
        assert command in out


def test_run_student_folder_is_a_timm_model_with_a_model_card(finished):
    """timm.create_model("local-dir:<run>/student") rebuilds the run's student: same raw last-block features as the
    exported artifacts were checked against; its README.md is the model card with the run's own numbers."""
    import numpy as np
    import timm
    import torch
    from safetensors.torch import load_file

    from singer_deploy.export.golden import open_runner

    student_dir = finished.out_dir / "student"
    model = timm.create_model(f"local-dir:{student_dir}", pretrained=True).eval()
    images = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        tokens = model.forward_intermediates(torch.from_numpy(images), indices=[-1], norm=False,
                                             intermediates_only=True, output_fmt="NLC")[0]
    onnx_out = open_runner(finished.out_dir / "export" / "student.onnx").load().run(images)
    np.testing.assert_allclose(tokens.numpy(), onnx_out["patch_tokens"], atol=1e-4)   # timm drops the prefix tokens
    saved = load_file(str(student_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    card = (student_dir / "README.md").read_text()
    assert "vit_tiny_patch16_224 distilled from planted (singer)" in card
    assert f'timm.create_model("local-dir:{student_dir}", pretrained=True)' in card
    assert "Layers (teacher -> student): [4, 7] -> " in card
    # The refinement settings that decide what the student learned, the preset and the keys it fills included.
    assert "preset published, rank 8" in card
    assert "outlier_target quantile, select_k from the data, info_tokens all, adapter_init nullspace" in card
    for row in finished.parity:  # the card's parity table carries the run's measured numbers
        assert f"| {row['candidate']} | {row['precision']} | {row['output']} | {row['token_cos_min']:.6g}" in card
    assert "| pytorch/fp32 |" in card and "hnr_4" in card and "synthetic shapes" in card


def test_cli_bench_options(finished, capsys):
    assert main(["bench", str(finished.out_dir), "--formats", "onnx", "--batch-sizes", "1", "2", "--threads", "1",
                 "--time-budget", "2"]) == EXIT_OK
    table = capsys.readouterr().out
    runners = {line.split("|")[1].strip() + "@" + line.split("|")[2].strip()
               for line in table.splitlines() if line.startswith("| ") and not line.startswith("| runner")}
    assert runners == {"pytorch/fp32@1", "onnx/fp32@1", "pytorch/fp32@2", "onnx/fp32@2"}   # no openvino rows
    assert main(["bench", str(finished.out_dir), "--formats", "tensorrt"]) == EXIT_INPUT
    # A batch beyond any machine's memory is refused before it is tiled (singer_deploy/memory.py), not OOM-killed.
    capsys.readouterr()
    assert main(["bench", str(finished.out_dir), "--batch-sizes", "1", str(10 ** 12)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "The benchmark: these settings need more memory" in err and "Fix: lower --batch-sizes" in err


def test_cli_overrides_on_run_are_validated_like_yaml(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))   # JSON is YAML
    assert main(["run", str(config), "train.stpes=2", "--out-dir", str(tmp_path / "never")]) == EXIT_INPUT
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert main(["check-config", str(config), "train.steps=2", "export.golden_size=4", "--print"]) == EXIT_OK
    printed = capsys.readouterr()
    assert "steps: 2\n" in printed.out and "golden_size: 4\n" in printed.out and "ok" in printed.err


def test_an_export_only_run_loads_the_student_without_building_the_teacher(finished, tmp_path, monkeypatch):
    import numpy as np

    import singer_deploy.pipeline.api as api
    from singer_deploy.export.golden import load_golden
    from singer_deploy.pipeline.export_only import export_run, load_run

    created = []
    load_backbone = api.load_backbone
    monkeypatch.setattr(api, "planted_teacher", lambda *args, **kwargs: pytest.fail("the teacher was built"))
    monkeypatch.setattr(api, "load_backbone", lambda name, **kw: created.append(name) or load_backbone(name, **kw))
    result = export_run(finished.out_dir, ["onnx"], "fp32", tmp_path / "again")
    assert created == [TINY["student"]["name"]] and result.passed
    # The same held-out images as the run itself, rebuilt from the manifest's teacher_input.
    np.testing.assert_array_equal(load_golden(result.artifacts["onnx/fp32"].golden_dir).inputs,
                                  load_golden(finished.out_dir / "export" / "goldens" / "onnx-fp32").inputs)
    monkeypatch.undo()

    # A run directory written before manifests recorded teacher_input still opens (building the teacher once).
    old = tmp_path / "old-run"
    old.mkdir()
    manifest = json.loads((finished.out_dir / "manifest.json").read_text())
    del manifest["teacher_input"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    for name in ("student/model.safetensors", "projectors.safetensors"):
        (old / name).parent.mkdir(exist_ok=True)
        (old / name).write_bytes((finished.out_dir / name).read_bytes())
    np.testing.assert_array_equal(load_run(old)[3], load_run(finished.out_dir)[3])


def test_the_summary_starts_with_the_verdict_and_stays_short(finished):
    lines = format_summary(finished).splitlines()
    assert lines[0].startswith(f"Run: {finished.out_dir}") and lines[1].startswith("Verdict: WARN - all 3 exported")
    verdict = finished.summary["verdict"]
    # Parity per artifact with its worst metric against its gate, then each layer, then what ships.
    parity = [line.split() for line in lines if line.startswith("  parity")]
    assert [(row[1], row[2]) for row in parity] == [(key, "pass") for key in finished.summary["parity"]]
    assert all("(gate" in line for line in lines if line.startswith("  parity"))
    assert [line.split()[1:4] for line in lines if line.startswith("  artifacts")] == [
        ["layer", "4", "REMAIN"], ["layer", "7", "REMAIN"]]            # 4 steps leave the artifacts
    assert [item["artifact"] for item in verdict["shipped"]] == list(finished.summary["parity"])
    # Aligned: the detail column starts at the same place on every verdict row.
    start = next(line for line in lines if line.startswith("  parity")).index("worst:")
    details = [line[start:] for line in lines if line.startswith(("  parity", "  artifacts", "  shipped"))]
    assert all(detail.startswith(("worst:", "artifact/normal norm raw teacher")) or
               re.match(r"\d+(\.\d+)? ms p50, \d+(\.\d+)?x eager", detail) for detail in details), details
    assert lines[-1].startswith("Full detail: ") and "report.html" in lines[-1]
    assert len(lines) <= 25 and "  method: singer" in lines


def test_int8_calibrates_on_training_images_disjoint_from_the_parity_images(tmp_path):
    from singer_deploy.calibration.holdout import image_hashes
    from singer_deploy.pipeline.api import build_data, build_models
    from singer_deploy.pipeline.runconfig import load_run_config

    result = distill_and_export(TINY, out_dir=str(tmp_path / "int8"), progress=False,
                                export={"formats": ["onnx"], "precision": "int8", "benchmark": False},
                                train={**TINY["train"], "steps": 2})
    record = json.loads((result.out_dir / "export" / "export_manifest.json").read_text())["calibration"]
    # Default size 300 > 32 training images: all of them, none of them a parity image.
    assert record["source"] == "training data" and record["size"] == TINY["data"]["n"]
    assert record["overlap_with_parity"] == 0 and record["parity_images"] == TINY["data"]["eval_n"]
    config = load_run_config({**TINY, "train": {**TINY["train"], "steps": 2}})
    train, evals = build_data(config, build_models(config).teacher)
    assert record["parity_image_sha256"] == image_hashes(evals)
    assert not set(record["image_sha256"]) & set(image_hashes(evals))
    assert result.summary["shipped"] == {"onnx": "onnx/int8"}
    assert result.summary["int8 calibration"].startswith("32 training images, 0 shared")
    assert any("not benchmarked" in warning for warning in result.summary["warnings"])
    assert result.summary["verdict"]["warnings"] == result.summary["warnings"]


def test_precision_auto_ships_the_fastest_passing_candidate_with_its_decision_table(finished, tmp_path, capsys):
    assert main(["export", str(finished.out_dir), "--formats", "onnx", "openvino", "--precision", "auto",
                 "--out", str(tmp_path / "auto")]) == EXIT_OK
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "auto" / "export_manifest.json").read_text())
    decision = manifest["precision_decision"]
    assert set(manifest["shipped"]) == {"onnx", "openvino"} and decision["benchmarked"] is True
    rows = {row["key"]: row for row in decision["table"]}
    for fmt, key in manifest["shipped"].items():
        shipped = rows[key]
        assert shipped["chosen"] and shipped["gate"] == "pass" and shipped["native"]
        # No passing native candidate of the same format was faster.
        faster = [r for r in rows.values() if r["format"] == fmt and r["native"] and r["gate"] == "pass"
                  and r["p50_ms"] < shipped["p50_ms"]]
        assert faster == []
    for row in rows.values():
        assert row["chosen"] or row["reason"].split(":")[0] in ("slower", "failed gate", "not native")
        if row["native"]:   # "native" follows what the runtime reports it computes, not the file's label
            assert row["realised"].split()[0] == row["precision"]
        else:
            assert row["reason"].startswith("not native")
    # Where the host computes BF16, the FP32 IR at the bf16 hint is a candidate, gated and timed like the others.
    assert ("openvino/bf16" in rows and rows["openvino/bf16"]["gate"] != "not built"
            and rows["openvino/bf16"]["p50_ms"] is not None) == manifest["host"]["bf16"]
    assert manifest["host"]["isa"] == manifest["target"]["isa"] and "SHIPPED" in printed
