"""FCOS head, target assignment, losses and decoding on small synthetic tensors."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.ops import box_iou, generalized_box_iou_loss

from msad.models.fcos import (
    BACKGROUND,
    SIZE_RANGES,
    STRIDES,
    FCOSHead,
    HeadOutputs,
    assign_targets,
    centerness_targets,
    fcos_detections,
    fcos_losses,
    giou_loss_plus_one,
    level_locations,
)

REPO = Path(__file__).resolve().parents[1]


def _sizes(image: int) -> list[tuple[int, int]]:
    return [(math.ceil(image / s), math.ceil(image / s)) for s in STRIDES]


def _locations(image: int) -> list[torch.Tensor]:
    return level_locations(_sizes(image), STRIDES, "cpu", torch.float32)


def _target(boxes: list[list[float]], labels: list[int] | None = None) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels if labels is not None else [0] * len(boxes), dtype=torch.int64)}


def _level_of(index: torch.Tensor, locations: list[torch.Tensor]) -> torch.Tensor:
    ends = torch.tensor([len(loc) for loc in locations]).cumsum(0)
    return torch.bucketize(index, ends, right=True)


def _positive_points(assigned, locations, image=0) -> set[tuple[float, float]]:
    points = torch.cat(locations)[assigned.positive[image]]
    return {tuple(p) for p in points.tolist()}


def test_level_locations_formula():
    locs = level_locations([(2, 3), (1, 1)], [8, 16], "cpu", torch.float32)
    assert torch.equal(locs[0], torch.tensor([[4.0, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]))
    assert torch.equal(locs[1], torch.tensor([[8.0, 8]]))
    odd = level_locations([(1, 2)], [3], "cpu", torch.float64)[0]
    assert odd.dtype == torch.float64 and odd.tolist() == [[1.0, 1.0], [4.0, 1.0]]


def test_head_layout_init_and_shapes():
    head = FCOSHead(in_channels=24, num_classes=3, num_convs=4, gn_groups=32)
    keys = set(head.state_dict())
    for tower in ("cls_tower", "bbox_tower"):
        assert {f"{tower}.{i}.weight" for i in (0, 3, 6, 9)} <= keys  # convs
        assert {f"{tower}.{i}.bias" for i in (1, 4, 7, 10)} <= keys  # GroupNorms
        assert head.get_submodule(f"{tower}.1").num_groups == 24  # largest divisor of 24 that is <= 32
    assert {"cls_logits.weight", "cls_logits.bias", "bbox_pred.weight", "ctrness.weight"} <= keys
    assert "bbox_pred.bias" not in keys and "ctrness.bias" not in keys
    assert sorted(k for k in keys if k.startswith("scales.")) == [f"scales.{i}.scale" for i in range(5)]
    assert head.scales[0].scale.shape == (1,) and head.scales[0].scale.item() == 1.0
    assert torch.allclose(head.cls_logits.bias, torch.full((3,), -math.log(99.0)))
    assert abs(head.cls_tower[0].weight.std().item() - 0.01) < 0.002
    assert FCOSHead(in_channels=64, num_classes=1, num_convs=1).cls_tower[1].num_groups == 32

    feats = [torch.randn(2, 24, s, s + 1) for s in (8, 4, 2, 1, 1)]
    out = head(feats)
    assert [t.shape for t in out.cls_logits] == [(2, 3, s, s + 1) for s in (8, 4, 2, 1, 1)]
    assert [t.shape for t in out.box_regression] == [(2, 4, s, s + 1) for s in (8, 4, 2, 1, 1)]
    assert [t.shape for t in out.centerness] == [(2, 1, s, s + 1) for s in (8, 4, 2, 1, 1)]
    assert all((t >= 0).all() for t in out.box_regression)
    with pytest.raises(ValueError, match="5 levels"):
        head(feats[:4])


def test_center_region_excludes_inside_points_far_from_centre():
    locations = _locations(128)
    assigned = assign_targets(locations, STRIDES, [_target([[40, 40, 100, 100]], [2])])
    # centre (70, 70), radius 12: stride-8 locations 60, 68, 76 on each axis; 52 is inside the box yet negative.
    expected = {(float(x), float(y)) for x in (60, 68, 76) for y in (60, 68, 76)}
    assert _positive_points(assigned, locations) == expected
    flat = torch.cat(locations)
    at = ((flat[:, 0] == 60) & (flat[:, 1] == 68)).nonzero().item()
    assert assigned.labels[0, at] == 2 and assigned.matched_index[0, at] == 0
    assert assigned.box_targets[0, at].tolist() == [20.0, 28.0, 40.0, 32.0]
    outside_centre = ((flat[:, 0] == 52) & (flat[:, 1] == 68)).nonzero().item()
    assert not assigned.positive[0, outside_centre] and assigned.labels[0, outside_centre] == BACKGROUND
    assert assigned.box_targets[0, outside_centre].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert (assigned.labels[0][~assigned.positive[0]] == BACKGROUND).all()


@pytest.mark.parametrize(("box", "level", "count"), [
    ([100, 100, 140, 140], 0, 4),  # 40 px: extents <= 64 -> P3 (stride 8)
    ([56, 56, 456, 456], 2, 4),  # 400 px: extents in (128, 256] near the centre -> stride 32
])
def test_size_range_picks_the_level(box, level, count):
    locations = _locations(512)
    assigned = assign_targets(locations, STRIDES, [_target([box])])
    index = assigned.positive[0].nonzero()[:, 0]
    assert len(index) == count
    assert set(_level_of(index, locations).tolist()) == {level}
    extent = assigned.box_targets[0, index].max(dim=1).values
    low, high = SIZE_RANGES[level]
    assert ((extent > low) & (extent <= high)).all()


def test_overlapping_boxes_go_to_the_smallest():
    locations = _locations(128)
    big, small = [20, 20, 100, 100], [40, 40, 80, 80]
    assigned = assign_targets(locations, STRIDES, [_target([big, small], [0, 1])])
    pos = assigned.positive[0]
    assert pos.sum() == 9
    assert (assigned.matched_index[0, pos] == 1).all() and (assigned.labels[0, pos] == 1).all()
    # swapping the order changes the index, not the winner
    swapped = assign_targets(locations, STRIDES, [_target([small, big], [1, 0])])
    assert torch.equal(swapped.positive, assigned.positive)
    assert (swapped.matched_index[0, pos] == 0).all() and (swapped.labels[0, pos] == 1).all()


def test_empty_images_and_mixed_batch_match_single_images():
    locations = _locations(256)
    num_locations = sum(len(loc) for loc in locations)
    empty = _target([])
    all_empty = assign_targets(locations, STRIDES, [empty, empty])
    assert all_empty.labels.shape == (2, num_locations) and all_empty.box_targets.shape == (2, num_locations, 4)
    assert not all_empty.positive.any() and (all_empty.labels == BACKGROUND).all()
    assert (all_empty.matched_index == BACKGROUND).all()

    first = _target([[10, 20, 90, 70], [100, 100, 250, 220], [30, 30, 60, 60]], [4, 1, 2])
    last = _target([[0, 0, 256, 256]], [3])
    batch = assign_targets(locations, STRIDES, [first, empty, last])
    for i, target in enumerate([first, empty, last]):
        alone = assign_targets(locations, STRIDES, [target])
        for field in ("labels", "box_targets", "matched_index", "positive"):
            assert torch.equal(getattr(batch, field)[i], getattr(alone, field)[0]), field
    assert batch.positive[0].any() and batch.positive[2].any() and not batch.positive[1].any()


def _assign_reference(points, strides_per_point, lows, highs, boxes, radius=1.5):
    """Per-location, per-box loops written straight from the FCOS rules."""
    labels = []
    for (x, y), stride, low, high in zip(points.tolist(), strides_per_point, lows, highs, strict=True):
        best, best_area = -1, math.inf
        for j, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            ltrb = (x - x0, y - y0, x1 - x, y1 - y)
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, radius * stride
            in_centre = max(cx - r, x0) < x < min(cx + r, x1) and max(cy - r, y0) < y < min(cy + r, y1)
            area = (x1 - x0) * (y1 - y0)
            if min(ltrb) > 0 and in_centre and low < max(ltrb) <= high and area < best_area:
                best, best_area = j, area
        labels.append(best)
    return torch.tensor(labels)


def test_assignment_matches_a_loop_reference():
    generator = torch.Generator().manual_seed(0)
    locations = _locations(320)
    points = torch.cat(locations)
    per_point = [(s, lo, hi) for loc, s, (lo, hi) in zip(locations, STRIDES, SIZE_RANGES, strict=True)
                 for _ in range(len(loc))]
    xy = torch.rand(12, 2, generator=generator) * 280
    wh = torch.rand(12, 2, generator=generator) * 300 + 4
    boxes = torch.cat((xy, (xy + wh).clamp(max=320)), dim=1)
    assigned = assign_targets(locations, STRIDES, [{"boxes": boxes, "labels": torch.arange(12)}])
    reference = _assign_reference(points, *zip(*per_point, strict=True), boxes)
    assert assigned.positive.sum() > 20
    assert torch.equal(assigned.matched_index[0], reference)


def _outputs_from_targets(sizes, assigned, num_classes: int) -> HeadOutputs:
    """Head outputs that predict the assigned boxes exactly (class logits zero)."""
    batch = assigned.positive.shape[0]
    stride = torch.cat([torch.full((h * w,), float(s)) for (h, w), s in zip(sizes, STRIDES, strict=True)])
    flat_boxes = assigned.box_targets / stride[None, :, None]
    flat_boxes = torch.where(assigned.positive[..., None], flat_boxes, torch.ones_like(flat_boxes))
    maps, start = [], 0
    for h, w in sizes:
        maps.append(flat_boxes[:, start:start + h * w].reshape(batch, h, w, 4).permute(0, 3, 1, 2))
        start += h * w
    return HeadOutputs([torch.zeros(batch, num_classes, h, w) for h, w in sizes], maps,
                       [torch.zeros(batch, 1, h, w) for h, w in sizes])


def test_losses_perfect_boxes_and_normalisation():
    sizes = _sizes(128)
    targets = [_target([[40, 40, 100, 100]], [1]), _target([[8, 16, 50, 60], [60, 20, 120, 120]], [0, 2])]
    assigned = assign_targets(level_locations(sizes, STRIDES, "cpu", torch.float32), STRIDES, targets)
    outputs = _outputs_from_targets(sizes, assigned, num_classes=3)
    losses = fcos_losses(outputs, targets, STRIDES)
    assert losses["loss_box"].abs() < 1e-5  # exact boxes -> GIoU loss 0, so the map/location order is right
    num_pos = assigned.positive.sum().item()
    # all logits 0: focal loss per element is alpha_t * 0.25 * log 2
    positives_term = num_pos * 0.25 * 0.25 * math.log(2)
    negatives_term = (assigned.positive.numel() * 3 - num_pos) * 0.75 * 0.25 * math.log(2)
    assert losses["loss_cls"].item() == pytest.approx((positives_term + negatives_term) / num_pos, rel=1e-5)
    ctr = centerness_targets(assigned.box_targets[assigned.positive])
    expected_ctr = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros_like(ctr), ctr, reduction="sum")
    assert losses["loss_ctr"].item() == pytest.approx(expected_ctr.item() / num_pos, rel=1e-5)


def test_centerness_targets():
    ctr = centerness_targets(torch.tensor([[1.0, 2.0, 1.0, 2.0], [1.0, 1.0, 3.0, 1.0]]))
    assert torch.allclose(ctr, torch.tensor([1.0, math.sqrt(1 / 3)]))


def _head_and_features(seed: int = 0, channels: int = 16, image: int = 128):
    torch.manual_seed(seed)
    head = FCOSHead(in_channels=channels, num_classes=2, num_convs=2, gn_groups=8)
    features = [torch.randn(2, channels, *size) for size in _sizes(image)]
    return head, features


@pytest.mark.parametrize("empty_batch", [True, False])
def test_losses_finite_with_empty_targets_and_reach_every_parameter(empty_batch):
    head, features = _head_and_features()
    targets = [_target([]), _target([])] if empty_batch else [_target([]), _target([[10, 10, 60, 50]], [1])]
    losses = fcos_losses(head(features), targets, STRIDES)
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
    assert all(torch.isfinite(v) for v in losses.values())
    if empty_batch:
        assert losses["loss_box"].item() == 0.0 and losses["loss_ctr"].item() == 0.0
    sum(losses.values()).backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def _distributed_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        head, features = _head_and_features(seed=1)
        # rank 0 has positives, rank 1 none: both must divide by the same batch-wide average.
        targets = [_target([[40, 40, 100, 100]], [1])] * 2 if rank == 0 else [_target([]), _target([])]
        losses = fcos_losses(head(features), targets, STRIDES)
        torch.save({k: v.detach() for k, v in losses.items()}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_normalisers_are_averaged_over_workers():
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "losses")
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "init"), result), nprocs=2)
        ranks = [torch.load(f"{result}.{r}", weights_only=True) for r in range(2)]
    head, features = _head_and_features(seed=1)
    local = fcos_losses(head(features), [_target([[40, 40, 100, 100]], [1])] * 2, STRIDES)
    # rank 0 alone normalises by its own totals; with a positive-free peer the averages are half of those.
    for key in ("loss_cls", "loss_box", "loss_ctr"):
        assert ranks[0][key].item() == pytest.approx(2 * local[key].item(), rel=1e-4), key
    assert ranks[1]["loss_box"].item() == 0.0 and ranks[1]["loss_ctr"].item() == 0.0
    empty_alone = fcos_losses(head(features), [_target([]), _target([])], STRIDES)["loss_cls"]
    # rank 1 has no positives of its own but divides by the average (18 / 2 = 9 here) instead of 1
    assert ranks[1]["loss_cls"].item() == pytest.approx(empty_alone.item() / 9, rel=1e-4)


def test_overfits_one_box_and_detects_it():
    torch.manual_seed(0)
    channels, box = 16, torch.tensor([[30.0, 40.0, 90.0, 100.0]])
    head = FCOSHead(in_channels=channels, num_classes=2, num_convs=1, gn_groups=4)
    features = [torch.randn(1, channels, *size) for size in _sizes(128)]
    targets = [{"boxes": box, "labels": torch.tensor([1])}]
    locations = level_locations(_sizes(128), STRIDES, "cpu", torch.float32)
    assigned = assign_targets(locations, STRIDES, targets)
    ctr = centerness_targets(assigned.box_targets[assigned.positive])
    # BCE against soft centerness targets cannot go below their entropy: measure the excess over that floor.
    ctr_floor = torch.nn.functional.binary_cross_entropy(ctr, ctr, reduction="mean").item()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    history = []
    for _ in range(150):
        losses = fcos_losses(head(features), targets, STRIDES)
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    excess = [h["loss_cls"] + h["loss_box"] + h["loss_ctr"] - ctr_floor for h in (history[0], history[-1])]
    assert excess[1] < excess[0] / 5
    with torch.no_grad():
        detections = fcos_detections(head(features), STRIDES, [(128, 128)])
    assert len(detections) == 1 and len(detections[0]["boxes"]) >= 1
    assert detections[0]["labels"][0] == 1
    assert box_iou(detections[0]["boxes"][:1], box).item() > 0.7


def _random_outputs(batch: int, seed: int, num_classes: int = 3, image: int = 96) -> HeadOutputs:
    generator = torch.Generator().manual_seed(seed)
    sizes = _sizes(image)
    return HeadOutputs(
        [torch.randn(batch, num_classes, *s, generator=generator) * 2 - 2 for s in sizes],
        [torch.rand(batch, 4, *s, generator=generator) * 3 for s in sizes],
        [torch.randn(batch, 1, *s, generator=generator) for s in sizes],
    )


def _image(outputs: HeadOutputs, i: int) -> HeadOutputs:
    return HeadOutputs(*([t[i:i + 1] for t in maps] for maps in
                         (outputs.cls_logits, outputs.box_regression, outputs.centerness)))


def test_detections_are_batched_clipped_and_capped():
    outputs = _random_outputs(batch=2, seed=0)
    sizes = [(96, 80), (70, 96)]
    batched = fcos_detections(outputs, STRIDES, sizes, max_detections=40)
    for i in range(2):
        alone = fcos_detections(_image(outputs, i), STRIDES, [sizes[i]], max_detections=40)[0]
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(batched[i][key], alone[key]), key
        result, (h, w) = batched[i], sizes[i]
        # many overlapping candidates survive NMS: the cap binds (a few of the 40 have no area once clipped)
        assert 30 <= len(result["boxes"]) <= 40
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        assert (result["boxes"] >= 0).all() and (result["boxes"][:, [0, 2]] <= w).all()
        assert (result["boxes"][:, [1, 3]] <= h).all()
        assert result["labels"].dtype == torch.int64
    uncapped = fcos_detections(outputs, STRIDES, sizes, max_detections=10_000)
    assert all(len(d["boxes"]) > 40 for d in uncapped)
    assert torch.equal(uncapped[0]["boxes"][:len(batched[0]["boxes"])], batched[0]["boxes"])


def test_postprocessing_follows_the_original_order():
    """AdelaiDet's FCOSOutputs then Detectron2's detector_postprocess: NMS on unclipped boxes, the best
    max_detections with ties kept, then clip and drop empty boxes. (The golden test checks the same on the
    original's own outputs; this pins each of the three rules on boxes worked out by hand.)"""
    cls = torch.full((1, 1, 2, 2), -20.0)
    box = torch.zeros(1, 4, 2, 2)
    cls[0, 0, 0, 0], box[0, :, 0, 0] = 2.0, torch.tensor([10.0, 0.25, 0.5, 0.5])  # (4, 4): [-76, 2, 8, 8]
    cls[0, 0, 0, 1], box[0, :, 0, 1] = 2.0, torch.tensor([1.5, 0.25, 0.0, 0.5])  # (12, 4): [0, 2, 12, 8]
    cls[0, 0, 1, 0], box[0, :, 1, 0] = 1.0, torch.tensor([0.0, 0.5, 0.0, 0.5])  # (4, 12): zero width
    outputs = HeadOutputs([cls], [box], [torch.zeros(1, 1, 2, 2)])
    both = [[0.0, 2.0, 8.0, 8.0], [0.0, 2.0, 12.0, 8.0]]  # tied scores: in either order
    # unclipped IoU of the first two is 48 / 528: both kept (clipped first, 48 / 72 > 0.6 would drop one)
    (result,) = fcos_detections(outputs, [8], [(16, 16)])
    assert sorted(result["boxes"].tolist()) == both  # and the zero-width box is dropped
    (result,) = fcos_detections(outputs, [8], [(16, 16)], max_detections=1)
    assert sorted(result["boxes"].tolist()) == both  # tied at a cut of 1: both kept


def test_detection_decoding_and_score():
    cls = torch.full((1, 2, 2, 2), -20.0)
    cls[0, 1, 1, 0] = 2.0  # class 1 at row 1, col 0 -> location (4, 12) at stride 8
    box = torch.zeros(1, 4, 2, 2)
    box[0, :, 1, 0] = torch.tensor([0.25, 0.5, 1.0, 2.0])
    ctr = torch.zeros(1, 1, 2, 2)
    (result,) = fcos_detections(HeadOutputs([cls], [box], [ctr]), [8], [(16, 40)])
    assert result["labels"].tolist() == [1]
    assert torch.allclose(result["boxes"], torch.tensor([[2.0, 8.0, 12.0, 16.0]]))  # y1 = 28 clipped to 16
    assert torch.allclose(result["scores"], torch.tensor([math.sqrt(torch.sigmoid(torch.tensor(2.0)).item() * 0.5)]))


def test_detections_empty_when_nothing_passes_the_threshold():
    outputs = _random_outputs(batch=3, seed=1)
    outputs.cls_logits = [torch.full_like(t, -10.0) for t in outputs.cls_logits]
    detections = fcos_detections(outputs, STRIDES, [(96, 96)] * 3)
    assert len(detections) == 3
    for d in detections:
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,) and d["labels"].shape == (0,)
        assert d["labels"].dtype == torch.int64


