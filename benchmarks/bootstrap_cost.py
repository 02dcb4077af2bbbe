"""Cost of the bootstrap intervals (msad.engine.bootstrap) beside pycocotools' own evaluation, at a given scale.

A synthetic COCO-shaped set (ground truth with `--objects` boxes per image over `--classes` classes; `--detections`
detections per image, jittered copies of the ground truth plus random boxes) is scored once by pycocotools
(evaluate + accumulate + summarize, what every evaluation pays today) and then bootstrapped with `--samples`
resamples; both times and their ratio are printed. COCO val2017 scale: `--images 5000 --classes 80 --objects 7
--detections 100`; the CPU datasets: `--images 64 --classes 6 --objects 10 --detections 100`.

    python benchmarks/bootstrap_cost.py --images 5000 --samples 500
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msad.engine.bootstrap import bootstrap  # noqa: E402


def synthetic(images: int, classes: int, objects: int, detections: int, seed: int) -> tuple[COCO, list[dict]]:
    rng = np.random.default_rng(seed)
    annotations, results = [], []
    for image_id in range(1, images + 1):
        count = rng.poisson(objects)
        wh = rng.uniform(4, 300, (count, 2))
        xy = rng.uniform(0, 340, (count, 2))
        labels = rng.integers(1, classes + 1, count)
        for box, label in zip(np.hstack((xy, wh)), labels, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})
        found = min(count, detections)
        jitter = rng.normal(0, 0.1, (found, 4)) * np.repeat(wh[:found], 2, axis=1)
        boxes = np.vstack((np.hstack((xy, wh))[:found] + jitter,
                           np.hstack((rng.uniform(0, 340, (detections - found, 2)),
                                      rng.uniform(4, 300, (detections - found, 2))))))
        labels = np.concatenate((labels[:found], rng.integers(1, classes + 1, detections - found)))
        scores = rng.random(detections)
        results += [{"image_id": image_id, "category_id": int(c), "bbox": b.tolist(), "score": float(s)}
                    for b, c, s in zip(boxes, labels, scores, strict=True)]
    image_list = [{"id": i, "height": 480, "width": 640, "file_name": f"{i}.jpg"} for i in range(1, images + 1)]
    dataset = {"images": image_list,
               "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in range(1, classes + 1)]}
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--objects", type=float, default=7.0, help="mean ground-truth boxes per image")
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--samples", type=int, default=500, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gt, results = synthetic(args.images, args.classes, args.objects, args.detections, args.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        cocoeval_s = time.perf_counter() - start
    start = time.perf_counter()
    replicates = bootstrap(evaluator, args.samples)
    bootstrap_s = time.perf_counter() - start
    interval = [round(100 * v, 1) for v in replicates.interval("AP")]
    print(f"{args.images} images, {args.classes} classes, {len(gt.dataset['annotations'])} boxes, {len(results)} "
          f"detections; AP {100 * evaluator.stats[0]:.1f}, 95% CI {interval}")
    print(f"| pycocotools evaluate+accumulate+summarize | {cocoeval_s:.2f} s |\n"
          f"| bootstrap, {args.samples} resamples | {bootstrap_s:.2f} s |\n"
          f"| ratio bootstrap / pycocotools | {bootstrap_s / cocoeval_s:.2f} |")


if __name__ == "__main__":
    main()
