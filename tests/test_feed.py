"""The DataLoader input pipeline: batches (augmentation included) depend only on (seed, step, rank), whatever the
number of workers and wherever a run resumes; a run killed mid-training with workers resumes bit-exactly."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fault_injection import Armed, Killed

from singer_deploy.config import SingerConfig
from singer_deploy.models.backbone import load_backbone
from singer_deploy.models.data import ImageFolder, image_transform
from singer_deploy.config import PlantedConfig
from singer_deploy.models.planted import build_planted_teacher
from singer_deploy.train.feed import StreamSampler, _Seeded, step_batches
from singer_deploy.config import TrainConfig
from singer_deploy.train.loop import distill

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 random-noise PNGs at 40 px, read with timm's training transform at 32 px (random crop + flip + jitter)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    student = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return ImageFolder(root, transform=image_transform(student.data_config(), training=True))


def read_batches(data, start: int, stop: int, workers: int) -> list[torch.Tensor]:
    sampler = StreamSampler(len(data), 4, seed=5)
    return [batch["image"] for batch in step_batches(data, sampler, start, stop, CPU, workers)]


def test_augmented_batches_depend_only_on_the_step(folder):
    rng_before = torch.get_rng_state()
    uninterrupted = read_batches(folder, 0, 6, workers=0)
    assert torch.equal(torch.get_rng_state(), rng_before)      # reading data never shifts the training RNG
    with_workers = read_batches(folder, 0, 6, workers=2)
    resumed = read_batches(folder, 3, 6, workers=2)
    assert len(uninterrupted) == len(with_workers) == 6 and len(resumed) == 3
    for a, b in zip(uninterrupted, with_workers):
        assert torch.equal(a, b)
    for a, b in zip(uninterrupted[3:], resumed):
        assert torch.equal(a, b)
    # The augmentation is really random: the same image at another stream position gets another crop / flip.
    seeded = _Seeded(folder, seed=5)
    assert torch.equal(seeded[(0, 0)]["image"], seeded[(0, 0)]["image"])
    assert not torch.equal(seeded[(0, 0)]["image"], seeded[(0, 24)]["image"])


def test_an_item_is_read_under_the_seed_of_its_stream_position(folder):
    """The seed is (seed, position) on the CPU generator: the same item torch.manual_seed(that seed) gives, so the
    batches of earlier releases are unchanged."""
    torch.manual_seed(5 * 1_000_003 + 7)
    random.seed(5 * 1_000_003 + 7)
    expected = folder[3]["image"]
    torch.manual_seed(0)
    assert torch.equal(_Seeded(folder, seed=5)[(3, 7)]["image"], expected)


def test_killed_run_with_dataloader_workers_resumes_to_the_same_weights(folder, tmp_path):
    teacher = build_planted_teacher(PlantedConfig(img_size=32, patch_size=8, embed_dim=64, depth=4,
                                                  artifact_layer=2, null_dim=4)).backbone
    singer = SingerConfig(rank=4, preset="published")
    train = TrainConfig(steps=6, batch_size=4, checkpoint_every=3, log_every=1, warmup_steps=2, device="cpu",
                        workers=2)

    def student():
        torch.manual_seed(0)
        return load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

    reference = distill(teacher, student(), folder, tmp_path / "ref", layers=[2], singer=singer, train=train,
                        progress=False)
    # Kill while reading batch 5: poison its items (epoch 0 of 24 images: no earlier batch read them).
    sampler = StreamSampler(len(folder), 4, seed=0)
    earlier = {i for step in range(4) for i in sampler.batch(step)}
    poisoned = set(sampler.batch(4)) - earlier
    assert poisoned, "the test needs a batch 5 item unseen in batches 1-4"
    with pytest.raises(Killed):
        distill(teacher, student(), Armed(folder, poisoned), tmp_path / "run", layers=[2], singer=singer,
                train=train, progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = distill(teacher, student(), folder, tmp_path / "run", layers=[2], singer=singer, train=train,
                      progress=False)
    for name in ("student", "projectors"):
        a = getattr(reference, name).state_dict() if name == "projectors" else reference.student.model.state_dict()
        b = getattr(resumed, name).state_dict() if name == "projectors" else resumed.student.model.state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert reference.device == resumed.device == CPU
