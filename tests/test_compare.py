"""SiNGER vs FitNet comparison, end to end on a tiny planted teacher (32 px, 4 blocks) and a few steps."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from singer_deploy.models.backbone import load_backbone
from singer_deploy.evaluation.study import JSON, MAIN_COLUMNS, MARKDOWN, compare_methods, runner_probe_agreement
from singer_deploy.config import SingerConfig, TrainConfig
from singer_deploy.models.data import SyntheticShapes
from singer_deploy.errors import ConfigError

SINGER = SingerConfig(rank=4, preset="published")
TRAIN = TrainConfig(steps=4, batch_size=4, warmup_steps=1, device="cpu")


def make_student():
    return load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def planted(small_planted):
    return small_planted


def eval_data():
    return SyntheticShapes(32, 32, 8, flat_share=0.08, seed=2)


@pytest.fixture(scope="module")
def comparison(planted, tmp_path_factory):
    pytest.importorskip("openvino", reason="the comparison fixture also checks the OpenVINO runner")
    out = tmp_path_factory.mktemp("compare")
    return compare_methods(planted.backbone, make_student, SyntheticShapes(16, 32, 8, flat_share=0.08, seed=1),
                           eval_data(), out, layers=[2], singer=SINGER, train=TRAIN, clean_teacher=planted.clean,
                           export_formats=("onnx", "openvino"))


def test_writes_markdown_and_json_with_method_and_reference_rows(comparison):
    methods = ["fitnet", "singer", "teacher (raw)", "teacher (clean twin)"]
    assert [row["method"] for row in comparison.rows] == methods
    stored = json.loads(comparison.files["json"].read_text())
    assert comparison.files["json"].name == JSON and comparison.files["markdown"].name == MARKDOWN
    assert [row["method"] for row in stored["rows"]] == methods
    assert stored["rows"] == json.loads(json.dumps(comparison.rows))
    assert stored["settings"]["teacher_layers"] == [2, 3] and stored["settings"]["student_layers"] == [0, 1]
    for row in comparison.rows:
        assert set(MAIN_COLUMNS) <= row.keys()
        assert list(row)[:len(MAIN_COLUMNS)] == list(MAIN_COLUMNS)
        assert all(row[key] is not None for key in MAIN_COLUMNS)
    markdown = comparison.files["markdown"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| method"))
    assert header.startswith("| method | hnr_4 | e_out | knn_acc | linear_acc | miou |")
    for method in methods:
        assert f"| {method} |" in markdown
    for run in comparison.runs.values():
        assert (run.out_dir / "student" / "model.safetensors").is_file()


def test_columns_measure_what_they_say(comparison):
    fitnet, singer = comparison.row("fitnet"), comparison.row("singer")
    raw, clean = comparison.row("teacher (raw)"), comparison.row("teacher (clean twin)")
    assert raw["hnr_4"] > 0.03 and raw["e_out"] > 0.5       # the planted artifacts at the deepest layer
    assert clean["hnr_4"] == 0.0 and clean["hnr_4@2"] == 0.0
    assert clean["normal_cos@2"] > 0.999                   # the twin differs from the teacher only on artifacts
    assert clean["artifact_ratio@2"] < 1.5 < raw["artifact_ratio@2"]   # ground-truth tokens, measured as ratios
    for key in ("proj_hnr_4@2", "proj_e_out@3", "proj_normal_cos@2", "proj_artifact_cos_clean@3",
                "student_artifact_ratio@2", "proj_next_cos@3"):
        assert key in fitnet and key in singer
    # SiNGER's refined target is reported, FitNet (raw target) has none. 4 steps barely move the nullspace-initialised
    # adapters, so the target still keeps the teacher's normal tokens, and its artifacts: the published init doubles
    # the null component, which holds the planted artifact, so the residual ratio reads ~2x the raw one (not 0).
    assert "target_hnr_4@2" not in fitnet
    assert singer["target_normal_cos@2"] > 0.95 and singer["target_next_cos@2"] > 0.95
    assert singer["target_next_cos@3"] > 0.95              # the last block: its own block reads it (surrogate)
    assert singer["target_hnr_4@2"] == pytest.approx(raw["hnr_4@2"], abs=0.02)
    assert singer["target_artifact_ratio@2"] == pytest.approx(2 * raw["artifact_ratio@2"], rel=0.2)


def test_says_when_probes_are_at_chance(comparison):
    notes = " ".join(comparison.notes)
    assert "at chance" in notes and "cannot rank the methods" in notes
    assert "at chance" in comparison.files["markdown"].read_text()


def test_students_start_from_the_same_weights(planted, tmp_path):
    calls = iter([0, 1])

    def drifting_factory():
        torch.manual_seed(next(calls))  # ignores the comparison's seed: the two methods would start apart
        return make_student()

    with pytest.raises(ConfigError, match="different initial weights"):
        compare_methods(planted.backbone, drifting_factory, SyntheticShapes(8, 32, 8, flat_share=0.08, seed=1),
                        SyntheticShapes(8, 32, 8, flat_share=0.08, seed=2), tmp_path, layers=[2], singer=SINGER,
                        train=TrainConfig(steps=1, batch_size=4, warmup_steps=1, device="cpu"))


def test_exported_student_probe_scores_match_pytorch(comparison):
    rows = {row["runner"]: row for row in comparison.runner_rows}
    assert list(rows) == ["pytorch/fp32", "onnx/fp32", "openvino/fp32", "openvino/fp16"]
    # The reference is the exported graph run eagerly: it reads the same features the table's SiNGER row probed
    # (its dense scores differ only by the table's float16 patch storage, so the image probes are compared).
    torch_row = rows["pytorch/fp32"]
    assert torch_row["knn_acc"] == comparison.row("singer")["knn_acc"]
    assert torch_row["linear_acc"] == comparison.row("singer")["linear_acc"]
    for key in ("onnx/fp32", "openvino/fp32"):
        row = rows[key]
        # FP32 runtimes differ from eager PyTorch by float rounding only (~1e-6), far inside every probe's
        # decision margins here, so the predictions and hence the scores are identical: any flipped prediction
        # would move an accuracy by 1/n_test (1/7 here), so 1e-6 only allows float noise in the arithmetic.
        assert row["parity_passed"] is True and row["scores_match"] is True
        assert row["feature_max_abs_diff"] < 1e-3
        for name in ("knn_acc", "linear_acc", "miou", "knn_pooled_acc", "linear_pooled_acc", "dense_fg_miou"):
            assert row[name] == pytest.approx(torch_row[name], abs=1e-6) and row[f"diff_{name}"] <= 1e-6
    assert rows["openvino/fp16"]["feature_max_abs_diff"] > 0  # FP16 weights really are another model
    stored = json.loads(comparison.files["json"].read_text())
    assert stored["runner_agreement"] == json.loads(json.dumps(comparison.runner_rows))
    markdown = comparison.files["markdown"].read_text()
    assert "## Exported SiNGER student" in markdown and "| openvino/fp32 |" in markdown
    assert any("equal pytorch/fp32's for onnx/fp32, openvino/fp32" in note for note in comparison.notes)


def test_a_perturbed_artifact_is_caught(comparison, tmp_path):
    model = onnx.load(comparison.files["json"].parent / "singer_export" / "student.onnx")
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight matrix
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).normal(scale=values.std(), size=values.shape).astype(values.dtype)
    weight.CopyFrom(numpy_helper.from_array(values + noise, weight.name))
    onnx.save(model, tmp_path / "perturbed.onnx")
    student = comparison.runs["singer"].student
    rows = runner_probe_agreement(student, eval_data(), artifacts={"onnx/perturbed": tmp_path / "perturbed.onnx"},
                                  cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("features-*.npz"))) == 2  # each runner cached under its own id
    assert [row["runner"] for row in rows] == ["pytorch/fp32", "onnx/perturbed"]
    assert rows[1]["feature_max_abs_diff"] > 0.1 and rows[1]["parity_passed"] is None
    assert not rows[1]["scores_match"] and rows[1]["max_score_diff"] >= 1 / rows[1]["n_test"]
