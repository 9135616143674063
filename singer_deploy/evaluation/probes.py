"""Frozen-feature probes: kNN and linear probes on image features, a dense linear probe on patches.

Offline stand-ins for the paper's IN-1k (image) and ADE20K (dense) linear probes (docs/method.md, "Probes"). All are
closed-form or non-parametric, seeded and CPU-fast, so two students can be compared in the same run without any
training noise.

Linear probes are closed-form ridge regressions to one-hot targets on standardised features rather than an LBFGS
logistic regression: one eigendecomposition of the feature covariance gives the whole regularisation path, so
choosing lambda on a validation split costs a few matrix products, and the result has no iteration count, learning
rate or convergence tolerance that could differ between the two students being compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from singer_deploy.errors import ConfigError, DataError
from singer_deploy.evaluation.features import FeatureSet, extract_features

DenseTarget = Literal["fg", "class", "mask"]
# Ridge strengths relative to the sample count (standardised features: trace(X^T X) ~ n x D).
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 3))
_CHUNK_ROWS = 65536  # rows per float64 block, so dense probes on many patches stay within a few hundred MB


# --------------------------------------------------------------------------- splits and checks

def _check_features(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 2 or y.ndim != 1:
        raise DataError(f"{what}: features must be (M, D) and labels (M,)", expected="2-D features, 1-D labels",
                        found=f"features {x.shape}, labels {y.shape}", fix="flatten tokens or pool them first")
    if len(x) == 0:
        raise DataError(f"{what}: no samples", expected="at least one sample", found="0", fix="pass more images")
    if len(x) != len(y):
        raise DataError(f"{what}: features and labels differ in length", expected="one label per feature row",
                        found=f"{len(x)} rows, {len(y)} labels", fix="pass matching arrays")


def _check_classes(y: np.ndarray, what: str) -> None:
    if len(np.unique(y)) < 2:
        raise DataError(f"{what}: the training labels hold a single class", expected="at least two classes",
                        found=f"only class {np.unique(y).tolist()}", fix="use a dataset with two or more classes")


def split_indices(labels: np.ndarray, *, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split: each class with >= 2 samples puts ~test_fraction into test."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("test_fraction must lie strictly between 0 and 1", expected="e.g. 0.25",
                          found=str(test_fraction), fix="pick a fraction in (0, 1)")
    labels = np.asarray(labels)
    if labels.size == 0:
        raise DataError("No labels to split", expected="at least two labelled samples", found="0",
                        fix="pass a non-empty dataset")
    _check_classes(labels, "split")
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) >= 2:
            test.append(members[:min(len(members) - 1, max(1, round(test_fraction * len(members))))])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    if len(test_idx) == 0:
        raise DataError("Too few samples for a held-out split", expected="some class with >= 2 samples",
                        found=f"{len(labels)} samples", fix="pass more images")
    return train_idx, test_idx


def _check_split(split: tuple[np.ndarray, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    train_idx, test_idx = (np.asarray(part, dtype=np.int64) for part in split)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError("A given split part is empty", expected="non-empty train and test indices",
                        found=f"{len(train_idx)} train, {len(test_idx)} test", fix="pass both index arrays")
    if min(train_idx.min(), test_idx.min()) < 0 or max(train_idx.max(), test_idx.max()) >= n:
        raise DataError("Split indices out of range", expected=f"indices in [0, {n})",
                        found=f"[{min(train_idx.min(), test_idx.min())}, {max(train_idx.max(), test_idx.max())}]",
                        fix="index into the dataset the features came from")
    return train_idx, test_idx


# --------------------------------------------------------------------------- kNN

def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 k: int = 20, temperature: float | None = 0.07) -> float:
    """Cosine kNN accuracy. temperature=T weighs each neighbour's vote by exp(sim / T) as in DINO's kNN eval;
    temperature=None is a plain majority vote. k is capped at the training-set size."""
    _check_features(train_x, train_y, "kNN train")
    _check_features(test_x, test_y, "kNN test")
    _check_classes(train_y, "kNN")
    if k < 1 or (temperature is not None and temperature <= 0):
        raise ConfigError("Invalid kNN settings", expected="k >= 1 and temperature > 0 (or None)",
                          found=f"k={k}, temperature={temperature}", fix="use k=20, temperature=0.07")
    classes, train_codes = np.unique(train_y, return_inverse=True)
    train_unit = _unit_rows(train_x)
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(test_x), 1024):
        sims = _unit_rows(test_x[start:start + 1024]) @ train_unit.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        weights = np.exp(top_sims / temperature) if temperature is not None else np.ones_like(top_sims)
        votes = np.zeros((len(top), len(classes)))
        np.add.at(votes, (np.arange(len(top))[:, None], train_codes[top]), weights)
        correct += int((classes[votes.argmax(1)] == test_y[start:start + 1024]).sum())
    return correct / len(test_x)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- closed-form ridge

class _RidgePath:
    """Ridge regression of standardised features to one-hot targets for every lambda at once.

    One pass accumulates sum(x), X^T X and X^T Y in float64 blocks; the eigendecomposition of the standardised
    covariance then gives W(lambda) = V diag(1 / (e + lambda n)) V^T X^T Y for any lambda in a few products.
    """

    def __init__(self, x: np.ndarray, codes: np.ndarray, num_classes: int):
        n, dim = x.shape
        total, gram, cross = np.zeros(dim), np.zeros((dim, dim)), np.zeros((dim, num_classes))
        counts = np.bincount(codes, minlength=num_classes).astype(np.float64)
        for start in range(0, n, _CHUNK_ROWS):
            block = x[start:start + _CHUNK_ROWS].astype(np.float64)
            total += block.sum(0)
            gram += block.T @ block
            cross += block.T @ np.eye(num_classes)[codes[start:start + _CHUNK_ROWS]]
        self.mean = total / n
        self.y_mean = counts / n
        cov = gram - n * np.outer(self.mean, self.mean)
        self.std = np.sqrt(np.clip(np.diag(cov) / n, 0.0, None))
        self.std[self.std < 1e-8] = 1.0  # constant channels carry nothing; avoid dividing by zero
        scaled_cov = cov / np.outer(self.std, self.std)
        self.evals, self.evecs = np.linalg.eigh(scaled_cov)
        self.evals = np.clip(self.evals, 0.0, None)
        centred_cross = (cross - n * np.outer(self.mean, self.y_mean)) / self.std[:, None]
        self.projected = self.evecs.T @ centred_cross
        self.n = n

    def scores(self, x: np.ndarray, lam: float) -> np.ndarray:
        """Regression outputs (rows of x, classes); the argmax is the predicted class."""
        weights = self.evecs @ (self.projected / (self.evals + lam * self.n)[:, None])
        out = np.empty((len(x), weights.shape[1]))
        for start in range(0, len(x), _CHUNK_ROWS):
            block = (x[start:start + _CHUNK_ROWS].astype(np.float64) - self.mean) / self.std
            out[start:start + _CHUNK_ROWS] = block @ weights + self.y_mean
        return out

    def predict(self, x: np.ndarray, lam: float) -> np.ndarray:
        return self.scores(x, lam).argmax(1)

    def select(self, x: np.ndarray, codes: np.ndarray, lambdas: Sequence[float],
               score: Callable[[np.ndarray, np.ndarray], float]) -> float:
        """The lambda with the best validation score; ties (common when the data are separable) go to the lower
        validation squared error of the regression itself, the quantity ridge optimises."""
        best = None
        for lam in lambdas:
            outputs = self.scores(x, lam)
            squared_error = float(np.square(outputs - np.eye(outputs.shape[1])[codes]).sum(1).mean())
            key = (score(outputs.argmax(1), codes), -squared_error)
            if best is None or key > best[0]:
                best = (key, lam)
        return best[1]


def _check_lambdas(lambdas: Sequence[float]) -> tuple[float, ...]:
    if not lambdas or min(lambdas) <= 0:
        raise ConfigError("Ridge lambdas must be a non-empty list of positive numbers", expected="e.g. 1e-6..1e2",
                          found=str(list(lambdas)), fix="use probes.DEFAULT_LAMBDAS")
    return tuple(sorted(lambdas))


def _accuracy(prediction: np.ndarray, truth: np.ndarray) -> float:
    return float((prediction == truth).mean())


def _holdout(n_groups: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n_groups)
    n_val = min(n_groups - 1, max(1, round(fraction * n_groups)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 lambdas: Sequence[float] = DEFAULT_LAMBDAS, val_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, float]:
    """Closed-form ridge to one-hot labels; lambda chosen on a seeded validation part of train, then refit on all
    of train. Returns {"accuracy", "lambda"}."""
    _check_features(train_x, train_y, "linear probe train")
    _check_features(test_x, test_y, "linear probe test")
    _check_classes(train_y, "linear probe")
    grid = _check_lambdas(lambdas)
    classes, codes = np.unique(train_y, return_inverse=True)
    lam = grid[len(grid) // 2]  # too few samples to validate: a mid-range strength
    if len(train_x) >= 4:
        fit, val = _holdout(len(train_x), val_fraction, np.random.default_rng(seed))
        if len(np.unique(codes[fit])) >= 2:
            lam = _RidgePath(train_x[fit], codes[fit], len(classes)).select(train_x[val], codes[val], grid,
                                                                             _accuracy)
    prediction = classes[_RidgePath(train_x, codes, len(classes)).predict(test_x, lam)]
    return {"accuracy": _accuracy(prediction, test_y), "lambda": float(lam)}


# --------------------------------------------------------------------------- dense probe

def mean_iou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean IoU over classes that occur in the prediction or the truth (classes absent from both are skipped)."""
    confusion = np.bincount(truth.ravel() * num_classes + prediction.ravel(),
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean())


