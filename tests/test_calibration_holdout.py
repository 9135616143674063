"""INT8 gates out of sample: calibration images come from the training data and never equal a parity image."""

from __future__ import annotations

import numpy as np
import pytest

from singer_deploy.calibration.holdout import calibration_from_training, image_hashes
from singer_deploy.errors import DataError
from singer_deploy.models.data import SyntheticShapes, stack_images


def _images(n: int, seed: int) -> np.ndarray:
    return stack_images(SyntheticShapes(n, 32, 8, seed=seed)).numpy()


def test_all_training_images_when_fewer_than_the_size_and_none_is_a_parity_image():
    training, parity = SyntheticShapes(40, 32, 8, seed=0), _images(12, seed=1)
    held = calibration_from_training(training, parity)          # default size 300 > 40 training images
    record = held.to_dict()
    assert len(held.calibration) == 40 and sorted(record["indices"]) == list(range(40))
    assert record["overlap_with_parity"] == 0 and record["dropped_overlap"] == 0
    assert not set(image_hashes(held.calibration.images)) & set(image_hashes(parity))
    assert record["parity_image_sha256"] == image_hashes(parity)


def test_training_images_equal_to_parity_images_are_dropped_and_counted():
    parity = _images(8, seed=1)
    training = np.concatenate([_images(20, seed=0), parity[:5]])
    held = calibration_from_training(training, parity, size=25, seed=3)
    assert len(held.calibration) == 20 and held.dropped_overlap == 5
    assert not set(held.image_sha256) & set(held.parity_sha256)
    assert set(held.calibration.indices.tolist()) == set(range(20))


def test_a_subset_is_chosen_by_seed_and_an_all_parity_training_set_is_refused():
    training, parity = _images(30, seed=0), _images(4, seed=1)
    a = calibration_from_training(training, parity, size=10, seed=0)
    assert len(a.calibration) == 10
    assert a.calibration.indices.tolist() == calibration_from_training(training, parity, size=10, seed=0) \
        .calibration.indices.tolist()
    np.testing.assert_array_equal(a.calibration.images, training[a.calibration.indices])
    with pytest.raises(DataError, match="parity image"):
        calibration_from_training(parity, parity)
