"""COCO scale on the data side: a worker's training dataset from a COCO-2017-train-sized annotation file, per-sample
loading at the paper's image sizes, and COCO evaluation at val2017 scale.

1. Annotation files shaped like COCO-2017 train (118,287 images, 860,001 boxes with polygons, about 394 MB of JSON
   at 1x), generated at each `--scales` factor. For each, fresh processes (one per row, as a Ray worker starts)
   time getting the training dataset ready -- `CocoDetection(..., drop_images_without_boxes=True)` and the
   `landscape()` list the sampler reads -- and record the peak RSS over what the process held after its imports
   (torch, torchvision, PIL): with no cache (the first worker, which parses and writes it), with the cache (every
   later worker and restart), parsing in memory without a cache, the work of the constructor before the cache
   (json.load + pycocotools index + arrays) and a plain json.load. "fork" is the private memory that a forked
   DataLoader process ends up with after a full garbage collection (which visits every Python object the parent
   holds, so their pages get copied) and reading every target array, over what a fork before the dataset existed
   ends up with.
2. Loading throughput on one core (`torch.set_num_threads(1)`, the process pinned to one CPU): `--images` JPEGs
   at COCO's sizes (long side 640), read through `CocoDetection` with the paper's training transform (short side
   drawn from 640..800, long side <= 1333, flip 0.5, normalisation), after a warm-up; plus its parts.
3. Evaluation of `--eval-images` images with 100 detections each (benchmarks/bootstrap_cost.py's synthetic set,
   80 classes): pycocotools' COCOeval, faster-coco-eval's, `coco_evaluate` as training calls it (no bootstrap:
   faster-coco-eval) and, with `--eval-bootstrap N`, with N bootstrap resamples (pycocotools + msad.engine.bootstrap),
   and whether the two evaluators' 12 numbers are the same.

Generated files go to `--out` (under /tmp by default) and are reused by later runs.

    python benchmarks/data_scale.py --out /tmp/msad_data_scale --eval-bootstrap 100
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
COCO_TRAIN = (118_287, 860_001)  # images, boxes of COCO-2017 train
GOAL_READY_S, GOAL_READY_MB, GOAL_IMAGES_PER_S = 1.0, 200.0, 4.0
PAPER_SHORT_SIDES, PAPER_MAX_SIZE = (640, 672, 704, 736, 768, 800), 1333


# ---------------------------------------------------------------- generated data


def generate_annotations(path: Path, scale: float, seed: int = 0) -> Path:
    """A COCO-train-shaped instances file at `scale` x its images and boxes (streamed, about 394 MB at 1x)."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    num_images, num_boxes = (max(1, round(n * scale)) for n in COCO_TRAIN)
    ids = rng.choice(600_000, size=num_images, replace=False) + 1
    short = rng.integers(360, 641, num_images)
    landscape = rng.random(num_images) < 0.75
    heights, widths = np.where(landscape, short, 640), np.where(landscape, 640, short)
    owner = np.sort(rng.integers(0, num_images, num_boxes))
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w") as f:
        f.write('{"info": {"description": "msad benchmark: COCO-2017-train-shaped"}, "licenses": [], "images": [')
        for i in range(num_images):
            name = f"{ids[i]:012d}.jpg"
            f.write(("," if i else "") + json.dumps({
                "license": int(rng.integers(1, 9)), "file_name": name,
                "coco_url": f"http://images.cocodataset.org/train2017/{name}", "height": int(heights[i]),
                "width": int(widths[i]), "date_captured": "2013-11-14 11:18:45",
                "flickr_url": f"http://farm4.staticflickr.com/{ids[i] % 9000}/{ids[i]}_0123456789_z.jpg",
                "id": int(ids[i])}))
        f.write('], "annotations": [')
        chunk = 20_000
        for start in range(0, num_boxes, chunk):
            stop = min(start + chunk, num_boxes)
            n = stop - start
            h, w = heights[owner[start:stop]], widths[owner[start:stop]]
            bw = np.minimum(np.exp(rng.uniform(np.log(4), np.log(600), n)), w - 1)
            bh = np.minimum(bw * np.exp(rng.normal(0, 0.5, n)), h - 1)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            crowd = rng.random(n) < 0.01
            labels = rng.integers(1, 91, n)
            parts = []
            for k in range(n):
                points = int(rng.integers(6, 30))  # 394 MB at 1x, as the issue's file
                angle = np.linspace(0, 2 * np.pi, points, endpoint=False)
                polygon = np.stack([x[k] + bw[k] / 2 * (1 + np.cos(angle)), y[k] + bh[k] / 2 * (1 + np.sin(angle))],
                                   axis=1).round(2).ravel().tolist()
                parts.append(json.dumps({
                    "segmentation": [polygon], "area": round(float(bw[k] * bh[k] * 0.78), 2),
                    "iscrowd": int(crowd[k]), "image_id": int(ids[owner[start + k]]),
                    "bbox": [round(float(v), 2) for v in (x[k], y[k], bw[k], bh[k])],
                    "category_id": int(labels[k]), "id": start + k + 1}))
            f.write(("," if start else "") + ",".join(parts))
        f.write('], "categories": ' + json.dumps([{"supercategory": "thing", "id": c, "name": f"class{c}"}
                                                  for c in range(1, 91)]) + "}")
    os.replace(tmp, path)
    return path


