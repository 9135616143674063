import numpy as np
import pytest
import torch

from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import SyntheticShapes, stack_images
from singer_deploy.errors import ConfigError, DataError, ModelError
from singer_deploy.evaluation.features import as_image_data, downsample_masks, extract_features, source_fingerprint
from singer_deploy.method.refine import RefinedTeacher


class CountingSource:
    """Runner-contract callable: CLS = per-image channel means, patches = 4x4 patch means; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        b, c, h, w = images.shape
        tokens = images.reshape(b, c, h // 4, 4, w // 4, 4).mean(axis=(3, 5)).reshape(b, c, -1).transpose(0, 2, 1)
        return {"cls": images.mean(axis=(2, 3)), "patch_tokens": tokens}


def small_dataset(n: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 16, 16), dtype=bool)
    masks[:, 4:12, 4:12] = True
    return rng.normal(size=(n, 3, 16, 16)).astype(np.float32), np.arange(n) % 2, masks


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)


def test_cached_features_are_reused(tmp_path):
    source, data = CountingSource(), small_dataset()
    first = extract_features(source, data, batch_size=4, cache_dir=tmp_path, source_id="counting")
    assert source.calls == 3  # ceil(10 / 4) batches
    second = extract_features(source, data, batch_size=4, cache_dir=tmp_path, source_id="counting")
    assert source.calls == 3, "the second call must read the cache, not run the source"
    for name in ("cls", "pooled", "patches", "labels", "patch_masks"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
    assert second.grid == (4, 4) and second.fingerprint == first.fingerprint != ""
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"], "no temporary file may be left behind"


def test_cache_key_changes_with_data_source_and_dtype(tmp_path):
    source, data = CountingSource(), small_dataset()
    extract_features(source, data, cache_dir=tmp_path, source_id="a")
    extract_features(source, small_dataset(seed=1), cache_dir=tmp_path, source_id="a")
    extract_features(source, data, cache_dir=tmp_path, source_id="b")
    extract_features(source, data, cache_dir=tmp_path, source_id="a", patch_dtype="float32")
    assert source.calls == 4
    assert len(list(tmp_path.glob("*.npz"))) == 4


def test_corrupt_cache_is_recomputed(tmp_path):
    source, data = CountingSource(), small_dataset()
    extract_features(source, data, cache_dir=tmp_path, source_id="a")
    (cache_file,) = tmp_path.glob("*.npz")
    cache_file.write_bytes(b"not an npz")
    again = extract_features(source, data, cache_dir=tmp_path, source_id="a")
    assert source.calls == 2 and again.cls.shape == (10, 3)


def test_feature_contents_and_dtypes():
    images, labels, masks = small_dataset()
    features = extract_features(CountingSource(), (images, labels, masks))
    assert features.cls.dtype == np.float32 and features.patches.dtype == np.float16
    assert features.patches.shape == (10, 16, 3)
    np.testing.assert_allclose(features.pooled, images.mean(axis=(2, 3)), atol=1e-5)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[1:3, 1:3] = 1
    assert np.array_equal(features.patch_masks[0], expected)
    dropped = extract_features(CountingSource(), (images, labels))
    assert dropped.patch_masks is None
    no_patches = extract_features(CountingSource(), (images, labels, masks), patch_dtype=None)
    assert no_patches.patches is None and no_patches.grid == (4, 4)


def test_backbone_source_reads_the_last_block_raw(tiny_backbone, tmp_path):
    dataset = SyntheticShapes(6, img_size=32, patch_size=8, seed=0)
    tiny_backbone.train()
    features = extract_features(tiny_backbone, dataset, cache_dir=tmp_path, patch_dtype="float32")
    assert tiny_backbone.training, "the caller's train/eval mode must be restored"
    images = stack_images(dataset)
    tiny_backbone.eval()
    with torch.no_grad():
        prefix, patches = tiny_backbone.split(tiny_backbone.forward_taps(images, [1])[1])
    np.testing.assert_allclose(features.cls, prefix[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(features.patches, patches.numpy(), atol=1e-5)
    assert features.grid == (4, 4) and features.patch_masks.shape == (6, 4, 4)
    # Same weights and data hit the cache without a source_id; another layer does not.
    again = extract_features(tiny_backbone, dataset, cache_dir=tmp_path, layer=1, patch_dtype="float32")
    assert again.fingerprint == features.fingerprint
    first_block = extract_features(tiny_backbone, dataset, cache_dir=tmp_path, layer=0, patch_dtype="float32")
    assert first_block.fingerprint != features.fingerprint
    assert not np.allclose(first_block.cls, features.cls)


def test_module_fingerprint_follows_weights(tiny_backbone):
    before = source_fingerprint(tiny_backbone)
    assert source_fingerprint(tiny_backbone) == before
    with torch.no_grad():
        tiny_backbone.model.blocks[0].mlp.fc1.weight[0, 0] += 1.0
    try:
        assert source_fingerprint(tiny_backbone) != before
    finally:
        with torch.no_grad():
            tiny_backbone.model.blocks[0].mlp.fc1.weight[0, 0] -= 1.0


def test_runner_object_with_run_method():
    class Runner:
        def __init__(self):
            self.inner = CountingSource()

        def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            return self.inner(batch)

    runner = Runner()
    features = extract_features(runner, small_dataset(), batch_size=5)
    assert runner.inner.calls == 2 and features.cls.shape == (10, 3)


def test_masks_downsample_by_majority_even_off_grid():
    masks = np.zeros((1, 28, 28), dtype=bool)
    masks[0, :, :14] = True
    assert downsample_masks(masks, (2, 2)).tolist() == [[[1, 0], [1, 0]]]
    # 28 / 3 does not divide: area pooling still assigns the left column to the foreground.
    assert downsample_masks(masks, (3, 3))[0, :, 0].tolist() == [1, 1, 1]
    semantic = np.full((1, 8, 8), 2)
    semantic[0, :1] = 0  # a quarter of each top patch: the majority class 2 wins
    assert downsample_masks(semantic, (2, 2)).tolist() == [[[2, 2], [2, 2]]]


def test_dataset_of_dicts_matches_arrays():
    dataset = SyntheticShapes(4, img_size=32, patch_size=8, seed=0)
    data = as_image_data(dataset)
    assert data.images.shape == (4, 3, 32, 32) and data.masks.shape == (4, 32, 32)
    assert data.labels.tolist() == [dataset[i]["label"] for i in range(4)]
    assert data.fingerprint() == as_image_data((data.images, data.labels, data.masks)).fingerprint()


def test_clear_errors():
    images, labels, masks = small_dataset()
    with pytest.raises(DataError, match="Labels do not match"):
        extract_features(CountingSource(), (images, labels[:9]))
    with pytest.raises(DataError, match="Masks do not match"):
        extract_features(CountingSource(), (images, labels, masks[:, :8]))
    with pytest.raises(DataError, match="empty"):
        extract_features(CountingSource(), [])
    with pytest.raises(DataError, match="non-empty"):
        extract_features(CountingSource(), (images[:0], labels[:0]))
    with pytest.raises(DataError, match="incomplete outputs"):
        extract_features(lambda batch: {"cls": batch.mean(axis=(2, 3))}, (images, labels))
    with pytest.raises(DataError, match="dicts"):
        extract_features(CountingSource(), [images[0]])
    with pytest.raises(ConfigError, match="fingerprint"):
        extract_features(CountingSource(), (images, labels), cache_dir="/tmp/unused")
    with pytest.raises(ConfigError, match="layer"):
        extract_features(CountingSource(), (images, labels), layer=3)
    with pytest.raises(ConfigError, match="patch_dtype"):
        extract_features(CountingSource(), (images, labels), patch_dtype="int8")


def test_backbone_layer_out_of_range(tiny_backbone):
    with pytest.raises(ModelError):
        extract_features(tiny_backbone, SyntheticShapes(2, img_size=32, patch_size=8), layer=5)


def test_holder_of_a_backbone_stands_for_it(tiny_backbone, tmp_path):
    class Holder:  # the shape of planted.PlantedTeacher: the teacher Backbone sits in .backbone
        backbone = tiny_backbone

    dataset = SyntheticShapes(2, img_size=32, patch_size=8)
    direct = extract_features(tiny_backbone, dataset, cache_dir=tmp_path)
    held = extract_features(Holder(), dataset, cache_dir=tmp_path)
    assert held.fingerprint == direct.fingerprint and np.array_equal(held.cls, direct.cls)


def test_refined_teacher_is_read_as_its_refined_features(tiny_backbone, tmp_path):
    # A RefinedTeacher also holds the teacher in .backbone; reading that would silently score the raw teacher.
    torch.manual_seed(1)
    adapter = torch.nn.Linear(48, 48, bias=False)
    refined = RefinedTeacher(tiny_backbone, {0: adapter})
    dataset = SyntheticShapes(4, img_size=32, patch_size=8)
    images = stack_images(dataset)
    features = extract_features(refined, dataset, cache_dir=tmp_path, patch_dtype="float32")  # default: block 0
    with torch.no_grad():
        prefix, patches = tiny_backbone.split(refined.forward_taps(images, [0])[0])
    np.testing.assert_allclose(features.patches, patches.numpy(), atol=1e-5)
    np.testing.assert_allclose(features.cls, prefix[:, 0].numpy(), atol=1e-5)
    raw = extract_features(tiny_backbone, dataset, cache_dir=tmp_path, layer=0, patch_dtype="float32")
    assert raw.fingerprint != features.fingerprint        # cached apart from the raw teacher
    assert not np.allclose(raw.patches, features.patches, atol=1e-3)
    with pytest.raises(ModelError, match="does not serve block 1"):
        extract_features(refined, dataset, layer=-1)
