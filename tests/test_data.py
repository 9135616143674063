import numpy as np
import pytest
from PIL import Image

import torch

from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import (ImageFolder, InMemory, SkippedImages, SyntheticShapes, bundled_photos,
                                       default_crop_pct, image_transform)
from singer_deploy.errors import DataError


def test_synthetic_is_deterministic_and_has_ground_truth():
    a, b = SyntheticShapes(4, seed=7), SyntheticShapes(4, seed=7)
    item = a[2]
    assert item["image"].shape == (3, 64, 64) and item["fg_mask"].shape == (64, 64)
    assert np.array_equal(item["image"].numpy(), b[2]["image"].numpy())
    assert 0 <= item["label"] < 4 and item["fg_mask"].any()
    assert not np.array_equal(a[0]["image"].numpy(), SyntheticShapes(4, seed=8)[0]["image"].numpy())


def test_in_memory_keeps_each_item_as_read_once(monkeypatch):
    source = SyntheticShapes(3, seed=7)
    kept = InMemory(source)
    expected = [source[i] for i in range(3)]
    monkeypatch.setattr(SyntheticShapes, "render", lambda *_: pytest.fail("an InMemory item was rendered again"))
    assert len(kept) == 3
    assert all(torch.equal(kept[i]["image"], expected[i]["image"]) and kept[i]["label"] == expected[i]["label"]
               for i in range(3))


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