def dense_targets(features: FeatureSet, target: DenseTarget = "fg") -> np.ndarray:
    """Per-patch classes (M, N): "fg" = foreground/background, "class" = 0 background, 1 + image label on the
    foreground (per-class masks), "mask" = the dataset's own mask classes."""
    if features.patch_masks is None:
        raise DataError("The features carry no masks", expected="a dataset with 'fg_mask'", found="masks=None",
                        fix="use a dataset with masks (e.g. SyntheticShapes) for the dense probe")
    masks = features.patch_masks.reshape(len(features), -1)
    if target == "mask":
        return masks
    if target == "fg":
        return (masks > 0).astype(np.int64)
    if target == "class":
        return np.where(masks > 0, features.labels[:, None] + 1, 0)
    raise ConfigError("Unknown dense target", expected="'fg', 'class' or 'mask'", found=repr(target),
                      fix="pick one of those")


def dense_probe(train_patches: np.ndarray, train_masks: np.ndarray, test_patches: np.ndarray,
                test_masks: np.ndarray, *, lambdas: Sequence[float] = DEFAULT_LAMBDAS, val_fraction: float = 0.2,
                seed: int = 0) -> dict[str, float]:
    """Per-patch closed-form ridge classifier: patches (M, N, D), masks (M, N) int classes.

    Validation holds out whole images (not single patches, whose neighbours would leak). Returns
    {"miou", "pixel_accuracy", "lambda"}; accuracy is over patches, the probe's resolution.
    """
    for patches, masks, what in ((train_patches, train_masks, "dense train"), (test_patches, test_masks, "dense test")):
        if patches.ndim != 3 or masks.shape != patches.shape[:2]:
            raise DataError(f"{what}: patches must be (M, N, D) and masks (M, N)", expected="matching M and N",
                            found=f"patches {patches.shape}, masks {masks.shape}", fix="pass per-patch masks")
        if len(patches) == 0:
            raise DataError(f"{what}: no images", expected="at least one image", found="0", fix="pass more images")
        if masks.min() < 0:
            raise DataError(f"{what}: negative mask class", expected="classes 0..C-1", found=str(masks.min()),
                            fix="map ignore labels to a class or drop those images")
    _check_classes(train_masks.ravel(), "dense probe")
    grid = _check_lambdas(lambdas)
    num_classes = int(max(train_masks.max(), test_masks.max())) + 1
    dim = train_patches.shape[2]
    lam = grid[len(grid) // 2]  # too few samples to validate: a mid-range strength
    if len(train_patches) >= 4:
        fit, val = _holdout(len(train_patches), val_fraction, np.random.default_rng(seed))
        fit_codes = train_masks[fit].ravel()
        if len(np.unique(fit_codes)) >= 2:
            path = _RidgePath(train_patches[fit].reshape(-1, dim), fit_codes, num_classes)
            lam = path.select(train_patches[val].reshape(-1, dim), train_masks[val].ravel(), grid,
                              lambda prediction, truth: mean_iou(prediction, truth, num_classes))
    path = _RidgePath(train_patches.reshape(-1, dim), train_masks.ravel(), num_classes)
    prediction, truth = path.predict(test_patches.reshape(-1, dim), lam), test_masks.ravel()
    return {"miou": mean_iou(prediction, truth, num_classes),
            "pixel_accuracy": float((prediction == truth).mean()), "lambda": float(lam)}


# --------------------------------------------------------------------------- all probes

def evaluate_features(features: FeatureSet, *, split: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0,
                      test_fraction: float = 0.25, k: int = 20, temperature: float | None = 0.07,
                      lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                      dense: Sequence[DenseTarget] = ("fg", "class")) -> dict[str, float]:
    """Every probe on one FeatureSet, on one deterministic split (stratified by image label unless given).

    Keys: knn_{cls,pooled}_acc, linear_{cls,pooled}_acc (+ _lambda), dense_{target}_{miou,pixel_acc} (+ _lambda)
    for each dense target when masks and patch tokens exist, and n_train / n_test.
    """
    if len(features) == 0:
        raise DataError("The feature set is empty", expected="at least two labelled images", found="0 images",
                        fix="pass a non-empty dataset")
    train_idx, test_idx = (_check_split(split, len(features)) if split is not None
                           else split_indices(features.labels, test_fraction=test_fraction, seed=seed))
    y_train, y_test = features.labels[train_idx], features.labels[test_idx]
    results: dict[str, float] = {"n_train": float(len(train_idx)), "n_test": float(len(test_idx))}
    for name, x in (("cls", features.cls), ("pooled", features.pooled)):
        results[f"knn_{name}_acc"] = knn_accuracy(x[train_idx], y_train, x[test_idx], y_test, k=k,
                                                  temperature=temperature)
        linear = linear_probe(x[train_idx], y_train, x[test_idx], y_test, lambdas=lambdas, seed=seed)
        results[f"linear_{name}_acc"], results[f"linear_{name}_lambda"] = linear["accuracy"], linear["lambda"]
    if features.patches is not None and features.patch_masks is not None:
        for target in dense:
            masks = dense_targets(features, target)
            scores = dense_probe(features.patches[train_idx], masks[train_idx], features.patches[test_idx],
                                 masks[test_idx], lambdas=lambdas, seed=seed)
            results[f"dense_{target}_miou"] = scores["miou"]
            results[f"dense_{target}_pixel_acc"] = scores["pixel_accuracy"]
            results[f"dense_{target}_lambda"] = scores["lambda"]
    return results


def evaluate_backbone(source: Any, dataset: Any, *, layer: int | None = None, cache_dir: str | Path | None = None,
                      source_id: str | None = None, batch_size: int = 64, **probe_kwargs: Any) -> dict[str, float]:
    """Extract (or reuse cached) frozen features of `source` on `dataset`, then run every probe.

    `source`: a Backbone / teacher, a Runner or a callable (see `singer_deploy.evaluation.features`); `probe_kwargs` go to
    `evaluate_features` (split, seed, test_fraction, k, temperature, lambdas, dense).
    """
    features = extract_features(source, dataset, layer=layer, batch_size=batch_size, cache_dir=cache_dir,
                                source_id=source_id)
    return evaluate_features(features, **probe_kwargs)
