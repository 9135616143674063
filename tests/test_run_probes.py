"""A run probes its held-out images when the data carries labels (issue 29, item 5): the synthetic shapes always,
an image folder with one subfolder per class when data.labels is set (dense with data.masks). The table reaches the
summary, manifest.json and the report's Comparison section; bad labelled input stops the run before training."""

import json

import numpy as np
import pytest
from PIL import Image
from test_api import QUICK_EXPORT, TINY

from singer_deploy.errors import ConfigError, DataError
from singer_deploy.evaluation.probes import evaluate_backbone
from singer_deploy.models.data import SyntheticShapes
from singer_deploy.evaluation.features import ImageData
from singer_deploy.pipeline.api import NO_LABELS, build_models, distill_and_export, prepare, probes
from singer_deploy.pipeline.cli import EXIT_INPUT, main
from singer_deploy.pipeline.preflight import check_probe_labels
from singer_deploy.pipeline.runconfig import load_run_config

SCORES = ("linear_acc", "linear_pooled_acc", "knn_acc")
FOLDER_RUN = {**TINY, "train": {**TINY["train"], "steps": 2}, "export": {"formats": []}}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return distill_and_export({**TINY, "export": QUICK_EXPORT}, out_dir=tmp_path_factory.mktemp("run") / "probed",
                              progress=False)


