"""COCO-format detection dataset: annotations as flat arrays (`msad.data.coco_cache`), PIL image decoding.

The annotations are parsed into flat numpy arrays once per annotation file and, with a cache folder, memory-mapped
from a cache file by every dataset built from that file afterwards; `__getitem__` then only decodes one image and
slices a few arrays. No Python object per image or box exists, so forked DataLoader workers share the pages
instead of copying them (reference counts touch every object they read). pycocotools' index, which only evaluation
needs, is built on first use of `.coco`: on the rank that evaluates, for the file it evaluates on.
"""

from __future__ import annotations

import contextlib
import io
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

from msad.data.coco_cache import load_annotations, read_annotation_json
from msad.errors import UserError

Sample = tuple[Tensor, dict[str, Any]]


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
        cache_dir: folder of annotation caches (`msad.data.coco_cache`; the runs use `default_cache_dir()`);
            None parses the file in memory and writes nothing.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transform: Callable[[Tensor, dict[str, Any]], Sample] | None = None,
        drop_images_without_boxes: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transform = transform
        self._arrays = load_annotations(self.annotation_file, cache_dir)
        self._coco: COCO | None = None

        self.contiguous_to_category_id: list[int] = list(self._arrays.category_ids)
        self.category_id_to_contiguous: dict[int, int] = {
            cat_id: label for label, cat_id in enumerate(self.contiguous_to_category_id)
        }
        self.category_names: list[str] = list(self._arrays.category_names)
        self.num_degenerate_boxes = self._arrays.num_degenerate
        # dataset index -> position in the arrays: every image, or those with a box to learn
        self._index = np.arange(len(self._arrays.image_ids), dtype=np.int64)
        if drop_images_without_boxes:
            targets_before = np.concatenate([[0], np.cumsum(~self._arrays.crowd, dtype=np.int64)])
            self._index = np.flatnonzero(np.diff(targets_before[self._arrays.box_offsets]) > 0)
        if self.num_degenerate_boxes:
            warnings.warn(
                f"{self.annotation_file}: dropped {self.num_degenerate_boxes} degenerate boxes "
                "(zero width or height after clipping to the image)",
                stacklevel=2,
            )

    @property
    def coco(self) -> COCO:
        """pycocotools' index of the annotation file, for evaluation; built on first use (for COCO train it would
        cost 14 s and 3.4 GB, which is why training never asks for it)."""
        if self._coco is None:
            data, digest = read_annotation_json(self.annotation_file)
            if digest != self._arrays.source_sha256:
                raise UserError(f"annotation file {self.annotation_file} changed since this dataset read it; "
                                "restart so that the images and the evaluation use the same annotations")
            coco = COCO()
            coco.dataset = data
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                coco.createIndex()
            self._coco = coco
        return self._coco

    @property
    def image_ids(self) -> list[int]:
        """The COCO image ids, in dataset order."""
        return self._arrays.image_ids[self._index].tolist()

    @property
    def num_classes(self) -> int:
        return len(self.contiguous_to_category_id)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_coco"] = None  # rebuilt where it is used, never shipped to processes that may not need it
        return state

    def image_sizes(self) -> list[tuple[int, int]]:
        """Per image, (height, width) from the JSON (no decoding)."""
        return [(int(h), int(w)) for h, w in self._arrays.sizes[self._index].tolist()]

    def landscape(self) -> list[bool]:
        """Per image, whether it is wider than tall (from the JSON, no decoding): samplers group batches by it."""
        sizes = self._arrays.sizes[self._index]
        return (sizes[:, 1] > sizes[:, 0]).tolist()

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Sample:
        arrays, position = self._arrays, int(self._index[index])
        path = self.image_dir / arrays.file_name(position)
        if not path.is_file():
            raise UserError(f"image file not found: {path} (listed in {self.annotation_file})")
        try:
            with Image.open(path) as pil_image:
                image = F.pil_to_tensor(pil_image.convert("RGB"))
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"cannot read image {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
        expected = (int(arrays.sizes[position, 0]), int(arrays.sizes[position, 1]))
        if tuple(image.shape[-2:]) != expected:
            raise UserError(
                f"image {path} is {image.shape[-2]}x{image.shape[-1]} (h x w) but {self.annotation_file} says "
                f"{expected[0]}x{expected[1]}; boxes would be misplaced"
            )
        start, stop = arrays.box_offsets[position], arrays.box_offsets[position + 1]
        learn = ~arrays.crowd[start:stop]  # boolean indexing copies out of the read-only mapped arrays
        target = {
            "boxes": torch.from_numpy(arrays.boxes[start:stop][learn]),
            "labels": torch.from_numpy(arrays.labels[start:stop][learn].astype(np.int64)),
            "image_id": int(arrays.image_ids[position]),
        }
        if self.transform is not None:
            return self.transform(image, target)
        return image, target
