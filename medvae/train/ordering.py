"""Deterministic data order: which volume, and which random crop, every step sees.

Each sample depends only on (seed, epoch, index): the epoch's permutation comes from a generator
seeded with (seed, epoch) and the random transforms of item i are re-seeded from (seed, epoch, i)
before it is built. So a resumed run sees exactly the batches an uninterrupted run would, whatever
the worker processes or RNG states were, and every rank computes the same permutation (Accelerate
then gives each rank its own share of it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def _mix(*values: int) -> int:
    """A 32-bit seed from several integers (SeedSequence spreads nearby inputs apart)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


class EpochOrderedDataset(Dataset):
    """Wrap a MONAI dataset: index i of epoch e is item perm_e[i] mod n, with seeded random transforms.

    ``min_length``: an epoch lists every item ``ceil(min_length / n)`` times (each copy with its own
    random crop), so that a dataset of fewer volumes than one global batch still fills batches.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, min_length: int = 1):
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle = shuffle
        self.copies = max(1, -(-int(min_length) // max(1, len(dataset))))
        self.epoch = 0
        self._permutation = self._make_permutation(0)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        n = len(self.dataset) * self.copies
        if not self.shuffle:
            return np.arange(n)
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(n, generator=generator).numpy()

    def use_epoch(self, epoch: int) -> None:
        # Not named set_epoch on purpose: Accelerate calls dataset.set_epoch(number of times the
        # loader was iterated), which restarts at 0 in a resumed run.
        self.epoch = int(epoch)
        self._permutation = self._make_permutation(self.epoch)

    def __len__(self) -> int:
        return len(self.dataset) * self.copies

    def __getitem__(self, index: int):
        copy, item_index = divmod(int(self._permutation[index]), len(self.dataset))
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            key = (self.seed, self.epoch, item_index) if self.copies == 1 else (self.seed, self.epoch, item_index, copy)
            transform.set_random_state(seed=_mix(*key))
        return self.dataset[item_index]
