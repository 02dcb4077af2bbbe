"""Transforms, batching, the COCO dataset and the synthetic shapes dataset."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msad.data.coco import CocoDetection
from msad.data.shapes import SHAPE_CLASSES, ShapesSpec, dataset_summary, ensure_shapes_dataset
from msad.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    Collate,
    DetectionTransform,
    collate,
    eval_transform,
    shortest_edge_size,
    to_low_resolution,
)
from msad.errors import UserError


def _sample(height: int, width: int, boxes: list[list[float]]) -> tuple[torch.Tensor, dict]:
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.zeros(len(boxes), dtype=torch.int64),
        "image_id": 7,
    }
    return image, target


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize(("flip", "expected"), [(0.0, [5.0, 10.0, 25.0, 30.0]), (1.0, [75.0, 10.0, 95.0, 30.0])])
def test_resize_and_flip_move_boxes_exactly(flip: float, expected: list[float]) -> None:
    image, target = _sample(100, 200, [[10, 20, 50, 60]])
    out, out_target = DetectionTransform((50,), max_size=1000, flip_prob=flip)(image, target)
    assert out.shape == (3, 50, 100) and out.dtype == torch.float32
    assert out_target["boxes"].tolist() == [expected]
    assert type(out_target["boxes"]) is torch.Tensor and type(out) is torch.Tensor
    assert out_target["scale"] == 0.5 and out_target["orig_size"] == (100, 200)
    assert out_target["image_id"] == 7 and out_target["labels"].tolist() == [0]


def test_flip_mirrors_pixels() -> None:
    image = torch.zeros(3, 8, 16, dtype=torch.uint8)
    image[:, :, :4] = 255  # left quarter white
    out, _ = DetectionTransform((8,), max_size=100, flip_prob=1.0)(image, _sample(8, 16, [])[1])
    white = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(out[0, :, 12:], torch.full((8, 4), white))
    assert out[0, :, :12].max() < 0


def test_long_side_is_capped_at_max_size() -> None:
    image, target = _sample(100, 400, [[10, 20, 50, 60]])
    out, out_target = eval_transform(200, max_size=500)(image, target)
    assert out.shape == (3, 125, 500)
    assert out_target["scale"] == 1.25
    assert out_target["boxes"].tolist() == [[12.5, 25.0, 62.5, 75.0]]


def test_shortest_edge_size_rounds_like_detectron2() -> None:
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067, 800 / 480)
    assert shortest_edge_size(640, 427, 800, 1333)[:2] == (1199, 800)
    assert shortest_edge_size(100, 1000, 800, 1333)[:2] == (133, 1333)


def test_normalisation_and_pil_input() -> None:
    pil = Image.new("RGB", (6, 4), (255, 0, 255))
    out, _ = eval_transform(4, max_size=100)(pil, _sample(4, 6, [])[1])
    expected = [
        (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
        -IMAGENET_MEAN[1] / IMAGENET_STD[1],
        (1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
    ]
    assert out.shape == (3, 4, 6)
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected))


def test_short_side_is_drawn_from_the_list() -> None:
    torch.manual_seed(0)
    transform = DetectionTransform((32, 48, 64), max_size=1000)
    heights = {transform(*_sample(16, 24, []))[0].shape[-2] for _ in range(30)}
    assert heights == {32, 48, 64}


# ---------------------------------------------------------------- batching and low resolution


def test_collate_pads_to_a_multiple_and_keeps_sizes() -> None:
    a, b = torch.rand(3, 50, 70), torch.rand(3, 64, 33)
    batch = collate([(a, {"image_id": 1}), (b, {"image_id": 2})], size_divisibility=32)
    assert batch.images.shape == (2, 3, 64, 96)
    assert batch.image_sizes == [(50, 70), (64, 33)]
    assert torch.equal(batch.images[0, :, :50, :70], a) and torch.equal(batch.images[1, :, :64, :33], b)
    assert batch.images[0, :, 50:].abs().sum() == 0 and batch.images[0, :, :, 70:].abs().sum() == 0
    assert [t["image_id"] for t in batch.targets] == [1, 2]


def test_collate_callable_pickles_and_batch_moves() -> None:
    fn = pickle.loads(pickle.dumps(Collate(256)))
    image, target = _sample(20, 30, [[1, 2, 3, 4]])
    batch = fn([(image.float(), target)])
    assert isinstance(batch, Batch) and batch.images.shape == (1, 3, 256, 256)
    moved = batch.to("cpu")
    assert moved.targets[0]["boxes"].tolist() == [[1.0, 2.0, 3.0, 4.0]] and moved.targets[0]["image_id"] == 7


def test_to_low_resolution_halves_exactly() -> None:
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    nearest = to_low_resolution(images, "nearest")
    assert torch.equal(nearest, images[..., ::2, ::2])  # the original's every-second-pixel behaviour
    smooth = to_low_resolution(torch.full((1, 3, 8, 12), 0.7), "antialias")
    assert smooth.shape == (1, 3, 4, 6) and torch.allclose(smooth, torch.full_like(smooth, 0.7))
    with pytest.raises(ValueError, match="even"):
        to_low_resolution(torch.zeros(1, 3, 8, 7))
    with pytest.raises(ValueError, match="antialias"):
        to_low_resolution(images, "bicubic")


# ---------------------------------------------------------------- COCO dataset


@pytest.fixture
def coco_dir(tmp_path: Path) -> tuple[Path, Path]:
    """Four images: boxes + a crowd box, no boxes, degenerate/clipped boxes, and one whose file is missing."""
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (60, 40), (10, 20, 30)).save(tmp_path / name)
    images = [
        {"id": i, "file_name": n, "height": 40, "width": 60}
        for i, n in ((11, "a.png"), (12, "b.png"), (13, "c.png"), (14, "missing.png"))
    ]
    anns = [
        {"id": 1, "image_id": 11, "category_id": 90, "bbox": [30, 5, 10, 20], "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 7, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 0},
        {"id": 4, "image_id": 13, "category_id": 7, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
        {"id": 5, "image_id": 13, "category_id": 7, "bbox": [70, 5, 10, 10], "iscrowd": 0},  # outside the image
        {"id": 6, "image_id": 13, "category_id": 3, "bbox": [50, 30, 20, 20], "iscrowd": 0},  # clipped
    ]
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return tmp_path, annotation_file


def test_coco_dataset_maps_ids_and_filters_boxes(coco_dir: tuple[Path, Path]) -> None:
    image_dir, annotation_file = coco_dir
    with pytest.warns(UserWarning, match="dropped 2 degenerate boxes") as record:
        dataset = CocoDetection(image_dir, annotation_file, transform=None)
    assert len(record) == 1
    assert len(dataset) == 4 and dataset.num_classes == 3 and dataset.num_degenerate_boxes == 2
    assert dataset.contiguous_to_category_id == [3, 7, 90]
    assert dataset.category_id_to_contiguous == {3: 0, 7: 1, 90: 2}
    assert dataset.category_names == ["car", "train", "toothbrush"]
    assert len(dataset.coco.getAnnIds()) == 6  # pycocotools index is the file as written

    image, target = dataset[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8 and target["image_id"] == 11
    assert target["boxes"].tolist() == [[30, 5, 40, 25], [1, 2, 4, 6]]  # crowd box left out
    assert target["labels"].tolist() == [2, 0] and target["labels"].dtype == torch.int64
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    _, clipped = dataset[2]
    assert clipped["boxes"].tolist() == [[50, 30, 60, 40]] and clipped["labels"].tolist() == [0]
    with pytest.raises(UserError, match="missing.png"):
        dataset[3]


def test_drop_images_without_boxes_keeps_only_images_with_a_box_to_learn(coco_dir: tuple[Path, Path]) -> None:
    """Detectron2's FILTER_EMPTY_ANNOTATIONS (the original's setting): b (no annotation) and missing.png (none)
    go; a (one real box besides the crowd one) and c (a box left after clipping) stay, with their own boxes."""
    image_dir, annotation_file = coco_dir
    with pytest.warns(UserWarning, match="degenerate"):
        every = CocoDetection(image_dir, annotation_file, transform=None)
        dropped = CocoDetection(image_dir, annotation_file, transform=None, drop_images_without_boxes=True)
    assert every.image_ids == [11, 12, 13, 14] and dropped.image_ids == [11, 13]
    assert dropped.image_sizes() == [(40, 60), (40, 60)]
    for index, image_id in enumerate(dropped.image_ids):
        want = every[every.image_ids.index(image_id)][1]
        got = dropped[index][1]
        assert got["image_id"] == image_id
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["labels"], want["labels"])


def test_coco_dataset_applies_transform(coco_dir: tuple[Path, Path]) -> None:
    image_dir, annotation_file = coco_dir
    with pytest.warns(UserWarning):
        dataset = CocoDetection(image_dir, annotation_file, transform=eval_transform(20, 1000))
    image, target = dataset[0]
    assert image.shape == (3, 20, 30) and target["scale"] == 0.5 and target["orig_size"] == (40, 60)
    assert target["boxes"].tolist() == [[15, 2.5, 20, 12.5], [0.5, 1, 2, 3]]


def test_coco_dataset_user_errors(coco_dir: tuple[Path, Path], tmp_path: Path) -> None:
    image_dir, _ = coco_dir
    with pytest.raises(UserError, match="nope.json"):
        CocoDetection(image_dir, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        CocoDetection(image_dir, bad)
    wrong_size = tmp_path / "wrong_size.json"
    wrong_size.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 41, "width": 60}],
                "annotations": [],
                "categories": [{"id": 1, "name": "x"}],
            }
        )
    )
    with pytest.raises(UserError, match="a.png"):
        CocoDetection(image_dir, wrong_size)[0]
    (image_dir / "broken.png").write_bytes(b"not an image")
    broken = tmp_path / "broken.json"
    broken.write_text(wrong_size.read_text().replace("a.png", "broken.png"))
    with pytest.raises(UserError, match="broken.png"):
        CocoDetection(image_dir, broken)[0]


# ---------------------------------------------------------------- shapes dataset

TINY = {"num_train": 4, "num_val": 2, "image_size": (96, 128), "object_size": (6, 48)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_generation_is_deterministic_and_cached(tmp_path: Path) -> None:
    first = ensure_shapes_dataset(tmp_path / "one", ShapesSpec(**TINY, seed=3))
    second = ensure_shapes_dataset(tmp_path / "two", ShapesSpec(**TINY, seed=3))
    other = ensure_shapes_dataset(tmp_path / "one", ShapesSpec(**TINY, seed=4))
    root, other_root = first.train_images.parent, other.train_images.parent  # one folder per spec
    assert root.name == second.train_images.parent.name != other_root.name
    files = _files(root)
    assert len(files) == 4 + 2 + 2
    assert files == _files(second.train_images.parent)  # byte-identical JSON and images
    assert first.train_annotations.read_bytes() != other.train_annotations.read_bytes()
    # A complete dataset is reused as is; no staging folders are left behind.
    stamp = first.train_annotations.stat().st_mtime_ns
    assert ensure_shapes_dataset(tmp_path / "one", ShapesSpec(**TINY, seed=3)) == first
    assert first.train_annotations.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted([root.name, other_root.name])


def test_shapes_dataset_is_valid_coco_with_many_small_objects(tmp_path: Path) -> None:
    paths = ensure_shapes_dataset(tmp_path, ShapesSpec(**TINY, seed=0))
    dataset = CocoDetection(paths.train_images, paths.train_annotations)
    assert dataset.category_names == list(SHAPE_CLASSES) and len(dataset) == 4
    boxes = []
    for image, target in (dataset[i] for i in range(len(dataset))):
        h, w = image.shape[-2:]
        assert 96 <= h <= 128 and 96 <= w <= 128
        b = target["boxes"]
        assert len(b) >= 1 and (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2:] - b[:, :2]) >= 3).all()
        boxes.append(b)
    boxes = torch.cat(boxes)
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (box_areas < 32**2).float().mean() > 0.5
    summary = dataset_summary(paths.train_annotations)
    assert summary["objects"] == len(boxes) and summary["small_fraction"] > 0.5
    anns = dataset.coco.dataset["annotations"]
    assert all(a["iscrowd"] == 0 and 0 < a["area"] <= a["bbox"][2] * a["bbox"][3] for a in anns)
    pixels = np.asarray(Image.open(paths.val_images / "000000.jpg"))
    assert pixels.std() > 5  # textured, not a flat background


def test_shapes_spec_validation() -> None:
    with pytest.raises(UserError, match="object_size"):
        ShapesSpec(image_size=(64, 64), object_size=(6, 80))
    assert ShapesSpec(image_size=[64, 64], object_size=[6, 30]).image_size == (64, 64)
