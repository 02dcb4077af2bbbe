"""Data loading for training workers: deterministic augmentation and a resumable distributed sampler.

Two properties the loop relies on:
- the augmentation of image `i` in epoch `e` depends only on (seed, e, i), not on which worker or loader process
  reads it, so 1 worker x batch 2B and 2 workers x batch B see the same images, identically augmented;
- the sampler can start in the middle of an epoch, so a resumed run continues the exact data order;
- batches hold one image orientation, so padding to a multiple of 256 does not double the pixels;
- evaluation batches hold images of one padded size, so detections do not depend on batch-mates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from msad.data.transforms import shortest_edge_size


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


class GroupedDistributedSampler(DistributedSampler):
    """Seeded, resumable sampler whose global batches hold images of one orientation (landscape or portrait).

    Images are padded to a multiple of 256 per batch, so a batch mixing a 256x384 and a 384x256 image pads both to
    512x512: 3.5x the pixels of a 256-px image, about 2x the step time. Grouping by orientation (as Detectron2's
    aspect-ratio grouping does) avoids that. The grouping is done on GLOBAL batches (batch_per_worker x world size)
    before they are split across ranks, so any world size sees the same images in the same global step: 1 worker x
    batch 2B and 2 workers x batch B train on identical data. Each epoch: a seeded permutation, split by orientation,
    cut into full global batches, batches shuffled; leftovers of both orientations form mixed batches at the end,
    and what does not fill a global batch is dropped (as drop_last).

    Args:
        landscape: per dataset index, whether the image is wider than tall.
        batch_per_worker: images per rank per step.
        num_replicas: world size.
        rank: this worker's rank.
        seed: the run's seed (the order also depends on the epoch, see set_epoch).
    """

    def __init__(self, landscape: Sequence[bool], batch_per_worker: int, num_replicas: int, rank: int,
                 seed: int) -> None:
        self.landscape = torch.as_tensor(list(landscape), dtype=torch.bool)
        super().__init__(range(len(self.landscape)), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.batch_per_worker = int(batch_per_worker)
        self.global_batch = self.batch_per_worker * num_replicas
        self.start_batch = 0
        self.batches_per_epoch = len(self._global_batches())  # the same every epoch: group sizes do not change
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.landscape)} images cannot fill one global batch of {self.global_batch}")

    def set_start(self, batch: int) -> None:
        """Skip the first `batch` steps of the epoch (a run resumed mid-epoch)."""
        self.start_batch = int(batch)

    def _global_batches(self) -> list[Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.landscape), generator=generator)
        batches: list[Tensor] = []
        leftovers = []
        for group in (order[self.landscape[order]], order[~self.landscape[order]], None):
            if group is None:  # last: the leftovers of both orientations, mixed
                group = torch.cat(leftovers)
            full = len(group) // self.global_batch
            batches += [group[i * self.global_batch:(i + 1) * self.global_batch] for i in range(full)]
            leftovers.append(group[full * self.global_batch:])
        shuffled = torch.randperm(len(batches), generator=generator)
        return [batches[i] for i in shuffled]

    def __iter__(self) -> Iterator[int]:
        for batch in self._global_batches()[self.start_batch:]:
            yield from batch[self.rank:: self.num_replicas].tolist()  # this rank's batch_per_worker images

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_per_worker


def shard_indices(length: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard: every index exactly once over all ranks (DistributedSampler pads with repeats, which
    would count some detections twice in COCOeval)."""
    return list(range(rank, length, world_size))


def same_padding_batches(sizes: Sequence[tuple[int, int]], indices: Sequence[int], batch_size: int, short_side: int,
                         max_size: int, size_divisibility: int) -> list[list[int]]:
    """Evaluation batches whose images all pad to the same size, so an image's detections never depend on its
    batch-mates: padding enters the head's GroupNorm statistics and C-FF's global pooling, so a batch padded to a
    larger neighbour would change them (the original evaluates one image per GPU for the same reason).

    Args:
        sizes: per dataset index, the (height, width) of the image file (from the annotations, no decoding).
        indices: the dataset indices to batch (this rank's shard), in order.
        batch_size: images per batch at most.
        short_side, max_size: the evaluation resize (`data.test_short_side`, `data.max_size`).
        size_divisibility: the padding multiple (`data.size_divisibility`).
    """
    step = max(int(size_divisibility), 1)
    groups: dict[tuple[int, int], list[int]] = {}
    for index in indices:
        height, width, _ = shortest_edge_size(*sizes[index], short_side, max_size)
        groups.setdefault((-(-height // step) * step, -(-width // step) * step), []).append(index)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
