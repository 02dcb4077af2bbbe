"""Image + box transforms, the high -> low resolution step, and batching.

A sample is `(image, target)`: the image a PIL image or a uint8 CHW tensor, the target a dict with "boxes"
(Tensor[N, 4], absolute xyxy pixels of the original image), "labels" (Tensor[N] int64) and "image_id". The
transforms return a float CHW image in the model's input space (`normalise`), with the boxes moved along, plus the
two numbers evaluation needs to map detections back to the original image: "scale" and "orig_size".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Detectron2's defaults, which the original MSAD keeps: BGR order, 0-255 scale, std 1
DETECTRON2_PIXEL_MEAN = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD = (1.0, 1.0, 1.0)
INPUT_FORMATS = ("rgb_imagenet", "bgr_255")


def normalise(image: Tensor, input_format: str = "rgb_imagenet") -> Tensor:
    """A uint8 RGB CHW image in the model's input space.

    Args:
        image: uint8 [3, H, W], RGB.
        input_format: "rgb_imagenet" (RGB in 0-1, ImageNet mean and std: what the ImageNet weights were trained
            on) or "bgr_255" (BGR in 0-255 minus Detectron2's mean, std 1: what the original MSAD feeds).
    """
    if input_format == "rgb_imagenet":
        return F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    if input_format == "bgr_255":
        return F.normalize(image.flip(-3).to(torch.float32), DETECTRON2_PIXEL_MEAN, DETECTRON2_PIXEL_STD)
    raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")


def shortest_edge_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int, float]:
    """Output size of a resize whose short side becomes `short_side`, long side capped at `max_size`.

    Same rule as Detectron2's ResizeShortestEdge (so schedules like "short side 640..800, long side <= 1333"
    mean what they meant in the original), rounding each side to the nearest pixel.

    Args:
        height: original image height.
        width: original image width.
        short_side: wanted length of the shorter side.
        max_size: upper bound on the longer side; wins over `short_side` when they disagree.

    Returns:
        (new_height, new_width, scale) where `scale` is the exact (unrounded) factor applied to both sides; it
        differs from new/original by under half a pixel per side, which is what evaluation divides by.
    """
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5), scale


class DetectionTransform:
    """Resize (short side drawn from a list), optional horizontal flip, then float + ImageNet normalisation.

    Random choices use torch's global RNG, which DataLoader seeds per worker, so runs are reproducible under a
    fixed `torch.manual_seed` without threading a generator through.

    Args:
        short_sides: candidate short-side lengths; one is drawn uniformly per image (one value: deterministic).
        max_size: cap on the long side after resizing.
        flip_prob: probability of a horizontal flip (0 for evaluation).
    """

    def __init__(self, short_sides: Sequence[int], max_size: int, flip_prob: float = 0.0,
                 input_format: str = "rgb_imagenet") -> None:
        if not short_sides:
            raise ValueError("short_sides must name at least one size")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.short_sides = tuple(int(s) for s in short_sides)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.input_format = input_format

    def __call__(self, image: Image.Image | Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image = F.to_image(image)
        height, width = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(
            target["boxes"], format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
        )
        short_side = self.short_sides[0]
        if len(self.short_sides) > 1:  # only draw when there is a choice: evaluation leaves the RNG alone
            short_side = self.short_sides[int(torch.randint(len(self.short_sides), ()))]
        new_height, new_width, scale = shortest_edge_size(height, width, short_side, self.max_size)
        # Resize the uint8 image (antialiased bilinear) before converting to float: 4x less memory traffic.
        image = F.resize(image, [new_height, new_width], antialias=True)
        boxes = F.resize(boxes, [new_height, new_width])
        if self.flip_prob > 0.0 and float(torch.rand(())) < self.flip_prob:
            image = F.horizontal_flip(image)
            boxes = F.horizontal_flip(boxes)
        image = normalise(image, self.input_format)
        target = {
            **target,
            "boxes": boxes.as_subclass(Tensor).to(torch.float32),
            "scale": scale,
            "orig_size": (int(height), int(width)),
        }
        return image.as_subclass(Tensor), target


def train_transform(short_sides: Sequence[int], max_size: int, flip_prob: float = 0.5,
                    input_format: str = "rgb_imagenet") -> DetectionTransform:
    """Multi-scale training transform (the original samples the short side from 640..800 step 32, max 1333)."""
    return DetectionTransform(short_sides, max_size, flip_prob, input_format)


def eval_transform(short_side: int, max_size: int, input_format: str = "rgb_imagenet") -> DetectionTransform:
    """Deterministic evaluation transform: one short side, no flip."""
    return DetectionTransform((short_side,), max_size, flip_prob=0.0, input_format=input_format)


def to_low_resolution(images: Tensor, mode: str = "nearest") -> Tensor:
    """The low-resolution (L) input: the padded high-resolution batch at exactly half its height and width.

    Exactly half is what makes L's P(k) the spatial size of H's P(k + 1); an odd size cannot be halved exactly,
    so it is refused rather than silently floored.

    Args:
        images: [B, C, H, W] padded, normalised batch with even H and W (padding to a multiple of 256 ensures it).
        mode: "nearest" keeps every second pixel, as the original did (aliasing included); "antialias" is a
            bilinear, antialiased downscale, closer to what a low-resolution camera would deliver.
    """
    height, width = images.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"to_low_resolution needs even height and width, got {height}x{width}")
    if mode == "nearest":
        return nnf.interpolate(images, scale_factor=0.5, mode="nearest")
    if mode == "antialias":
        return nnf.interpolate(
            images, size=(height // 2, width // 2), mode="bilinear", antialias=True, align_corners=False
        )
    raise ValueError(f"unknown low-resolution mode {mode!r}; allowed: 'nearest', 'antialias'")


@dataclass
class Batch:
    """A padded image batch with its per-image sizes and targets.

    Attributes:
        images: [B, 3, Hp, Wp] float, zero-padded at the bottom/right (zero = the dataset mean after
            normalisation) to a multiple of the collate's size_divisibility.
        image_sizes: (h, w) of each image before padding; detections are clipped to these.
        targets: per image "boxes" (resized-image xyxy), "labels", "image_id", "scale", "orig_size".
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[dict[str, Any]]

    def to(self, device: torch.device | str) -> Batch:
        """Copy images and every tensor in the targets to `device` (non-blocking from pinned memory)."""
        targets = [
            {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
            for t in self.targets
        ]
        return Batch(self.images.to(device, non_blocking=True), list(self.image_sizes), targets)

    def pin_memory(self) -> Batch:
        """Let DataLoader(pin_memory=True) pin a custom batch type."""
        targets = [{k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in t.items()} for t in self.targets]
        return Batch(self.images.pin_memory(), self.image_sizes, targets)


def collate(samples: Sequence[tuple[Tensor, dict[str, Any]]], size_divisibility: int) -> Batch:
    """Stack transformed samples into one zero-padded batch.

    Args:
        samples: (image [3, h, w] float, target) pairs from a dataset with a DetectionTransform.
        size_divisibility: pad H and W up to a multiple of this (MSAD: 256, so that H/2 stays aligned with the
            strides up to 128); 0 or 1 pads only to the largest image.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    images = [image for image, _ in samples]
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    step = max(int(size_divisibility), 1)
    padded_h = -(-max(h for h, _ in sizes) // step) * step
    padded_w = -(-max(w for _, w in sizes) // step) * step
    batch = images[0].new_zeros((len(images), images[0].shape[0], padded_h, padded_w))
    for slot, image in zip(batch, images, strict=True):
        slot[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return Batch(batch, sizes, [target for _, target in samples])


class Collate:
    """Picklable `collate` with a fixed size_divisibility, for DataLoader(collate_fn=...) with worker processes.

    Args:
        size_divisibility: see `collate`.
    """

    def __init__(self, size_divisibility: int) -> None:
        self.size_divisibility = int(size_divisibility)

    def __call__(self, samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
        return collate(samples, self.size_divisibility)
