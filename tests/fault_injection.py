"""A data set that dies reading chosen items: a process killed mid-run, also when the read happens in a DataLoader
worker (the exception travels back to the training process). Test modules import it (`from fault_injection ...`)."""

from __future__ import annotations

from torch.utils.data import Dataset


class Killed(Exception):
    pass


class Armed(Dataset):
    """`data` with every item in `poisoned` raising Killed when read."""

    def __init__(self, data: Dataset, poisoned: set[int]):
        self.data, self.poisoned = data, poisoned

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if index in self.poisoned:
            raise Killed(f"killed reading item {index}")
        return self.data[index]
