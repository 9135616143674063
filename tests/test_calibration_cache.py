"""Calibration cache: written atomically, reused when the manifest matches, rebuilt when it does not;
corrupt or empty sources fail with a DataError that says what is wrong."""

import numpy as np
import pytest
import torch

import singer_deploy.calibration.cache as cache_mod
from singer_deploy.calibration.cache import ARRAY_NAME, MANIFEST_NAME, cached_calibration_set, read_manifest
from singer_deploy.calibration.source import load_calibration_images
from singer_deploy.errors import DataError


def _images(n: int = 24) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 3, 8, 8)).astype(np.float32)


def test_cache_writes_manifest_and_is_reused(tmp_path, monkeypatch):
    images = _images()
    first = cached_calibration_set(images, tmp_path, size=10, method="random", seed=5)
    manifest = read_manifest(tmp_path)
    assert manifest["seed"] == 5 and manifest["method"] == "random" and manifest["size"] == 10
    assert manifest["shape"] == [10, 3, 8, 8] and manifest["source_shape"] == [24, 3, 8, 8]
    assert len(manifest["source_hash"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def no_selection(*args, **kwargs):
        raise AssertionError("the cached set should have been reused")

    monkeypatch.setattr(cache_mod, "select_calibration_set", no_selection)
    second = cached_calibration_set(images, tmp_path, size=10, method="random", seed=5)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.indices, second.indices)


def test_cache_is_rebuilt_when_request_or_source_changes(tmp_path):
    images = _images()
    first = cached_calibration_set(images, tmp_path, size=10, seed=5)
    other_seed = cached_calibration_set(images, tmp_path, size=10, seed=6)
    assert read_manifest(tmp_path)["seed"] == 6 and not np.array_equal(first.indices, other_seed.indices)
    hash_before = read_manifest(tmp_path)["source_hash"]
    changed = images.copy()
    changed[0, 0, 0, 0] += 1.0
    cached_calibration_set(changed, tmp_path, size=10, seed=6)
    assert read_manifest(tmp_path)["source_hash"] != hash_before


def test_damaged_cache_array_is_rebuilt_not_trusted(tmp_path):
    images = _images()
    first = cached_calibration_set(images, tmp_path, size=10, seed=1)
    (tmp_path / ARRAY_NAME).write_bytes(b"not a zip file")
    again = cached_calibration_set(images, tmp_path, size=10, seed=1)
    assert np.array_equal(first.images, again.images)
    with np.load(tmp_path / ARRAY_NAME) as stored:
        assert stored["images"].shape == (10, 3, 8, 8)


def test_kcenter_cache_key_follows_the_embedder_weights(tmp_path):
    images = _images()
    embedder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    cached_calibration_set(images, tmp_path, size=6, method="kcenter", embed_fn=embedder)
    before = read_manifest(tmp_path)["embedder"]
    with torch.no_grad():
        embedder[1].weight.add_(1.0)
    cached_calibration_set(images, tmp_path, size=6, method="kcenter", embed_fn=embedder)
    assert before.startswith("module:") and read_manifest(tmp_path)["embedder"] != before


@pytest.mark.parametrize("source, message", [
    (np.zeros((0, 3, 8, 8), np.float32), "empty"),
    ([], "empty"),
    (np.full((4, 3, 8, 8), np.nan, np.float32), "NaN or Inf"),
    (np.zeros((4, 3, 8, 8), np.float32), "constant"),
    (np.zeros((3, 8, 8), np.float32), "rank"),
    (np.zeros((2, 3, 8, 8), np.uint8), "normalised floats"),
    ([torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)], "differ in shape"),
])
def test_bad_sources_raise_data_errors(source, message):
    with pytest.raises(DataError, match=message):
        load_calibration_images(source)


def test_corrupt_or_empty_files_raise_data_errors(tmp_path):
    broken = tmp_path / "calib.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="corrupt or unreadable"):
        load_calibration_images(broken)
    with pytest.raises(DataError, match="does not exist"):
        load_calibration_images(tmp_path / "missing.npy")
    empty_dir = tmp_path / "images"
    empty_dir.mkdir()
    (empty_dir / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="No readable images"):
        load_calibration_images(empty_dir)
    with pytest.raises(DataError):
        cached_calibration_set(np.zeros((0, 3, 8, 8), np.float32), tmp_path / "cache")
    assert not (tmp_path / "cache" / MANIFEST_NAME).exists()


def test_dataset_items_with_image_dicts_are_stacked():
    items = [{"image": torch.full((3, 4, 4), float(i)), "label": i} for i in range(3)]
    stacked = load_calibration_images(items)
    assert stacked.shape == (3, 3, 4, 4) and stacked.dtype == np.float32 and stacked[2].max() == 2.0
