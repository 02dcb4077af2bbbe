"""COCO evaluation: exact AP values from pycocotools' 101-point interpolation, and the detection -> results mapping."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from msad.engine.evaluate import coco_evaluate, to_coco_results

# Single class (COCO id 5), two 60x80 images with two small (20x20) boxes each.
GT_BOXES = {1: [[0, 0, 20, 20], [30, 30, 20, 20]], 2: [[5, 5, 20, 20], [35, 40, 20, 20]]}


@pytest.fixture
def coco_gt() -> COCO:
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 60, "width": 80} for i in GT_BOXES],
        "annotations": [
            {"id": 10 * image_id + k, "image_id": image_id, "category_id": 5, "bbox": box, "area": 400, "iscrowd": 0}
            for image_id, boxes in GT_BOXES.items()
            for k, box in enumerate(boxes)
        ],
        "categories": [{"id": 5, "name": "thing"}],
    }
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _result(image_id: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": 5, "bbox": box, "score": score}


def test_perfect_detections_score_one(coco_gt: COCO) -> None:
    results = [_result(i, box, 0.9) for i, boxes in GT_BOXES.items() for box in boxes]
    metrics = coco_evaluate(coco_gt, results)
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["APs"] == 1.0
    assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])  # no medium/large ground truth at all
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}  # loadRes got copies, not these dicts


def test_half_detected_gives_51_of_101(coco_gt: COCO) -> None:
    # Recall reaches 0.5 at precision 1 and never more: 51 of COCO's 101 recall points (0, 0.01, ..., 0.5) score 1.
    results = [_result(1, box, 0.9) for box in GT_BOXES[1]]
    assert coco_evaluate(coco_gt, results)["AP"] == pytest.approx(51 / 101, abs=1e-12)


def test_false_positive_between_hits(coco_gt: COCO) -> None:
    # Ranked: hit, hit, miss (on background), hit -> precision 1, 1, 2/3, 3/4 at recall .25, .5, .5, .75.
    # Interpolated precision is 1 up to recall .5 (51 points) and 3/4 from .51 to .75 (25 points).
    results = [
        _result(1, GT_BOXES[1][0], 0.9),
        _result(1, GT_BOXES[1][1], 0.8),
        _result(2, [60, 0, 15, 15], 0.7),
        _result(2, GT_BOXES[2][0], 0.6),
    ]
    metrics = coco_evaluate(coco_gt, results)
    assert metrics["AP"] == pytest.approx((51 + 25 * 0.75) / 101, abs=1e-12)
    assert metrics["AP50"] == metrics["AP"]


def test_shifted_box_fails_strict_iou_thresholds(coco_gt: COCO) -> None:
    # Shifting a 20x20 box by 4 px gives IoU 16*20 / (2*400 - 320) = 2/3: a hit at IoU 0.50..0.65 only.
    results = [_result(i, box, 0.9) for i, boxes in GT_BOXES.items() for box in boxes]
    results = [{**r, "bbox": [r["bbox"][0] + 4, *r["bbox"][1:]]} for r in results]
    metrics = coco_evaluate(coco_gt, results)
    assert metrics["AP50"] == 1.0 and metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(4 / 10, abs=1e-12)  # 4 of the 10 IoU thresholds 0.50, 0.55, ..., 0.95


def test_empty_results_give_zeros_and_write_json(coco_gt: COCO, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "results.json"
    metrics = coco_evaluate(coco_gt, [], output_json=out)
    assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0}
    assert json.loads(out.read_text()) == []


def test_image_ids_restrict_evaluation(coco_gt: COCO, tmp_path: Path) -> None:
    results = [_result(1, box, 0.9) for box in GT_BOXES[1]]
    assert coco_evaluate(coco_gt, results, image_ids=[1])["AP"] == 1.0
    assert coco_evaluate(coco_gt, results, image_ids=[1, 2])["AP"] == pytest.approx(51 / 101, abs=1e-12)
    out = tmp_path / "results.json"
    coco_evaluate(coco_gt, results, output_json=out)
    assert json.loads(out.read_text()) == results


def test_to_coco_results_maps_back_to_original_image(coco_gt: COCO) -> None:
    detections = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [60.0, 60.0, 100.0, 100.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    targets = [
        {"image_id": 1, "scale": 2.0, "orig_size": (60, 80)},
        {"image_id": 2, "scale": 2.0, "orig_size": (60, 80)},
    ]
    results = to_coco_results(detections, targets, contiguous_to_category_id=[5, 8, 13])
    assert results == [
        {"image_id": 1, "category_id": 5, "bbox": [0.0, 0.0, 20.0, 20.0], "score": pytest.approx(0.9)},
        {"image_id": 1, "category_id": 13, "bbox": [30.0, 30.0, 20.0, 20.0], "score": pytest.approx(0.8)},
    ]
    assert all(type(v) in (int, float) for r in results for v in (r["image_id"], r["category_id"], r["score"]))
    assert all(type(v) is float for r in results for v in r["bbox"])
    overshoot = {
        "boxes": torch.tensor([[150.0, 100.0, 161.0, 121.0]]),
        "scores": torch.ones(1),
        "labels": torch.zeros(1).long(),
    }
    assert to_coco_results([overshoot], targets[:1], [5])[0]["bbox"] == [75.0, 50.0, 5.0, 10.0]  # clipped to 80x60


def test_results_round_trip_to_perfect_ap(coco_gt: COCO) -> None:
    # Ground truth seen through a 1.5x resize comes back exactly: the whole detection -> COCO path scores 1.0.
    detections, targets = [], []
    for image_id, boxes in GT_BOXES.items():
        xywh = torch.tensor(boxes, dtype=torch.float32)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1) * 1.5
        detections.append({"boxes": xyxy, "scores": torch.full((len(boxes),), 0.5), "labels": torch.zeros(2).long()})
        targets.append({"image_id": image_id, "scale": 1.5, "orig_size": (60, 80)})
    assert coco_evaluate(coco_gt, to_coco_results(detections, targets, [5]))["AP"] == 1.0


def test_validation_loss_is_the_detection_loss_on_the_val_images(tmp_path: Path, shapes_cache: Path) -> None:
    """train.eval_loss: over 5 validation images in batches of 2 (2, 2 and 1 images), val_loss is the model's loss
    on each batch in eval mode, averaged with weights 2, 2 and 1 -- here by hand, from batches this test collates
    itself. A plain mean of the three batch losses differs from that by more than 100x the tolerance (and a mean
    of per-image losses, each image alone, by more than 10x), so averaging by batch instead of by image fails. A
    student's excludes distillation, so it does not depend on the KD weight."""
    from conftest import make_tiny_config

    from msad.build import build_model, build_val_dataset, resolve_data_paths
    from msad.data.transforms import collate
    from msad.engine.in_process import LocalContext
    from msad.engine.loop import evaluate
    from msad.models.distiller import Distiller
    from msad.models.student import KDWarmup
    from msad.models.trainable import loss_terms

    several = ("train.batch_per_worker=2", "data.shapes.num_val=5", "train.eval_loss=true", "train.bootstrap_samples=0")
    cfg = make_tiny_config(tmp_path, shapes_cache, "fcos", "val-loss", *several)
    val_set = build_val_dataset(cfg, resolve_data_paths(cfg.data))
    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False)
    ctx = LocalContext(torch.device("cpu"))
    metrics = evaluate(model, val_set, cfg, ctx, with_loss=True)

    samples = [val_set[i] for i in range(len(val_set))]
    assert len(samples) == 5
    # every image pads to the same size (256 x 256), so evaluation batches them in index order, 2 at a time
    assert {collate([sample], cfg.data.size_divisibility).images.shape for sample in samples} == {(1, 3, 256, 256)}
    model.eval()
    batch_losses, batch_sizes, image_losses = [], [], []
    with torch.no_grad():
        for start in range(0, len(samples), 2):
            batch = collate(samples[start:start + 2], cfg.data.size_divisibility)
            batch_losses.append(sum(v.item() for v in loss_terms(model(batch.images, batch.targets)).values()))
            batch_sizes.append(batch.images.shape[0])
        for sample in samples:
            alone = collate([sample], cfg.data.size_divisibility)
            image_losses.append(sum(v.item() for v in loss_terms(model(alone.images, alone.targets)).values()))
    assert batch_sizes == [2, 2, 1]
    by_image = sum(n * loss for n, loss in zip(batch_sizes, batch_losses, strict=True)) / sum(batch_sizes)
    assert metrics["val_loss"] == pytest.approx(by_image, rel=1e-5)
    # the negative controls: averages val_loss must not be, each far outside rel=1e-5 of the right one
    by_batch = sum(batch_losses) / len(batch_losses)
    per_image = sum(image_losses) / len(image_losses)
    assert abs(by_batch / by_image - 1) > 1e-3 and abs(per_image / by_image - 1) > 1e-4
    assert metrics["val_loss"] != pytest.approx(by_batch, rel=1e-5)
    assert "val_loss" not in evaluate(model, val_set, cfg, ctx)  # only when asked

    student_cfg = make_tiny_config(tmp_path, shapes_cache, "student", "val-loss-s", *several,
                                   "train.teacher_checkpoint=t")
    teacher_cfg = make_tiny_config(tmp_path, shapes_cache, "teacher", "val-loss-t")
    student, teacher = build_model(student_cfg, load_pretrained=False), build_model(teacher_cfg).eval()
    losses = [evaluate(Distiller(student, teacher, KDWarmup(alpha, 0)), val_set, student_cfg, ctx,
                       with_loss=True)["val_loss"] for alpha in (0.0, 0.8)]
    assert losses[0] == losses[1] and math.isfinite(losses[0])
