import numpy as np
import pytest

from singer_deploy.models.data import SyntheticShapes
from singer_deploy.errors import ConfigError, DataError
from singer_deploy.evaluation.features import FeatureSet
from singer_deploy.evaluation.probes import (dense_probe, dense_targets, evaluate_backbone, evaluate_features, knn_accuracy,
                                  linear_probe, mean_iou, split_indices)

M, N, D, C = 400, 16, 32, 4


def toy_features(seed: int = 0, shuffle_labels: bool = False, shuffle_masks: bool = False) -> FeatureSet:
    """Image features around one centre per class, patch features around one centre per mask class (fg/bg)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(M) % C  # balanced: chance is exactly 1/C
    centres = rng.normal(size=(C, D)) * 3
    cls = centres[labels] + rng.normal(size=(M, D))
    masks = rng.integers(2, size=(M, N))
    patch_centres = rng.normal(size=(2, D)) * 3
    patches = patch_centres[masks] + rng.normal(size=(M, N, D))
    if shuffle_labels:
        labels = rng.permutation(labels)
    if shuffle_masks:
        masks = rng.permutation(masks.ravel()).reshape(M, N)
    return FeatureSet(cls=cls.astype(np.float32), pooled=patches.mean(1).astype(np.float32) + cls.astype(np.float32),
                      patches=patches.astype(np.float16), labels=labels, patch_masks=masks.reshape(M, 4, 4),
                      grid=(4, 4))


def test_separable_features_are_probed_perfectly():
    scores = evaluate_features(toy_features(), dense=("fg",))
    assert scores["n_test"] == 100 and scores["n_train"] == 300
    assert scores["knn_cls_acc"] == 1.0
    assert scores["knn_pooled_acc"] == 1.0
    assert scores["linear_cls_acc"] >= 0.99
    assert scores["linear_pooled_acc"] >= 0.99
    assert scores["dense_fg_miou"] >= 0.99 and scores["dense_fg_pixel_acc"] >= 0.99


def test_shuffled_labels_stay_at_chance():
    # 100 balanced test images, 4 classes: chance 0.25 with binomial sd sqrt(.25 * .75 / 100) = 0.043; 0.13 is 3 sd,
    # still far below the ~1.0 the same features reach with true labels. Dense: 1,600 test patches whose shuffled
    # fg/bg labels are independent of the features: pixel accuracy 0.5 +- 0.0125 (sd), 0.05 is 4 sd; a learned
    # probe would reach 1.0, and random or constant guesses cannot exceed 0.5 mIoU on two balanced classes.
    scores = evaluate_features(toy_features(shuffle_labels=True, shuffle_masks=True), dense=("fg",))
    for key in ("knn_cls_acc", "knn_pooled_acc", "linear_cls_acc", "linear_pooled_acc"):
        assert abs(scores[key] - 1 / C) < 0.13, (key, scores[key])
    assert abs(scores["dense_fg_pixel_acc"] - 0.5) < 0.05
    assert scores["dense_fg_miou"] < 0.5


def test_probes_are_deterministic_for_a_seed():
    features = toy_features(shuffle_labels=True)
    assert evaluate_features(features, seed=3) == evaluate_features(features, seed=3)
    first, second = split_indices(features.labels, seed=0), split_indices(features.labels, seed=1)
    assert not np.array_equal(first[1], second[1])


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(3), [8, 20, 2])
    train, test = split_indices(labels, test_fraction=0.25, seed=0)
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(labels)
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 5, 1]


def test_given_split_is_used():
    features = toy_features()
    split = (np.arange(0, 200), np.arange(200, 400))
    scores = evaluate_features(features, split=split, dense=())
    assert scores["n_train"] == 200 and scores["n_test"] == 200
    assert not any(key.startswith("dense") for key in scores)


def test_majority_vote_knn_and_per_class_dense_targets():
    features = toy_features()
    train, test = split_indices(features.labels)
    x, y = features.cls, features.labels
    assert knn_accuracy(x[train], y[train], x[test], y[test], k=10, temperature=None) == 1.0
    targets = dense_targets(features, "class")
    assert set(np.unique(targets)) == set(range(C + 1))
    assert np.array_equal(targets > 0, features.patch_masks.reshape(M, N) > 0)


def test_mean_iou_by_hand():
    truth = np.array([0, 0, 1, 1, 2])
    prediction = np.array([0, 1, 1, 1, 0])
    # class 0: I=1, U=3; class 1: I=2, U=3; class 2: I=0, U=1; class 3 absent from both: skipped.
    assert mean_iou(prediction, truth, 4) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_linear_probe_picks_lambda_on_validation():
    rng = np.random.default_rng(1)
    # Few samples, many noisy dimensions: weak regularisation overfits, so validation must pick a larger lambda.
    y = np.arange(60) % 2
    x = np.concatenate([(y[:, None] * 2 - 1) * 0.5 + rng.normal(size=(60, 1)), rng.normal(size=(60, 200))], 1)
    result = linear_probe(x[:40], y[:40], x[40:], y[40:])
    assert result["lambda"] > 1e-6
    assert 0 <= result["accuracy"] <= 1


def test_errors_for_bad_inputs():
    x, y = np.ones((10, 4)), np.arange(10) % 2
    with pytest.raises(DataError, match="differ in length"):
        knn_accuracy(x, y[:9], x, y)
    with pytest.raises(DataError, match="differ in length"):
        linear_probe(x, y, x, y[:9])
    with pytest.raises(DataError, match="single class"):
        linear_probe(x, np.zeros(10, dtype=int), x, y)
    with pytest.raises(DataError, match="single class"):
        split_indices(np.zeros(10, dtype=int))
    with pytest.raises(DataError, match="no samples"):
        knn_accuracy(np.ones((0, 4)), np.zeros(0, dtype=int), x, y)
    with pytest.raises(DataError, match="No labels"):
        split_indices(np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="empty"):
        evaluate_backbone(lambda images: {}, [])
    with pytest.raises(DataError, match="masks"):
        dense_probe(np.ones((4, 3, 2)), np.ones((4, 2), dtype=int), np.ones((4, 3, 2)), np.ones((4, 3), dtype=int))
    with pytest.raises(ConfigError):
        knn_accuracy(x, y, x, y, k=0)
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, y, lambdas=[-1.0])
    with pytest.raises(ConfigError):
        split_indices(y, test_fraction=1.5)
    with pytest.raises(ConfigError, match="dense target"):
        dense_targets(toy_features(), "everything")


class PatchMeans:
    """A Runner-like source whose patch tokens are the per-channel means of each patch's pixels."""

    def __init__(self, patch: int):
        self.patch = patch

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        b, c, h, w = images.shape
        p = self.patch
        tokens = images.reshape(b, c, h // p, p, w // p, p).mean(axis=(3, 5)).reshape(b, c, -1).transpose(0, 2, 1)
        return {"cls": tokens.mean(1), "patch_tokens": tokens}


def rectangles(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose channel 0 is the foreground mask (random rectangles not aligned to patches) plus noise, so a
    patch's channel-0 mean is its foreground coverage: a correctly aligned dense probe is near perfect."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for mask in masks:
        top, left = rng.integers(0, size // 2, size=2)
        height, width = rng.integers(size // 4, size // 2, size=2)
        mask[top:top + height, left:left + width] = True
    images = rng.normal(scale=0.05, size=(n, 3, size, size)).astype(np.float32)
    images[:, 0] += masks
    return images, np.arange(n) % 2, masks


def test_evaluate_backbone_aligns_tokens_with_masks():
    dataset = rectangles(80, 32, seed=0)
    source = PatchMeans(8)
    scores = evaluate_backbone(source, dataset, dense=("fg",))
    assert scores["dense_fg_miou"] > 0.9, scores
    transposed = evaluate_backbone(lambda images: {k: (v.reshape(len(v), 4, 4, -1).transpose(0, 2, 1, 3)
                                                       .reshape(len(v), 16, -1) if k == "patch_tokens" else v)
                                                   for k, v in source.run(images).items()}, dataset, dense=("fg",))
    # Tokens in the wrong order (grid transposed) no longer match the masks: the dense probe must collapse.
    assert transposed["dense_fg_miou"] < scores["dense_fg_miou"] - 0.2, transposed


def test_evaluate_backbone_runs_on_synthetic_shapes(tmp_path):
    dataset = SyntheticShapes(48, img_size=32, patch_size=8, seed=0)
    scores = evaluate_backbone(PatchMeans(8), dataset, cache_dir=tmp_path, source_id="patch-means")
    assert {"knn_cls_acc", "linear_pooled_acc", "dense_fg_miou", "dense_class_miou"} <= set(scores)
    assert all(np.isfinite(value) for value in scores.values())
    assert all(0.0 <= scores[key] <= 1.0 for key in scores if key.endswith(("_acc", "_miou")))
