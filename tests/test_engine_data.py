"""Training data order: orientation-grouped global batches, identical across world sizes, resumable."""

from __future__ import annotations

import torch

from msad.engine.data import EpochSeededDataset, GroupedDistributedSampler, shard_indices

LANDSCAPE = [i % 3 != 0 for i in range(50)]  # 33 landscape, 17 portrait


def rank_batches(sampler: GroupedDistributedSampler) -> list[list[int]]:
    order = list(sampler)
    b = sampler.batch_per_worker
    return [order[i:i + b] for i in range(0, len(order), b)]


def global_steps(world: int, batch: int, epoch: int = 0, start: int = 0) -> list[set[int]]:
    per_rank = []
    for rank in range(world):
        sampler = GroupedDistributedSampler(LANDSCAPE, batch, world, rank, seed=3)
        sampler.set_epoch(epoch)
        sampler.set_start(start)
        per_rank.append(rank_batches(sampler))
    return [set().union(*step) for step in zip(*per_rank, strict=True)]


def test_same_images_per_global_step_for_any_world_size() -> None:
    one = global_steps(world=1, batch=8)
    two = global_steps(world=2, batch=4)
    four = global_steps(world=4, batch=2)
    assert one == two == four
    assert len(one) == GroupedDistributedSampler(LANDSCAPE, 8, 1, 0, seed=3).batches_per_epoch == 6


def test_batches_are_one_orientation_except_the_leftover_batches() -> None:
    steps = global_steps(world=2, batch=4)
    pure = [s for s in steps if len({LANDSCAPE[i] for i in s}) == 1]
    # 33 landscape -> 4 full batches of 8, 17 portrait -> 2; the 1 + 1 leftovers cannot fill a batch: dropped
    assert len(pure) == 6 and all(len(s) == 8 for s in steps)
    assert len(set().union(*steps)) == 48


def test_order_depends_on_seed_and_epoch_only_and_resume_skips_exactly() -> None:
    assert global_steps(2, 4, epoch=0) == global_steps(2, 4, epoch=0)
    assert global_steps(2, 4, epoch=0) != global_steps(2, 4, epoch=1)
    assert global_steps(2, 4, epoch=1, start=4) == global_steps(2, 4, epoch=1)[4:]
    sampler = GroupedDistributedSampler(LANDSCAPE, 4, 2, 1, seed=3)
    sampler.set_start(4)
    assert len(sampler) == len(list(sampler)) == 2 * 4


def test_augmentation_seed_depends_on_item_not_on_process_rng() -> None:
    class Draw(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> float:
            return torch.rand(()).item()

    data = EpochSeededDataset(Draw(), seed=1)
    first = [data[i] for i in range(4)]
    torch.manual_seed(123)  # the caller's RNG state does not matter, and is left as it was
    state = torch.random.get_rng_state()
    assert [data[i] for i in range(4)] == first and len(set(first)) == 4
    assert torch.equal(torch.random.get_rng_state(), state)
    data.epoch = 1
    assert [data[i] for i in range(4)] != first


def test_eval_shards_cover_every_image_once() -> None:
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
