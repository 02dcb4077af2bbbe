"""Built-in synthetic detection dataset, written to disk as real COCO (JPEG files + instances JSON).

It exists so that everything (training, distillation, evaluation, sweeps) runs offline in minutes on a CPU, through
exactly the code path COCO takes. It is built to make low resolution hurt the way it does on COCO: many small
objects (most under 32x32 pixels, COCO's "small") of six shape classes in varied colours on textured backgrounds
(gradients, stripes, noise), so halving the image leaves the smallest shapes a few pixels wide.

Generation is deterministic in the spec (same spec -> byte-identical JSON and identical JPEG bytes with the same
libraries), cached under a folder named by a hash of the spec, and atomic: it is written to a temporary folder
and renamed into place, so an interrupted or concurrent generation never leaves a half dataset under the real name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from msad import console
from msad.data.paths import DataPaths
from msad.errors import UserError

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "diamond")
# Bump whenever the drawing changes, so caches made by older code are not mistaken for the new dataset.
GENERATOR_VERSION = 1
# A new object may cover at most this fraction of an existing one's box (and vice versa): overlaps stay slight.
MAX_OVERLAP = 0.3
# Minimum L1 distance (summed over RGB) between an object's colour and the background under it.
MIN_CONTRAST = 120


@dataclass
class ShapesSpec:
    """What to generate; every field is part of the cache key.

    Args:
        num_train: training images.
        num_val: validation images.
        image_size: (min, max) side length; each image's height and width are drawn independently from this
            range, so aspect ratios vary and non-square paths are exercised. Equal values give square images.
        objects_per_image: (min, max) objects drawn per image (fewer if no free spot is found).
        object_size: (min, max) object side in pixels, drawn log-uniformly so that most objects are small.
        seed: seed of everything random.
        jpeg_quality: JPEG quality of the written images.
    """

    num_train: int = 512
    num_val: int = 128
    image_size: tuple[int, int] = (256, 384)
    objects_per_image: tuple[int, int] = (4, 16)
    object_size: tuple[int, int] = (6, 60)
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for name in ("image_size", "objects_per_image", "object_size"):
            value = tuple(int(v) for v in getattr(self, name))  # YAML gives lists
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise UserError(f"shapes.{name} must be two positive ints (min, max) with min <= max, got {value}")
            setattr(self, name, value)
        if self.num_train < 1 or self.num_val < 1:
            raise UserError(f"shapes.num_train and shapes.num_val must be >= 1, got {self.num_train}, {self.num_val}")
        if self.object_size[0] < 4 or self.object_size[1] > self.image_size[0]:
            raise UserError(
                f"shapes.object_size must lie within [4, min image side {self.image_size[0]}], got {self.object_size}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"shapes.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    @property
    def cache_name(self) -> str:
        """Folder name: a hash of the spec and the generator version."""
        key = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return f"shapes-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def shapes_layout(root: Path) -> DataPaths:
    """The files of a generated dataset under its folder `root`."""
    return DataPaths(train_images=root / "train", train_annotations=root / "annotations" / "instances_train.json",
                     val_images=root / "val", val_annotations=root / "annotations" / "instances_val.json")


def ensure_shapes_dataset(cache_dir: str | Path, spec: ShapesSpec) -> DataPaths:
    """Return the dataset for `spec` under `cache_dir`, generating it first if it is not there yet.

    Args:
        cache_dir: folder holding generated datasets, one subfolder per spec hash.
        spec: what to generate.
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / spec.cache_name
    paths = shapes_layout(root)
    if root.exists():
        if not paths.complete():
            raise UserError(f"shapes dataset {root} is incomplete (modified by hand?); delete it to regenerate")
        return paths
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.cache_name}.", suffix=".partial", dir=cache_dir))
    try:
        _write_dataset(shapes_layout(staging), spec)
        try:
            os.rename(staging, root)  # atomic; fails if another process renamed its (identical) copy first
        except OSError:
            if not paths.complete():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _write_dataset(paths: DataPaths, spec: ShapesSpec) -> None:
    paths.train_annotations.parent.mkdir(parents=True)
    progress = _Progress(f"msad: generating {spec.cache_name}", spec.num_train + spec.num_val)
    _write_split(spec, 0, spec.num_train, paths.train_images, paths.train_annotations, progress)
    _write_split(spec, 1, spec.num_val, paths.val_images, paths.val_annotations, progress)