def test_image_folder_lists_lazily_and_skips_bad_files_where_they_are_met(tmp_path, caplog):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(sub / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    folder = ImageFolder(tmp_path)
    assert len(folder) == 2 and folder.skipped == {}        # listed by name: nothing opened yet
    bad = [str(p) for p in folder.files].index(str(tmp_path / "broken.jpg"))
    item = folder[bad]                                      # served by the next readable file, and says so
    assert item["path"] == str(sub / "ok.png") and item["image"].shape == (3, 20, 20)
    assert item["skipped"].split("\t")[0] == str(tmp_path / "broken.jpg")
    assert "UnidentifiedImageError" in folder.skipped[str(tmp_path / "broken.jpg")]
    assert "Skipping unreadable image" in caplog.text
    assert folder[1 - bad]["skipped"] == ""


def test_skipped_images_are_counted_across_batches_and_stop_the_run_when_too_many(tmp_path):
    counter = SkippedImages(listed=1000)
    counter.add({"skipped": ["a.jpg\tOSError: truncated", "", "b.jpg\tx\nc.jpg\ty"]})
    counter.add({"skipped": ["a.jpg\tOSError: truncated"]})              # met again: counted once
    assert counter.to_dict() == {"count": 3, "files": {"a.jpg": "OSError: truncated", "b.jpg": "x", "c.jpg": "y"}}
    counter.check()                                                      # 3 < max(16, 5% of 1000)
    counter.add({"skipped": [f"{i}.jpg\tbad" for i in range(60)]})
    with pytest.raises(DataError, match="63 of 1000 images read so far are unreadable") as caught:
        counter.check()
    assert "resumes" in caught.value.fix


def test_image_list_file(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    listing = tmp_path / "list.txt"
    listing.write_text("x.png\n")
    assert len(ImageFolder(listing)) == 1


def test_empty_or_all_bad_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="No image files"):
        ImageFolder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="No readable images.*all 1 files are unreadable"):
        ImageFolder(tmp_path)[0]
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def write_shapes_folder(folder, n: int, size: int = 64, patch: int = 8):
    """SyntheticShapes rendered to PNG files at `size` px; returns the flat-patch masks."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes, masks = SyntheticShapes(n, size, patch, flat_share=0.08, seed=3), []
    for i in range(n):
        pixels, _, _, flat_mask = shapes.render(i)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
        masks.append(flat_mask)
    return masks


def flat_patches_kept(images: torch.Tensor, masks, patch: int = 8) -> tuple[int, int]:
    """(patches still exactly flat, flat patches in the source) over a batch of transformed images."""
    kept = total = 0
    for image, mask in zip(images, masks):
        grid = mask.reshape(mask.shape[0] // patch, patch, -1, patch).all(axis=(1, 3))
        for r, c in zip(*np.nonzero(grid)):
            block = image[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            kept += int((block.amax(dim=(1, 2)) - block.amin(dim=(1, 2))).abs().max() < 1e-6)
            total += 1
    return kept, total


def test_transforms_take_the_models_own_size_and_crop_pct(tmp_path):
    masks = write_shapes_folder(tmp_path / "imgs", 4)
    student = load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    config = student.data_config()
    assert config["input_size"] == (3, 64, 64) and config["crop_pct"] == 0.9   # timm's pretrained crop
    folder = ImageFolder(tmp_path / "imgs")
    assert default_crop_pct(folder, student.img_size, config["crop_pct"]) == 1.0   # images already 64 px
    assert default_crop_pct(folder, (32, 32), config["crop_pct"]) == 0.9
    for crop_pct, all_kept in ((1.0, True), (0.9, False)):
        folder.transform = image_transform(student.data_config(crop_pct), training=False)
        images = torch.stack([folder[i]["image"] for i in range(4)])
        assert images.shape == (4, 3, 64, 64)
        kept, total = flat_patches_kept(images, masks)
        assert total > 0 and (kept == total) is all_kept, (crop_pct, kept, total)
    # The training transform augments (random crop + flip) at the model's size; eval does not.
    folder.transform = image_transform(student.data_config(1.0), training=True)
    torch.manual_seed(0)
    augmented = torch.stack([folder[0]["image"] for _ in range(3)])
    assert augmented.shape == (3, 3, 64, 64) and not torch.equal(augmented[0], augmented[1])


def _labelled_folder(root, masks_root=None, size=16):
    """Two classes, three images each; class "dark" images are dark, "light" ones light; masks mark a square."""
    for index, (name, level) in enumerate((("dark", 30), ("light", 220))):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((size, size, 3), level + k, np.uint8)).save(root / name / f"img{k}.png")
            if masks_root is not None:
                (masks_root / name).mkdir(parents=True, exist_ok=True)
                mask = np.zeros((size, size), np.uint8)
                mask[:size // 2, :size // 2] = index + 1
                Image.fromarray(mask).save(masks_root / name / f"img{k}.png")


def test_image_folder_labels_come_from_class_subfolders(tmp_path):
    from singer_deploy.evaluation.features import as_image_data
    from singer_deploy.evaluation.probes import linear_probe
    _labelled_folder(tmp_path)
    folder = ImageFolder(tmp_path, labels=True)
    assert folder.classes == ("dark", "light")
    assert [folder[i]["label"] for i in range(len(folder))] == [0, 0, 0, 1, 1, 1]
    assert "label" not in ImageFolder(tmp_path)[0]   # unlabelled unless asked
    data = as_image_data(folder)                     # what the probes read
    pixels = data.images.reshape(len(data.labels), -1)
    assert linear_probe(pixels[[0, 1, 3, 4]], data.labels[[0, 1, 3, 4]], pixels[[2, 5]],
                        data.labels[[2, 5]])["accuracy"] == 1.0


def test_image_folder_masks_give_dense_classes(tmp_path):
    from singer_deploy.evaluation.features import as_image_data
    _labelled_folder(tmp_path / "images", tmp_path / "masks")
    folder = ImageFolder(tmp_path / "images", masks=tmp_path / "masks")
    item = folder[4]
    assert item["label"] == 1 and item["fg_mask"].shape == (16, 16)
    assert item["fg_mask"][0, 0] == 2 and item["fg_mask"][-1, -1] == 0
    assert as_image_data(folder).masks.shape == (6, 16, 16)
    (tmp_path / "masks" / "light" / "img2.png").unlink()
    with pytest.raises(DataError, match="no mask"):
        folder[5]
    with pytest.raises(DataError, match="does not fit"):
        ImageFolder(tmp_path / "images", transform=image_transform(
            {"input_size": (3, 8, 8), "crop_pct": 1.0, "interpolation": "bilinear"}, training=False),
            masks=tmp_path / "masks")[0]


def test_a_labelled_folder_needs_class_subfolders(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="subfolder per class"):
        ImageFolder(tmp_path, labels=True)
    (tmp_path / "loose.png").unlink()
    (tmp_path / "only").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match="two or more classes"):
        ImageFolder(tmp_path, labels=True)