def generate_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs (quality 90) at COCO's sizes (long side 640) with gradients, shapes and noise, and their
    instances file; returns the instances file."""
    from PIL import Image, ImageDraw

    annotation_file = folder / "instances.json"
    if annotation_file.is_file():
        return annotation_file
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(count):
        short = int(rng.integers(360, 641))
        height, width = (short, 640) if rng.random() < 0.75 else (640, short)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * (xx[..., None] / width) \
            + rng.uniform(-60, 60, 3) * (yy[..., None] / height)
        coarse = rng.normal(0, 25, (height // 16 + 1, width // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)
        pixels = base + coarse[:height, :width] + rng.normal(0, 18, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(4, 12))):
            w, h = (float(v) for v in np.exp(rng.uniform(np.log(8), np.log(300), 2)))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 81)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        image.save(folder / f"{i:06d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": height, "width": width})
    annotation_file.write_text(json.dumps({"images": images, "annotations": anns,
                                           "categories": [{"id": c, "name": str(c)} for c in range(1, 81)]}))
    return annotation_file


# ---------------------------------------------------------------- one worker's dataset (run in a fresh process)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _private_mb() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return (int(fields["Private_Dirty"].split()[0]) + int(fields["Private_Clean"].split()[0])) / 1024


def _forked_private_mb(arrays: list[np.ndarray]) -> float:
    """Private MB of a forked child after gc.collect() and reading `arrays` (what a DataLoader process does)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        before = _private_mb()
        gc.collect()
        for array in arrays:
            float(np.asarray(array, dtype=np.float64).sum())
        os.write(write, f"{_private_mb() - before:.1f}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        value = float(f.read())
    os.waitpid(pid, 0)
    return value


def worker(mode: str, annotation_file: Path, cache_dir: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process: seconds and peak RSS over the post-import baseline."""
    import torch  # noqa: F401  (every mode pays the same imports, as a training worker does)
    from pycocotools.coco import COCO

    from msad.data import coco_cache
    from msad.data.coco import CocoDetection

    gc.collect()
    baseline = _max_rss_mb()
    fork_baseline = _forked_private_mb([])  # what any fork of a process with these imports copies
    start = time.perf_counter()
    keep: Any
    if mode in ("first", "cached", "memory"):
        if mode == "first":
            shutil.rmtree(cache_dir, ignore_errors=True)
        dataset = CocoDetection(annotation_file.parent, annotation_file, drop_images_without_boxes=True,
                                cache_dir=None if mode == "memory" else cache_dir)
        landscape = dataset.landscape()
        keep = (dataset, landscape)
        arrays = [getattr(dataset._arrays, name) for name in ("boxes", "labels", "crowd", "box_offsets", "sizes")]
        extra = {"images": len(dataset), "parsed": dataset._arrays.parsed}
    elif mode == "before":  # what CocoDetection.__init__ did before the cache: json.load, pycocotools index, arrays
        with annotation_file.open("rb") as f:
            data = json.load(f)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        image_ids = np.array([im["id"] for im in data["images"]], dtype=np.int64)
        sizes = np.array([(im["height"], im["width"]) for im in data["images"]], dtype=np.int32)
        categories = sorted(int(c["id"]) for c in data["categories"])
        index = coco_cache._index_annotations(data["annotations"], image_ids, sizes,
                                              {c: i for i, c in enumerate(categories)}, annotation_file)
        keep = (coco, index, (sizes[:, 1] > sizes[:, 0]).tolist())
        arrays = [index[0], index[1], index[2], index[3], sizes]
        extra = {"images": len(image_ids)}
    elif mode == "json":
        with annotation_file.open("rb") as f:
            keep = json.load(f)
        arrays, extra = [], {}
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - start
    peak = _max_rss_mb()
    fork = _forked_private_mb(arrays) - fork_baseline if mode != "json" else float("nan")
    del keep
    return {"mode": mode, "seconds": seconds, "peak_mb": peak - baseline, "baseline_mb": baseline,
            "fork_private_mb": fork, **extra}


def run_worker(mode: str, annotation_file: Path, cache_dir: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, str(annotation_file), str(cache_dir)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- loading throughput


def loading_throughput(annotation_file: Path, passes: int) -> dict[str, float]:
    """images/s through CocoDetection + the paper's training transform on one core, and its parts' ms/image."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from msad.data.coco import CocoDetection
    from msad.data.transforms import normalise, shortest_edge_size, train_transform

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = CocoDetection(annotation_file.parent, annotation_file,
                            transform=train_transform(PAPER_SHORT_SIDES, PAPER_MAX_SIZE, 0.5))
    for i in range(min(4, len(dataset))):
        dataset[i]  # warm-up: first calls allocate
    start = time.perf_counter()
    pixels = 0
    for _ in range(passes):
        for i in range(len(dataset)):
            image, _ = dataset[i]
            pixels += image.shape[-1] * image.shape[-2]
    per_image = (time.perf_counter() - start) / (passes * len(dataset))
    parts = {"decode": [], "resize": [], "flip": [], "normalise": []}
    for i in range(len(dataset)):
        path = dataset.image_dir / dataset._arrays.file_name(i)
        t0 = time.perf_counter()
        with Image.open(path) as pil_image:
            image = F.pil_to_tensor(pil_image.convert("RGB"))
        t1 = time.perf_counter()
        h, w, _ = shortest_edge_size(*image.shape[-2:], PAPER_SHORT_SIDES[i % len(PAPER_SHORT_SIDES)], PAPER_MAX_SIZE)
        image = F.resize(image, [h, w], antialias=True)
        t2 = time.perf_counter()
        image = F.horizontal_flip(image)
        t3 = time.perf_counter()
        normalise(image)
        t4 = time.perf_counter()
        for name, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[name].append(value)
    sizes = [p.stat().st_size for p in annotation_file.parent.glob("*.jpg")]
    return {"images_per_s": 1 / per_image, "ms_per_image": 1000 * per_image,
            "mean_output_mpix": pixels / (passes * len(dataset)) / 1e6, "mean_jpeg_kb": statistics.mean(sizes) / 1024,
            **{f"{name}_ms": 1000 * statistics.median(v) for name, v in parts.items()}}


# ---------------------------------------------------------------- evaluation


def evaluation(images: int, bootstrap_samples: int) -> dict[str, Any]:
    from bootstrap_cost import synthetic
    from faster_coco_eval import COCOeval_faster
    from pycocotools.cocoeval import COCOeval

    from msad.engine.evaluate import coco_evaluate

    gt, results = synthetic(images, 80, 7, 100, 0)
    out: dict[str, Any] = {"images": images, "detections": len(results)}
    stats = {}
    for name, evaluator_type in (("pycocotools", COCOeval), ("faster-coco-eval", COCOeval_faster)):
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            evaluator = evaluator_type(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            out[f"{name}_s"] = time.perf_counter() - start
        stats[name] = np.asarray(evaluator.stats[:12], dtype=np.float64)
    out["max_abs_diff"] = float(np.abs(stats["pycocotools"] - stats["faster-coco-eval"]).max())
    out["identical"] = bool(np.array_equal(stats["pycocotools"], stats["faster-coco-eval"]))
    out["AP"] = float(stats["pycocotools"][0])
    start = time.perf_counter()
    coco_evaluate(gt, results)
    out["coco_evaluate_s"] = time.perf_counter() - start
    if bootstrap_samples:
        start = time.perf_counter()
        coco_evaluate(gt, results, bootstrap_samples=bootstrap_samples)
        out["coco_evaluate_bootstrap_s"] = time.perf_counter() - start
        out["bootstrap_samples"] = bootstrap_samples
    return out


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/msad_data_scale"))
    parser.add_argument("--scales", type=float, nargs="+", default=[1 / 16, 1 / 4, 1.0])
    parser.add_argument("--modes", nargs="+", default=["first", "cached", "memory", "before", "json"])
    parser.add_argument("--images", type=int, default=48, help="JPEGs for the loading throughput")
    parser.add_argument("--passes", type=int, default=2, help="timed passes over them")
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--eval-bootstrap", type=int, default=0, help="also time coco_evaluate with N resamples")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ready", "loading", "eval"])
    args = parser.parse_args()
    if args.worker:
        mode, annotation_file, cache_dir = args.worker
        print(json.dumps(worker(mode, Path(annotation_file), Path(cache_dir))))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"ready": [], "loading": None, "eval": None}
    if "ready" not in args.skip:
        print("| scale | images | boxes | JSON MB | mode | seconds | peak RSS MB over imports | fork: private MB |")
        print("|---|---:|---:|---:|---|---:|---:|---:|")
        for scale in args.scales:
            start = time.perf_counter()
            annotation_file = generate_annotations(args.out / f"instances_x{scale:g}.json", scale)
            generated_s = time.perf_counter() - start
            size_mb = annotation_file.stat().st_size / 1e6
            images, boxes = (max(1, round(n * scale)) for n in COCO_TRAIN)
            for mode in args.modes:
                row = run_worker(mode, annotation_file, args.out / f"cache_x{scale:g}")
                row.update(scale=scale, json_mb=size_mb, boxes=boxes, total_images=images, generated_s=generated_s)
                report["ready"].append(row)
                print(f"| {scale:g} | {images:,} | {boxes:,} | {size_mb:.0f} | {mode} | {row['seconds']:.2f} | "
                      f"{row['peak_mb']:.0f} | {row['fork_private_mb']:.1f} |", flush=True)
        print(f"(baseline RSS after imports: {report['ready'][0]['baseline_mb']:.0f} MB)")
    if "loading" not in args.skip:
        annotation_file = generate_images(args.out / "images_paper", args.images)
        report["loading"] = r = loading_throughput(annotation_file, args.passes)
        print(f"loading, one core, paper sizes: {r['images_per_s']:.1f} images/s ({r['ms_per_image']:.1f} ms/image, "
              f"{r['mean_output_mpix']:.2f} Mpixel out, JPEG {r['mean_jpeg_kb']:.0f} kB); parts (median ms): decode "
              f"{r['decode_ms']:.1f}, resize {r['resize_ms']:.1f}, flip {r['flip_ms']:.1f}, normalise "
              f"{r['normalise_ms']:.1f}", flush=True)
    if "eval" not in args.skip:
        report["eval"] = e = evaluation(args.eval_images, args.eval_bootstrap)
        line = (f"evaluation, {e['images']:,} images, {e['detections']:,} detections: pycocotools "
                f"{e['pycocotools_s']:.1f} s, faster-coco-eval {e['faster-coco-eval_s']:.1f} s "
                f"({e['pycocotools_s'] / e['faster-coco-eval_s']:.1f}x), coco_evaluate {e['coco_evaluate_s']:.1f} s")
        if args.eval_bootstrap:
            line += f", coco_evaluate with {args.eval_bootstrap} resamples {e['coco_evaluate_bootstrap_s']:.1f} s"
        print(line + f"; 12 numbers identical: {e['identical']} (max |diff| {e['max_abs_diff']:.1e}), AP {e['AP']:.4f}")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    ready = {(r["scale"], r["mode"]): r for r in report["ready"]}
    if (1.0, "cached") in ready:
        r = ready[1.0, "cached"]
        met = r["seconds"] <= GOAL_READY_S and r["peak_mb"] <= GOAL_READY_MB
        print(f"goal, 1x cached: ready {r['seconds']:.2f} s (<= {GOAL_READY_S:g}), {r['peak_mb']:.0f} MB "
              f"(<= {GOAL_READY_MB:g}): {'met' if met else 'NOT met'}")
    if report["loading"]:
        rate = report["loading"]["images_per_s"]
        print(f"goal, loading >= {GOAL_IMAGES_PER_S:g} images/s per core: {rate:.1f}: "
              f"{'met' if rate >= GOAL_IMAGES_PER_S else 'NOT met'}")


if __name__ == "__main__":
    main()
