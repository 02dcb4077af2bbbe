"""COCO-format detection dataset (pycocotools index, PIL image decoding).

Annotations are turned into flat numpy arrays once, at construction; `__getitem__` then only decodes one image
and slices two arrays. Keeping per-sample state out of Python objects also keeps forked DataLoader workers from
copying the annotation index page by page (reference counts touch every object they read).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from msad.errors import UserError

Sample = tuple[Tensor, dict[str, Any]]


def _load_annotation_json(annotation_file: Path) -> dict[str, Any]:
    if not annotation_file.is_file():
        raise UserError(f"annotation file not found: {annotation_file}")
    try:
        with annotation_file.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotation file {annotation_file} is not valid JSON: {err}") from err
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise UserError(f"annotation file {annotation_file} lacks the COCO list(s) {missing}")
    if not data["categories"]:
        raise UserError(f"annotation file {annotation_file} has no categories")
    return data


class CocoDetection(Dataset[Sample]):
    """Images and boxes of a COCO-format instances file.

    Targets hold "boxes" (Tensor[N, 4] float32, xyxy pixels of the original image), "labels" (Tensor[N] int64,
    contiguous 0..C-1 in the order of the sorted category ids) and "image_id" (the COCO id, for evaluation).
    Crowd regions (iscrowd=1) are not targets. Boxes are clipped to the image; a box left with zero width or
    height is degenerate and dropped (one warning per dataset gives the count): it has no interior point for
    FCOS to assign, and its IoU with anything is 0. Images without boxes stay (they teach what is background),
    unless `drop_images_without_boxes` (Detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS, on in the original).

    Args:
        image_dir: folder that the images' "file_name" entries are relative to.
        annotation_file: COCO instances JSON.
        transform: called as transform(image, target) -> (image, target); the image it gets is a uint8
            [3, H, W] RGB tensor. None returns that tensor unchanged.
        drop_images_without_boxes: leave out images with no box to learn (none, or only crowd or degenerate ones).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transform: Callable[[Tensor, dict[str, Any]], Sample] | None = None,
        drop_images_without_boxes: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transform = transform
        data = _load_annotation_json(self.annotation_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()

        self.contiguous_to_category_id: list[int] = sorted(int(c["id"]) for c in data["categories"])
        self.category_id_to_contiguous: dict[int, int] = {
            cat_id: label for label, cat_id in enumerate(self.contiguous_to_category_id)
        }
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        self.category_names: list[str] = [names[cat_id] for cat_id in self.contiguous_to_category_id]

        images = data["images"]
        self.image_ids: list[int] = [int(im["id"]) for im in images]
        self._file_names = np.array([str(im["file_name"]) for im in images])
        self._sizes = np.array([(int(im["height"]), int(im["width"])) for im in images], dtype=np.int64)
        self._boxes, self._labels, self._offsets, self.num_degenerate_boxes = self._index_annotations(
            data["annotations"]
        )
        if drop_images_without_boxes:
            counts = np.diff(self._offsets)
            keep = counts > 0
            self.image_ids = [i for i, k in zip(self.image_ids, keep, strict=True) if k]
            self._file_names, self._sizes = self._file_names[keep], self._sizes[keep]
            self._offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)  # boxes stay in order
        if self.num_degenerate_boxes:
            warnings.warn(
                f"{self.annotation_file}: dropped {self.num_degenerate_boxes} degenerate boxes "
                "(zero width or height after clipping to the image)",
                stacklevel=2,
            )

    @property
    def num_classes(self) -> int:
        return len(self.contiguous_to_category_id)

    def _index_annotations(self, annotations: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Valid boxes of all images as flat arrays sorted by image, with offsets[i]:offsets[i + 1] per image."""
        num_images = len(self.image_ids)
        if not annotations:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(num_images + 1, np.int64), 0
        image_index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        try:
            owner = np.array([image_index[int(a["image_id"])] for a in annotations], dtype=np.int64)
            labels = np.array([self.category_id_to_contiguous[int(a["category_id"])] for a in annotations])
            xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        except KeyError as err:
            raise UserError(
                f"annotation file {self.annotation_file}: an annotation refers to unknown image/category id "
                f"or lacks a key ({err}); allowed ids are those in 'images' and 'categories'"
            ) from err
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations])

        heights, widths = self._sizes[owner, 0], self._sizes[owner, 1]
        x1 = np.clip(xywh[:, 0], 0, widths)
        y1 = np.clip(xywh[:, 1], 0, heights)
        x2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, widths)
        y2 = np.clip(xywh[:, 1] + xywh[:, 3], 0, heights)
        nonempty = (x2 > x1) & (y2 > y1)
        keep = ~crowd & nonempty
        num_degenerate = int((~crowd & ~nonempty).sum())

        order = np.argsort(owner[keep], kind="stable")  # stable: boxes keep their file order within an image
        boxes = np.stack([x1, y1, x2, y2], axis=1)[keep][order].astype(np.float32)
        offsets = np.zeros(num_images + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner[keep], minlength=num_images), out=offsets[1:])
        return boxes, labels[keep][order].astype(np.int64), offsets, num_degenerate

    def image_sizes(self) -> list[tuple[int, int]]:
        """Per image, (height, width) from the JSON (no decoding)."""
        return [(int(h), int(w)) for h, w in self._sizes]

    def landscape(self) -> list[bool]:
        """Per image, whether it is wider than tall (from the JSON, no decoding): samplers group batches by it."""
        return (self._sizes[:, 1] > self._sizes[:, 0]).tolist()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        path = self.image_dir / str(self._file_names[index])
        if not path.is_file():
            raise UserError(f"image file not found: {path} (listed in {self.annotation_file})")
        try:
            with Image.open(path) as pil_image:
                image = F.pil_to_tensor(pil_image.convert("RGB"))
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"cannot read image {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
        expected = (int(self._sizes[index, 0]), int(self._sizes[index, 1]))
        if tuple(image.shape[-2:]) != expected:
            raise UserError(
                f"image {path} is {image.shape[-2]}x{image.shape[-1]} (h x w) but {self.annotation_file} says "
                f"{expected[0]}x{expected[1]}; boxes would be misplaced"
            )
        start, stop = self._offsets[index], self._offsets[index + 1]
        target = {
            "boxes": torch.from_numpy(self._boxes[start:stop].copy()),
            "labels": torch.from_numpy(self._labels[start:stop].copy()),
            "image_id": self.image_ids[index],
        }
        if self.transform is not None:
            return self.transform(image, target)
        return image, target
