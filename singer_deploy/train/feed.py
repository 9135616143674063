"""The input pipeline of the distillation loop: step-addressable batches through a torch DataLoader.

Batch `step` depends only on (seed, step, rank), and so does every random draw of its augmentation (each item's
transform runs under RNG seeded by its position in the stream): a run resumed at step s reads exactly the images,
crops and flips an uninterrupted run would have read, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import os
import random
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from singer_deploy.errors import ConfigError


class StreamSampler:
    """Batches drawn from an endless stream of per-epoch permutations, addressable by step.

    Batch `step` depends only on (seed, step, rank): resuming at step s replays exactly the batches an uninterrupted
    run would have seen, and ranks read disjoint slices of each global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ConfigError("The training data set is empty", expected="at least one image", found="0 images",
                              fix="check the data source")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._epoch, self._perm = -1, None

    def positions(self, step: int) -> range:
        """Stream positions of this rank's share of global batch `step`."""
        start = (step * self.world + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def batch(self, step: int) -> list[int]:
        return [self.index_at(p) for p in self.positions(step)]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return int(self._perm[offset])


class _StepBatches(Sampler):
    """The DataLoader's batch sampler: batches start..stop-1 as (index, stream position) pairs."""

    def __init__(self, sampler: StreamSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield [(self.sampler.index_at(p), p) for p in self.sampler.positions(step)]


class _Seeded(Dataset):
    """Item `index` read at stream position `position` with torch's CPU RNG and Python's seeded by (seed, position);
    the caller's RNG state is restored afterwards, so reading data never shifts the training RNG. Transforms run on
    the CPU, so no accelerator generator is seeded."""

    def __init__(self, data: Dataset, seed: int):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        item_seed = (self.seed * 1_000_003 + position) % 2 ** 63
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also seed the accelerators' generators, which
                # fork_rng(devices=[]) does not restore, and on a CPU-only host it costs a millisecond per item
                # (the lazy accelerator seeding records a stack trace): 10% of a planted-teacher step at 1 thread.
                torch.default_generator.manual_seed(item_seed)
                random.seed(item_seed)
                return self.data[index]
        finally:
            random.setstate(python_state)


def _collate(items: list[dict]) -> dict:
    """Only what training reads: the images, and the unreadable files items were substituted for."""
    return {"image": torch.stack([item["image"] for item in items]),
            "skipped": [item.get("skipped", "") for item in items]}


def default_workers(device: torch.device) -> int:
    """DataLoader worker processes when `train.workers` is unset: none on CPU (the cores train), else up to 8 per
    GPU process, sharing the host's cores between the local torchrun ranks."""
    if device.type == "cpu":
        return 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // local_world - 1))


def step_batches(data: Dataset, sampler: StreamSampler, start: int, stop: int, device: torch.device,
                 workers: int | None = None) -> DataLoader:
    """A DataLoader yielding batches start..stop-1 in order: workers decode ahead, pinned memory when training on
    CUDA (so the copy to the GPU can overlap compute), persistent workers.

    Workers start by "forkserver", not fork: forking a process that already runs OpenMP / oneDNN / OpenVINO thread
    pools (any process that exported or benchmarked before training) copies their locks and signal state mid-use.
    The forked-worker segfault once seen in the test suite came after OpenVINO had left the thread on a freed signal
    stack (docs/export.md, "One OpenVINO Core per process"); forkserver children come from a clean, single-threaded
    server process."""
    workers = default_workers(device) if workers is None else workers
    return DataLoader(_Seeded(data, sampler.seed), batch_sampler=_StepBatches(sampler, start, stop),
                      num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      multiprocessing_context="forkserver" if workers > 0 else None,
                      generator=torch.Generator().manual_seed(sampler.seed))
