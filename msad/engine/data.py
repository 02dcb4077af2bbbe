"""Data loading for training workers: deterministic augmentation and a resumable distributed sampler.

Two properties the loop relies on:
- the augmentation of image `i` in epoch `e` depends only on (seed, e, i), not on which worker or loader process
  reads it, so 1 worker x batch 2B and 2 workers x batch B see the same images, identically augmented;
- the sampler can start in the middle of an epoch, so a resumed run continues the exact data order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler


class EpochSeededDataset(Dataset):
    """Wraps a dataset so each item's random augmentation is seeded by (seed, epoch, index).

    Args:
        dataset: the dataset whose transform draws from torch's global RNG.
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # fork_rng restores the caller's RNG afterwards: with num_workers=0 this runs in the training process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index))
            return self.dataset[index]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can skip the first `start` samples of this rank's epoch (to resume mid-epoch).

    Also used with one worker, so the order of images per global batch is the same for every world size.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def shard_indices(length: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard: every index exactly once over all ranks (DistributedSampler pads with repeats, which
    would count some detections twice in COCOeval)."""
    return list(range(rank, length, world_size))