def write_class_folder(root, per_class: int = 10, masks_root=None, size: int = 64):
    """Shapes rendered to PNGs, one subfolder per shape class; masks (optional) hold 1 + class on the shape."""
    shapes = SyntheticShapes(4 * per_class, size, 8, flat_share=0.08, seed=5)
    for index in range(len(shapes)):
        pixels, label, fg_mask, _ = shapes.render(index)
        name = f"class{label}"
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(root / name / f"{index:03d}.png")
        if masks_root is not None:
            (masks_root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray((fg_mask * (label + 1)).astype(np.uint8)).save(masks_root / name / f"{index:03d}.png")
    return root


def folder_run(tmp_path, data: dict, name: str):
    return distill_and_export({**FOLDER_RUN, "data": {**data, "eval_n": 16}}, out_dir=tmp_path / name,
                              progress=False)


def test_a_synthetic_run_probes_teacher_student_and_the_onnx_artifact(synthetic_run):
    table = synthetic_run.summary["probes"]
    assert [row["model"] for row in table["rows"]] == ["teacher (raw)", "student (pytorch/fp32)", "onnx/fp32"]
    for row in table["rows"]:
        for key in (*SCORES, "miou"):
            assert 0.0 <= row[key] <= 1.0, (row["model"], key)
    assert table["dense"] == "class" and table["n_train"] + table["n_test"] == TINY["data"]["eval_n"]
    # The teacher's row is what the probes give on its last block of the same held-out images, recomputed here.
    config = load_run_config(TINY)
    held_out = SyntheticShapes(12, 64, 8, flat_share=0.08, seed=config.data.seed + 1)
    assert table["chance"] == 1 / len({item["label"] for item in held_out})
    scores = evaluate_backbone(build_models(config).teacher, held_out, layer=-1, seed=config.train.seed,
                               dense=("class",))
    teacher = table["rows"][0]
    assert (teacher["linear_acc"], teacher["knn_acc"], teacher["miou"]) == (
        scores["linear_cls_acc"], scores["knn_cls_acc"], scores["dense_class_miou"])
    assert teacher["features"] == "teacher block 7 (last)" and teacher["max_score_diff"] is None
    assert synthetic_run.timings["probes_s"] > 0


def test_the_probe_table_reaches_the_manifest_and_the_report(synthetic_run):
    manifest = json.loads((synthetic_run.out_dir / "manifest.json").read_text())
    assert manifest["summary"]["probes"] == synthetic_run.summary["probes"]
    page = (synthetic_run.out_dir / "report.html").read_text()
    comparison = page[page.index('<section id="comparison">'):page.index('<section id="config">')]
    assert "linear CLS acc" in comparison and "dense mIoU" in comparison and "onnx/fp32" in comparison
    assert "chance = 1 / " in comparison and "what the features know about these labels" in comparison
    onnx = synthetic_run.summary["probes"]["rows"][2]
    assert f"{onnx['linear_acc']:.3f}"[:4] in comparison
    card = (synthetic_run.out_dir / "student" / "README.md").read_text()
    assert "## Probes (held-out images)" in card and "| onnx/fp32 | student block 1 (last), exported |" in card


def test_a_labelled_folder_gets_linear_and_knn_but_no_dense(tmp_path):
    result = folder_run(tmp_path, {"source": str(write_class_folder(tmp_path / "shots")), "labels": True}, "run")
    table = result.summary["probes"]
    assert [row["model"] for row in table["rows"]] == ["teacher (raw)", "student (pytorch/fp32)"]
    assert table["dense"] is None and table["classes"] == 4 and table["chance"] == 0.25
    assert all(0.0 <= row[key] <= 1.0 for row in table["rows"] for key in SCORES)
    assert all("miou" not in row for row in table["rows"])
    assert "dense mIoU" not in (result.out_dir / "report.html").read_text()


def test_a_folder_with_masks_gets_the_dense_probe_on_its_mask_classes(tmp_path):
    images = write_class_folder(tmp_path / "shots", masks_root=tmp_path / "masks")
    result = folder_run(tmp_path, {"source": str(images), "labels": True, "masks": str(tmp_path / "masks")}, "run")
    table = result.summary["probes"]
    assert table["dense"] == "mask" and all(0.0 <= row["miou"] <= 1.0 for row in table["rows"])


def test_only_the_held_out_images_carry_labels_and_masks(tmp_path):
    images = write_class_folder(tmp_path / "shots", masks_root=tmp_path / "masks")
    data = {"source": str(images), "labels": True, "masks": str(tmp_path / "masks"), "eval_n": 16}
    _, train_data, eval_images, labelled = prepare(load_run_config(_run_config(tmp_path, data)))
    assert "label" not in train_data[0] and "fg_mask" not in train_data[0]   # training reads neither
    assert labelled.images is eval_images and labelled.masks.shape == (len(eval_images), 64, 64)
    assert set(np.unique(labelled.masks)) <= {0, 1, 2, 3, 4}


def test_a_folder_without_labels_says_why_there_is_no_table(tmp_path):
    result = folder_run(tmp_path, {"source": str(write_class_folder(tmp_path / "shots"))}, "run")
    assert result.summary["probes"] == NO_LABELS
    page = (result.out_dir / "report.html").read_text()
    assert "the data carries no labels: set data.labels: true for a folder with one subfolder per class" in page
    assert "Not run (the data carries no labels" in (result.out_dir / "student" / "README.md").read_text()


def _run_config(tmp_path, data: dict) -> dict:
    return {**FOLDER_RUN, "data": data, "out_dir": str(tmp_path / "never")}


def test_labels_on_a_folder_without_class_subfolders_stop_before_training(tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    for index in range(12):
        Image.fromarray(np.full((64, 64, 3), index * 20, np.uint8)).save(loose / f"{index}.png")
    with pytest.raises(DataError, match="subfolder per class") as error:
        prepare(load_run_config(_run_config(tmp_path, {"source": str(loose), "labels": True})))
    assert error.value.expected and error.value.found and error.value.fix
    config = tmp_path / "loose.yaml"
    config.write_text(json.dumps(_run_config(tmp_path, {"source": str(loose), "labels": True})))
    assert main(["run", str(config)]) == EXIT_INPUT
    assert "subfolder per class" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_a_folder_with_one_class_is_refused(tmp_path):
    write_class_folder(tmp_path / "shots", per_class=3)
    for extra in ("class1", "class2", "class3"):
        for image in (tmp_path / "shots" / extra).iterdir():
            image.rename(tmp_path / "shots" / "class0" / f"{extra}-{image.name}")
        (tmp_path / "shots" / extra).rmdir()
    with pytest.raises(DataError, match="two or more classes"):
        prepare(load_run_config(_run_config(tmp_path, {"source": str(tmp_path / "shots"), "labels": True})))


def test_masks_that_do_not_match_are_refused_before_training(tmp_path):
    images = write_class_folder(tmp_path / "shots", masks_root=tmp_path / "masks")
    data = {"source": str(images), "labels": True, "masks": str(tmp_path / "masks"), "eval_n": 16}
    for mask in (tmp_path / "masks").rglob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)     # half the image's size
    with pytest.raises(DataError, match="does not fit its image"):
        prepare(load_run_config(_run_config(tmp_path, data)))
    for mask in (tmp_path / "masks").rglob("*.png"):
        mask.unlink()
    with pytest.raises(DataError, match="has no mask"):
        prepare(load_run_config(_run_config(tmp_path, data)))


@pytest.mark.parametrize("data, message", [
    ({"source": "synthetic", "masks": "."}, "synthetic shapes bring their own masks"),
    ({"masks": "."}, "masks go with class labels"),
    ({"labels": True, "masks": "no-such-folder"}, "mask folder does not exist"),
])
def test_mask_settings_are_checked_with_the_config(tmp_path, data, message):
    source = {"source": str(tmp_path)} if "source" not in data else {}
    with pytest.raises(ConfigError, match=message) as error:
        load_run_config(_run_config(tmp_path, {**source, **data}))
    assert error.value.expected and error.value.found and error.value.fix


def test_held_out_labels_the_probes_cannot_split_are_refused():
    check_probe_labels(np.array([0, 0, 1]))
    for labels in (np.array([2, 2, 2, 2]), np.array([0, 1, 2])):
        with pytest.raises(DataError, match="cannot be probed") as error:
            check_probe_labels(labels)
        assert "data.eval_n" in error.value.fix


def test_synthetic_shapes_too_few_to_probe_run_and_say_so(tmp_path):
    config = load_run_config(_run_config(tmp_path, {"n": 8, "eval_n": 2}))
    labelled = prepare(config)[3]                       # not refused: the user did not ask for the probes
    reason = probes(None, None, None, ImageData(labelled.images, np.array([0, 1]), None), config)
    assert reason.startswith("too few held-out images for the probes (2 held-out images") and "data.eval_n" in reason
