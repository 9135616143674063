"""SiNGER vs FitNet comparison, end to end on a tiny planted teacher (32 px, 4 blocks) and a few steps."""

import json

import pytest
import torch

from singer_deploy.backbone import load_backbone
from singer_deploy.compare import JSON, MAIN_COLUMNS, MARKDOWN, compare_methods
from singer_deploy.config import SingerConfig
from singer_deploy.data import SyntheticShapes
from singer_deploy.distill import TrainConfig
from singer_deploy.errors import ConfigError
from singer_deploy.planted import PlantedConfig, build_planted_teacher

SINGER = SingerConfig(rank=4, outlier_target="median")
TRAIN = TrainConfig(steps=4, batch_size=4, warmup_steps=1, device="cpu")


def make_student():
    return load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def planted():
    return build_planted_teacher(PlantedConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, artifact_layer=2,
                                               null_dim=4))


@pytest.fixture(scope="module")
def comparison(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return compare_methods(planted.backbone, make_student, SyntheticShapes(16, 32, 8, flat_share=0.08, seed=1),
                           SyntheticShapes(32, 32, 8, flat_share=0.08, seed=2), out, layers=[2], singer=SINGER,
                           train=TRAIN, clean_teacher=planted.clean)


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
        assert (run.out_dir / "student.safetensors").is_file()


def test_columns_measure_what_they_say(comparison):
    fitnet, singer = comparison.row("fitnet"), comparison.row("singer")
    raw, clean = comparison.row("teacher (raw)"), comparison.row("teacher (clean twin)")
    assert raw["hnr_4"] > 0.03 and raw["e_out"] > 0.5       # the planted artifacts at the deepest layer
    assert clean["hnr_4"] == 0.0 and clean["hnr_4@2"] == 0.0
    assert clean["normal_cos_raw@2"] > 0.999               # the twin differs from the teacher only on artifacts
    for key in ("proj_hnr_4@2", "proj_e_out@3", "normal_cos_raw@2", "normal_cos_clean@3"):
        assert key in fitnet and key in singer
    # SiNGER's refined target is reported, FitNet (raw target) has none. 4 steps barely move the nullspace-initialised
    # adapters, so the target still keeps the teacher's normal tokens.
    assert "target_hnr_4@2" not in fitnet
    assert singer["target_cos@2"] > 0.95 and singer["target_next_cos@2"] > 0.95
    assert "target_next_cos@3" not in singer               # the last block has no next block
    assert singer["target_hnr_4@2"] == pytest.approx(raw["hnr_4@2"], abs=0.02)


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
