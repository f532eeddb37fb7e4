"""Epoch sampling: a stateless (seed, epoch) -> indices sampler that shards across ranks
and resumes exactly.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


class EpochSampler(torch.utils.data.Sampler):
    """This rank's indices for one epoch, a pure function of ``(seed, epoch)``.

    Without weights: ``num_samples`` (default n) indices from consecutive permutations of
    ``0..n-1`` (``shuffle``) or ``0, 1, ..., n-1, 0, ...``. With
    ``weights``: ``num_samples`` draws with replacement, probability proportional to the
    weights (class-balanced sampling). Under DDP every rank draws the same list and takes
    every ``world``-th entry from ``rank`` (the list is padded to a multiple of ``world``),
    so the ranks see disjoint shares. Being stateless in the epoch, it makes a resumed run
    see the same samples an uninterrupted run would.
    """

    def __init__(self, n: int, weights: np.ndarray | None = None, num_samples: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, np.float64)
            if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"sample_weights must be {n} finite non-negative numbers with a positive sum")
            self.weights = torch.from_numpy(w)
        self.num_samples = int(num_samples or n)
        self.per_rank = math.ceil(self.num_samples / world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        elif self.shuffle:  # whole permutations, as many as num_samples needs
            reps = -(-self.num_samples // self.n)
            idx = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[: self.num_samples]
        else:
            idx = torch.arange(self.num_samples) % self.n
        idx = idx.tolist()
        total = self.per_rank * self.world
        idx += idx[: total - len(idx)]
        return idx[self.rank:total:self.world]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return self.per_rank


def seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