def _write_split(
    spec: ShapesSpec, split_code: int, num_images: int, image_dir: Path, annotation_file: Path, progress: _Progress
) -> None:
    """Draw and save one split's images and write its instances JSON (ids from 1, as in COCO)."""
    image_dir.mkdir()
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([spec.seed, split_code, index])  # per image: independent of the order
        image, objects = _draw_image(rng, spec)
        file_name = f"{index:06d}.jpg"
        image.save(image_dir / file_name, format="JPEG", quality=spec.jpeg_quality)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": image.height, "width": image.width})
        annotations.extend(
            {"image_id": image_id, "category_id": label + 1, "bbox": bbox, "area": area, "iscrowd": 0}
            for label, bbox, area in objects
        )
        progress.step()
    for ann_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = ann_id
    coco = {
        "info": {"description": "msad synthetic shapes", "version": GENERATOR_VERSION, "spec": asdict(spec)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
    }
    annotation_file.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")))


def _draw_image(rng: np.random.Generator, spec: ShapesSpec) -> tuple[Image.Image, list[tuple[int, list[int], int]]]:
    """One image and its objects as (class index, COCO xywh tight box, pixel area)."""
    height, width = (int(v) for v in rng.integers(spec.image_size[0], spec.image_size[1] + 1, size=2))
    background = _background(rng, height, width)
    image = Image.fromarray(background)
    boxes = np.zeros((0, 4))
    objects = []
    for _ in range(int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        size = math.exp(rng.uniform(math.log(spec.object_size[0]), math.log(spec.object_size[1])))
        aspect = math.sqrt(math.exp(rng.uniform(math.log(0.75), math.log(1.33))))
        w = max(4, min(width, round(size * aspect)))
        h = max(4, min(height, round(size / aspect)))
        placed = _place(rng, boxes, w, h, height, width)
        if placed is None:
            continue
        x0, y0 = placed
        mask = _shape_mask(SHAPE_CLASSES[label], w, h)
        left, top, right, bottom = mask.getbbox()
        box = np.array([[x0 + left, y0 + top, x0 + right, y0 + bottom]], dtype=np.float64)
        boxes = np.concatenate([boxes, box])
        image.paste(_contrasting_colour(rng, background[y0 : y0 + h, x0 : x0 + w]), (x0, y0), mask)
        area = int(np.count_nonzero(np.asarray(mask)))
        objects.append((label, [x0 + left, y0 + top, right - left, bottom - top], area))
    return image, objects


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random texture: a linear colour gradient, optionally stripes at a random angle, plus pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(theta) + yy * math.sin(theta)
    t = ((along - along.min()) / max(float(np.ptp(along)), 1.0))[..., None]
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    pixels = start + t * (end - start)
    if rng.random() < 0.5:
        period = rng.uniform(6, 32)
        phi = rng.uniform(0, math.pi)
        stripes = (np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * (2 * math.pi / period)) > 0)[..., None]
        stripe_colour = rng.uniform(0, 255, size=3).astype(np.float32)
        pixels = np.where(stripes, pixels + rng.uniform(0.2, 0.5) * (stripe_colour - pixels), pixels)
    pixels += rng.uniform(3, 25) * rng.standard_normal((height, width, 3), dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _place(
    rng: np.random.Generator, boxes: np.ndarray, w: int, h: int, height: int, width: int, tries: int = 20
) -> tuple[int, int] | None:
    """A top-left corner where a w x h box overlaps no existing box by more than MAX_OVERLAP of either."""
    for _ in range(tries):
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if not len(boxes):
            return x0, y0
        inter_w = np.clip(np.minimum(boxes[:, 2], x0 + w) - np.maximum(boxes[:, 0], x0), 0, None)
        inter_h = np.clip(np.minimum(boxes[:, 3], y0 + h) - np.maximum(boxes[:, 1], y0), 0, None)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        if np.all(inter_w * inter_h <= MAX_OVERLAP * np.minimum(areas, w * h)):
            return x0, y0
    return None


def _shape_mask(kind: str, w: int, h: int) -> Image.Image:
    """Binary (0/255) mask of one shape filling a w x h canvas (its tight box is taken from the mask)."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    r, b = w - 1, h - 1
    if kind == "circle":
        draw.ellipse((0, 0, r, b), fill=255)
    elif kind == "square":
        draw.rectangle((0, 0, r, b), fill=255)
    elif kind == "triangle":
        draw.polygon([(r / 2, 0), (r, b), (0, b)], fill=255)
    elif kind == "ring":
        draw.ellipse((0, 0, r, b), outline=255, width=max(2, round(min(w, h) * 0.2)))
    elif kind == "cross":
        bar_w, bar_h = max(2, round(w * 0.3)), max(2, round(h * 0.3))
        draw.rectangle(((w - bar_w) // 2, 0, (w - bar_w) // 2 + bar_w - 1, b), fill=255)
        draw.rectangle((0, (h - bar_h) // 2, r, (h - bar_h) // 2 + bar_h - 1), fill=255)
    elif kind == "diamond":
        draw.polygon([(r / 2, 0), (r, b / 2), (r / 2, b), (0, b / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return mask


def _contrasting_colour(rng: np.random.Generator, region: np.ndarray, tries: int = 10) -> tuple[int, int, int]:
    """A random colour at least MIN_CONTRAST (L1 over RGB) from the mean of the background it is drawn on."""
    mean = region.reshape(-1, 3).mean(axis=0)
    colour = rng.integers(0, 256, size=3)
    for _ in range(tries):
        if np.abs(colour - mean).sum() >= MIN_CONTRAST:
            break
        colour = rng.integers(0, 256, size=3)
    return int(colour[0]), int(colour[1]), int(colour[2])


class _Progress:
    """Progress of the dataset's generation: redrawn in place on a terminal, else a line per quarter."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.reported = label, total, 0, 0

    def step(self) -> None:
        self.done += 1
        shown = console.current()
        if shown.tty:
            shown.status([f"{self.label}: {self.done}/{self.total}"] if self.done < self.total else [])
            if self.done == self.total:
                shown.event(f"{self.label}: {self.total} images")
        elif self.done * 4 // self.total > self.reported:
            self.reported = self.done * 4 // self.total
            shown.event(f"{self.label}: {self.done}/{self.total}")


def dataset_summary(annotation_file: str | Path) -> dict[str, Any]:
    """Counts a user may want to see: images, objects, and the share of COCO-small (< 32^2 px) objects."""
    data = json.loads(Path(annotation_file).read_text())
    areas = np.array([a["area"] for a in data["annotations"]], dtype=np.float64)
    return {
        "images": len(data["images"]),
        "objects": len(areas),
        "small_fraction": float((areas < 32**2).mean()) if len(areas) else 0.0,
    }
