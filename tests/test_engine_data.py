"""Training data order: orientation-grouped global batches, identical across world sizes, resumable."""

from __future__ import annotations

import torch

from msad.engine.data import EpochSeededDataset, GroupedDistributedSampler, same_padding_batches, shard_indices

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


def test_eval_batches_hold_one_padded_size_and_every_index_once() -> None:
    # (height, width) of the files; resized to short side 256, long side <= 400, padded to multiples of 256
    sizes = [(480, 640), (480, 600), (300, 300), (640, 480), (500, 500), (480, 640), (200, 900), (480, 640)]
    batches = same_padding_batches(sizes, [0, 2, 3, 4, 5, 6, 7], 2, short_side=256, max_size=400,
                                   size_divisibility=256)
    # 480x640 -> 256x341 -> 256x512; 300x300 and 500x500 -> 256x256; 640x480 -> 341x256 -> 512x256;
    # 200x900 -> 89x400 -> 256x512
    assert batches == [[0, 5], [6, 7], [2, 4], [3]]
    assert sorted(i for b in batches for i in b) == [0, 2, 3, 4, 5, 6, 7]


def test_detections_do_not_depend_on_batch_mates_of_the_same_padded_size() -> None:
    """Why evaluation batches by padded size: GroupNorm and C-FF's pooling see the padding. Next to an image of the
    same padded size an image's detections are exactly its own; next to a larger one they change."""
    from msad.models.teacher import MSADTeacher

    torch.manual_seed(0)
    teacher = MSADTeacher(width=0.25, fpn_channels=32, num_classes=3, head_convs=2, gn_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    image, same, larger = (torch.randn(3, h, w, generator=g) for h, w in ((200, 240), (256, 256), (256, 500)))

    def detect(batch: list[torch.Tensor]) -> dict:
        padded = torch.zeros(len(batch), 3, 256, max(-(-t.shape[-1] // 256) * 256 for t in batch))
        for slot, t in zip(padded, batch, strict=True):
            slot[:, : t.shape[1], : t.shape[2]] = t
        with torch.no_grad():
            return teacher.predict(padded, [tuple(t.shape[1:]) for t in batch], score_thresh=0.0)[0]

    alone = detect([image])
    assert len(alone["scores"]) > 0
    with_same = detect([image, same])  # equal up to float summation order (batched convolutions)
    assert torch.equal(alone["labels"], with_same["labels"])
    torch.testing.assert_close(with_same["scores"], alone["scores"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_same["boxes"], alone["boxes"], rtol=1e-5, atol=1e-4)
    with_larger = detect([image, larger])
    assert not (len(with_larger["scores"]) == len(alone["scores"])
                and torch.allclose(with_larger["scores"], alone["scores"]))
