"""COCO box evaluation: detections -> COCO results -> COCOeval metrics.

Workers turn their detections into plain-Python result dicts (`to_coco_results`), which are cheap to gather across
processes; one process then scores them (`coco_evaluate`). The scoring is faster-coco-eval's COCOeval (pycocotools'
algorithm in C++: the same 12 numbers, 8.9 s instead of 55.9 s for 5,000 images x 100 detections, benchmarks/
RESULTS.md "COCO scale on the data side"), except when bootstrap intervals are asked for: `msad.engine.bootstrap`
re-accumulates pycocotools' per-image matches (`evalImgs`), which faster-coco-eval keeps in C++ objects that Python
cannot read.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from msad import storage
from msad.engine.bootstrap import BOOTSTRAP_METRICS, SEED, Replicates, bootstrap, image_set_digest

# COCOeval.stats indices of the box metrics reported (AP over IoU 0.5:0.95, at 0.5, at 0.75, by object area).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(
    detections: list[dict[str, Any]], targets: list[dict[str, Any]], contiguous_to_category_id: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO "results" entries for a batch of detections, in the original images' coordinates.

    Args:
        detections: per image "boxes" [K, 4] xyxy in resized-image pixels, "scores" [K], "labels" [K] contiguous.
        targets: the matching targets; their "scale" (resized / original), "orig_size" (h, w) and "image_id"
            map the boxes back to the image the annotations describe.
        contiguous_to_category_id: the dataset's label -> COCO category id table.

    Returns:
        Dicts with "image_id", "category_id", "bbox" (xywh) and "score", all plain Python numbers.
    """
    category_ids = torch.as_tensor(list(contiguous_to_category_id), dtype=torch.int64)
    results: list[dict[str, Any]] = []
    for detection, target in zip(detections, targets, strict=True):
        height, width = target["orig_size"]
        boxes = detection["boxes"].detach().to("cpu", torch.float64) / float(target["scale"])
        # Detections were clipped to the resized image; the unrounded scale can overshoot the original by a hair.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        boxes[:, 2:] -= boxes[:, :2]
        categories = category_ids[detection["labels"].detach().cpu()].tolist()
        image_id = int(target["image_id"])
        results.extend(
            {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            for box, score, category in zip(
                boxes.tolist(), detection["scores"].detach().cpu().tolist(), categories, strict=True
            )
        )
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
    output_json: Path | None = None,
    verbose: bool = False,
    bootstrap_samples: int = 0,
    bootstrap_json: Path | None = None,
) -> dict[str, float]:
    """Box AP of `results` against `coco_gt`: faster-coco-eval's COCOeval, or pycocotools' when bootstrapping.

    Args:
        coco_gt: ground truth (CocoDetection.coco).
        results: COCO results dicts, e.g. gathered `to_coco_results` output of all workers.
        image_ids: evaluate only these images (when a subset of the split was run); None = every image in coco_gt.
            Images without any result still count: their ground truth is missed.
        output_json: if given, the results are written there (pycocotools' results format).
        verbose: print the evaluator's own progress and summary table.
        bootstrap_samples: resamples of the images for 95 % intervals of AP, AP50 and APs (`msad.engine.bootstrap`);
            0 = none.
        bootstrap_json: if given (and bootstrap_samples > 0), the per-resample values are written there, for
            paired comparisons with other models scored on the same images.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions in [0, 1], plus "<metric>_lo" / "<metric>_hi" for
        the bootstrapped ones (NaN when a resample set leaves the metric mostly undefined). All 0.0 for empty
        results (nothing detected; intervals [0, 0]). A metric whose area range has no ground truth at all
        (pycocotools' -1) is NaN: undefined, not zero.
    """
    if output_json is not None:
        _write_json_atomically(Path(output_json), results)
    if not results:  # pycocotools' loadRes cannot index an empty list
        metrics = dict.fromkeys(METRIC_NAMES, 0.0)
        if bootstrap_samples > 0:
            ids = sorted(image_ids if image_ids is not None else coco_gt.getImgIds())
            empty = Replicates(SEED, image_set_digest(ids), len(ids),
                               {name: [0.0] * bootstrap_samples for name in BOOTSTRAP_METRICS},
                               dict.fromkeys(BOOTSTRAP_METRICS, 0.0))
            metrics.update(_interval_metrics(empty))
            if bootstrap_json is not None:
                _write_json_atomically(Path(bootstrap_json), empty.to_dict())
        return metrics
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # copies: loadRes adds keys to the dicts it gets
        if bootstrap_samples > 0:  # the bootstrap reads the per-image matches that only pycocotools exposes
            evaluator: COCOeval | COCOeval_faster = COCOeval(coco_gt, coco_dt, iouType="bbox")
        else:
            evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox",
                                        print_function=print if verbose else lambda *_: None)  # default: logging
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(v) if v >= 0 else math.nan for name, v in zip(METRIC_NAMES, evaluator.stats, strict=False)}
    if bootstrap_samples > 0:
        replicates = bootstrap(evaluator, bootstrap_samples)
        metrics.update(_interval_metrics(replicates))
        if bootstrap_json is not None:
            _write_json_atomically(Path(bootstrap_json), replicates.to_dict())
    return metrics


def _interval_metrics(replicates: Replicates) -> dict[str, float]:
    out = {}
    for name in BOOTSTRAP_METRICS:
        low, high = replicates.interval(name) or (math.nan, math.nan)
        out[f"{name}_lo"], out[f"{name}_hi"] = low, high
    return out


def _write_json_atomically(path: Path, payload: Any) -> None:
    storage.write_bytes(str(path), json.dumps(payload).encode())  # temp file + rename
