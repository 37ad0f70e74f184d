"""Resumable sample order: batch t of a run is a pure function of (seed, t).

Each draw is (dataset index, draw number); the draw number seeds that sample's augmentation,
so a run resumed at iteration k sees exactly the images and crops an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler


class ResumableBatches(Sampler[list[tuple[int, int]]]):
    """Yields micro-batches of (index, draw) pairs, starting at micro-batch `start_batch`.

    Epoch e visits the dataset in the permutation `default_rng((seed, e))`; batches may span epochs.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_batch: int = 0):
        self.size, self.batch_size, self.seed, self.start_batch = size, batch_size, seed, start_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        draw = self.start_batch * self.batch_size
        epoch, order = -1, np.empty(0, np.int64)
        while True:
            batch = []
            for _ in range(self.batch_size):
                if draw // self.size != epoch:
                    epoch = draw // self.size
                    order = self._permutation(epoch)
                batch.append((int(order[draw % self.size]), draw))
                draw += 1
            yield batch

    def __len__(self) -> int:  # infinite stream; DataLoader only needs it for progress bars
        return 2**62


class DrawDataset(Dataset):
    """Wraps a dataset whose `load(index, rng_key)` takes the augmentation key explicitly."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, draw = key
        return self.dataset.get(index, (self.seed, draw))
