"""Samplers whose order depends only on (seed, epoch, rank), and per-sample seeded augmentation.

Lightning creates an epoch's data iterator before any hook of that epoch runs (also on resume), so loader
randomness seeded from the global RNG would differ between a straight and a resumed run. Here the sampler
yields (epoch, index) and the dataset seeds every sample from (seed, epoch, index): identical batches either way,
for any number of workers.
"""
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


def mix(*values: int) -> int:
    """A 31-bit seed from integers (stable across processes, unlike hash())."""
    s = 0
    for v in values:
        s = (s * 1_000_003 + v + 0x9E3779B9) % 2**31
    return s


class EpochSampler(Sampler):
    """Shuffled (or ordered) indices of this rank's shard, a fresh permutation per epoch; yields (epoch, index).

    Every rank gets len(dataset) // world samples (the remainder is dropped, as DistributedSampler(drop_last) does).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning before each epoch's iterator is created
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix(self.seed, self.epoch)))
        else:
            order = torch.arange(self.n)
        shard = order[self.rank: len(self) * self.world: self.world]
        return iter([(self.epoch, i) for i in shard.tolist()])


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... in order: each evaluation sample is seen by exactly one rank."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, n, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


@contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch; in the main process restore their states afterwards."""
    main = get_worker_info() is None
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if main else None
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if main:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class EpochSeeded(Dataset):
    """Wraps a dataset so that item (epoch, i) is produced under seed (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with seeded(mix(self.seed, epoch, i)):
            return self.dataset[i]
