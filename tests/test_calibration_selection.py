"""Calibration-set selection: deterministic, capped, and k-center really covers the feature space."""

import numpy as np
import pytest
import torch

from singer_deploy.calibration.selection import (CalibrationSet, kcenter_selection, random_selection,
                                                 select_calibration_set)
from singer_deploy.errors import ConfigError


def _images(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def test_random_selection_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b, c = random_selection(100, 10, 3), random_selection(100, 10, 3), random_selection(100, 10, 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) == 10


def test_select_caps_size_at_what_exists_and_returns_those_images():
    images = _images(12)
    chosen = select_calibration_set(images, size=300, method="random", seed=1)
    assert isinstance(chosen, CalibrationSet) and len(chosen) == 12
    assert np.array_equal(chosen.images, images[chosen.indices])
    assert sorted(chosen.indices.tolist()) == list(range(12))


def test_kcenter_picks_one_image_per_cluster_before_repeating_any():
    # four tight, far-apart clusters of 10 points each: greedy k-center with k=4 must hit all four
    centers = np.eye(4, 16, dtype=np.float32) * 10
    rng = np.random.default_rng(0)
    feats = np.concatenate([c + 0.01 * rng.normal(size=(10, 16)) for c in centers]).astype(np.float32)
    picked = kcenter_selection(feats, 4, seed=7)
    assert sorted((picked // 10).tolist()) == [0, 1, 2, 3]
    assert np.array_equal(picked, kcenter_selection(feats, 4, seed=7))


def test_kcenter_selection_uses_the_embedding_callable():
    images = _images(30)
    calls = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.mean(dim=(2, 3))

    chosen = select_calibration_set(images, size=5, method="kcenter", seed=0, embed_fn=embed, batch_size=8)
    again = select_calibration_set(images, size=5, method="kcenter", seed=0, embed_fn=embed, batch_size=8)
    assert sum(calls) == 60 and np.array_equal(chosen.indices, again.indices)
    assert chosen.method == "kcenter" and len(set(chosen.indices.tolist())) == 5


@pytest.mark.parametrize("kwargs", [dict(method="kmeans"), dict(size=0), dict(method="kcenter")])
def test_bad_requests_raise_config_errors(kwargs):
    with pytest.raises(ConfigError):
        select_calibration_set(_images(), **kwargs)
