import numpy as np
import pytest
from PIL import Image

from singer_deploy.models.data import ImageFolder, SyntheticShapes, bundled_photos
from singer_deploy.errors import DataError


def test_synthetic_is_deterministic_and_has_ground_truth():
    a, b = SyntheticShapes(4, seed=7), SyntheticShapes(4, seed=7)
    item = a[2]
    assert item["image"].shape == (3, 64, 64) and item["fg_mask"].shape == (64, 64)
    assert np.array_equal(item["image"].numpy(), b[2]["image"].numpy())
    assert 0 <= item["label"] < 4 and item["fg_mask"].any()
    assert not np.array_equal(a[0]["image"].numpy(), SyntheticShapes(4, seed=8)[0]["image"].numpy())


@pytest.mark.parametrize("share, per_image", [(0.02, 1), (0.08, 5)])
def test_flat_share_sets_the_number_of_exactly_flat_patches(share, per_image):
    pixels, _, fg_mask, flat_mask = SyntheticShapes(1, flat_share=share, seed=1).render(0)
    assert flat_mask.sum() == per_image * 64
    assert not (flat_mask & fg_mask).any()
    assert len(np.unique(pixels[flat_mask], axis=0)) <= per_image  # each flat patch is one colour


def test_bundled_photos_are_real_images():
    photos = bundled_photos(32, crops_per_photo=1)
    assert photos.shape[1:] == (32, 32, 3) and len(photos) >= 5
    assert photos.std() > 0.05


def test_image_folder_skips_corrupt_files_and_reports_them(tmp_path, caplog):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(sub / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    folder = ImageFolder(tmp_path)
    assert len(folder) == 1 and len(folder.skipped) == 1
    assert "Skipped 1 unreadable" in caplog.text
    assert folder[0]["image"].shape == (3, 20, 20)


def test_image_list_file(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    listing = tmp_path / "list.txt"
    listing.write_text("x.png\n")
    assert len(ImageFolder(listing)) == 1


def test_empty_or_all_bad_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="No readable images"):
        ImageFolder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="1 unreadable"):
        ImageFolder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