def test_giou_plus_one_is_the_originals_smoothed_giou_worked_by_hand():
    """AdelaiDet's IOULoss("giou"): iou = (I + 1) / (U + 1), giou = iou - (C - U) / C, on ltrb in stride units."""
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.0, 0.0]])
    target = torch.tensor([[1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    # 1: a 2x2 box inside a 3x3 one: I 4, U 9, C 9: (4 + 1) / (9 + 1) = 0.5; exact 1 - 4/9
    # 2: touching at a corner: I 0, U 1.25, C 2.25: 1/2.25 - 1/2.25 = 0; exact 0 - 1/2.25
    torch.testing.assert_close(giou_loss_plus_one(pred, target), torch.tensor([0.5, 1.0]))
    sign = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    exact = generalized_box_iou_loss(pred * sign, target * sign, reduction="none")
    torch.testing.assert_close(exact, torch.tensor([1 - 4 / 9, 1 + 1 / 2.25]))


def test_giou_plus_one_switch_changes_only_the_box_loss():
    from msad.build import build_model
    from msad.config import load_config

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "cpu_base.yaml", ["train.role=fcos", "model.width_list=[0.25]"])
    exact = build_model(cfg).train()
    smoothed = build_model(load_config(REPO / "configs" / "cpu_base.yaml",
                                       ["train.role=fcos", "model.width_list=[0.25]", "train.giou_plus_one=true"]))
    smoothed.load_state_dict(exact.state_dict())
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 100.0, 116.0, 112.0]]),
                "labels": torch.tensor([1, 2])}] * 2
    a, b = exact(images, targets), smoothed.train()(images, targets)
    torch.testing.assert_close(a["loss_cls"], b["loss_cls"])
    torch.testing.assert_close(a["loss_ctr"], b["loss_ctr"])
    assert b["loss_box"] < a["loss_box"] - 1e-3  # (I + 1) / (U + 1) >= I / U: the smoothed loss is smaller
