"""FLOP counts behind the results table's "capacity" column, measured rather than assumed.

Capacity is backbone FLOPs relative to the width-1.0 backbone on an 800 x 1333 image: the teacher reads H
(800 x 1333) and L (400 x 667), the student L only. Counts come from ``torch.utils.flop_counter.FlopCounterMode``
on meta tensors (shapes only, no arithmetic, so a whole detector counts in well under a second); like that
counter, a FLOP is a multiply or an add (2 x MACs) and only convs and matmuls are counted (norms, activations and
pooling are not). The stem conv keeps 3 input channels at every width, so measured capacities sit slightly above
the paper's w^2 rule at small widths (width 0.25: 0.0625 by the rule, 0.068 counted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from msad.checkpoint import ROLES
from msad.models.detector import HIGH_LEVELS, LOW_LEVELS
from msad.models.fcos import FCOSHead
from msad.models.fpn import FeaturePyramid
from msad.models.slimmable import WIDTHS, SlimmableResNet50

HIGH_RESOLUTION: tuple[int, int] = (800, 1333)
LOW_RESOLUTION: tuple[int, int] = (math.ceil(HIGH_RESOLUTION[0] / 2), math.ceil(HIGH_RESOLUTION[1] / 2))
FPN_CHANNELS = 256
NUM_CLASSES = 80  # COCO

# The paper's capacity column: width -> (teacher "H & L", student "L").
PUBLISHED_CAPACITY: dict[float, tuple[float, float]] = {
    1.0: (1.25, 0.25),
    0.75: (0.70, 0.14),
    0.5: (0.31, 0.06),
    0.25: (0.08, 0.02),
}


@dataclass(frozen=True)
class CapacityRow:
    """One row of the capacity table.

    Args:
        width: backbone width multiplier.
        role: "teacher" or "student".
        resolution: inputs the role reads, "H & L" or "L" (the paper's wording).
        capacity: measured backbone FLOPs relative to width 1.0 at 800 x 1333.
        published_capacity: the paper's value, ``None`` for a width the paper does not list.
        detector_gflops: measured GFLOPs of the whole detector for the role's inputs (backbone, FPN, FCOS head).
    """

    width: float
    role: str
    resolution: str
    capacity: float
    published_capacity: float | None
    detector_gflops: float


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def _count_flops(run: Callable[[], object]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _image(size: tuple[int, int]) -> torch.Tensor:
    return torch.empty(1, 3, *size, device="meta")


@cache
def backbone_flops(width: float, height: int, width_px: int) -> int:
    """FLOPs (2 x MACs) of one SlimmableResNet50 forward at ``width`` on a ``height`` x ``width_px`` image.

    Args:
        width: backbone width multiplier; channels are int(c * width) whatever the width list, so a one-width
            model is built.
        height, width_px: image size in pixels.
    """
    with torch.device("meta"):
        backbone = SlimmableResNet50(width, width_list=(width,)).eval()
    return _count_flops(lambda: backbone(_image((height, width_px))))


@cache
def detector_flops(width: float, role: str, high: tuple[int, int] = HIGH_RESOLUTION) -> int:
    """FLOPs of the whole detector of ``role`` per image: H of size ``high`` (800 x 1333 by default), L half of it.

    The teacher runs backbone + FPN on H (P3..P7) and on L (P2..P6) and the head on H, L and the fused levels
    (fused maps have H's shapes; the fusion's two tiny linear layers per level are left out, ~0.1 MFLOP). The
    student runs backbone + FPN on L (P2..P6) and the head once; a plain FCOS the same on H (P3..P7).

    Args:
        width: backbone width multiplier (FPN and head stay at 256 channels, 80 classes).
        role: "teacher", "student" or "fcos".
        high: H image size (height, width); L is half of it, rounded up.
    """
    _check_role(role)
    low = (math.ceil(high[0] / 2), math.ceil(high[1] / 2))
    # (image size, pyramid levels, head applications) per backbone pass
    passes = {"teacher": [(low, LOW_LEVELS, 1), (high, HIGH_LEVELS, 2)], "student": [(low, LOW_LEVELS, 1)],
              "fcos": [(high, HIGH_LEVELS, 1)]}[role]
    with torch.device("meta"):
        backbone = SlimmableResNet50(width, width_list=(width,)).eval()
        fpn = FeaturePyramid(backbone.out_channels(), FPN_CHANNELS)
        head = FCOSHead(FPN_CHANNELS, NUM_CLASSES)

    def run() -> None:
        for size, levels, head_calls in passes:
            features = list(fpn(backbone(_image(size)), levels).values())
            for _ in range(head_calls):  # the teacher's fused branch: same shapes as H's levels
                head(features)

    return _count_flops(run)


def capacity_rows(widths: Sequence[float] = WIDTHS) -> list[CapacityRow]:
    """Teacher and student rows for each width, widest first (the paper's order).

    Args:
        widths: backbone widths to measure.
    """
    reference = backbone_flops(1.0, *HIGH_RESOLUTION)
    rows = []
    for width in sorted(widths, reverse=True):
        high = backbone_flops(width, *HIGH_RESOLUTION) / reference
        low = backbone_flops(width, *LOW_RESOLUTION) / reference
        published = PUBLISHED_CAPACITY.get(width)
        for role, resolution, capacity, index in (("teacher", "H & L", high + low, 0), ("student", "L", low, 1)):
            rows.append(
                CapacityRow(
                    width=width,
                    role=role,
                    resolution=resolution,
                    capacity=capacity,
                    published_capacity=None if published is None else published[index],
                    detector_gflops=detector_flops(width, role) / 1e9,
                )
            )
    return rows


def format_capacity_table(rows: Sequence[CapacityRow]) -> str:
    """An aligned text table: measured capacity beside the paper's, and whole-detector GFLOPs."""
    header = ("width", "role", "resolution", "capacity", "published", "detector GFLOPs")
    body = [
        (
            f"{r.width:.2f}",
            r.role,
            r.resolution,
            f"{r.capacity:.3f}x",
            "-" if r.published_capacity is None else f"{r.published_capacity:.2f}x",
            f"{r.detector_gflops:.1f}",
        )
        for r in rows
    ]
    sizes = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    # Numbers right-aligned, words left-aligned.
    align = (">", "<", "<", ">", ">", ">")
    return "\n".join(
        "  ".join(f"{cell:{a}{n}}" for cell, a, n in zip(line, align, sizes, strict=True)).rstrip()
        for line in (header, *body)
    )


def capacity_json(rows: Sequence[CapacityRow]) -> list[dict]:
    """The rows as plain dicts (for the sweep report and W&B)."""
    return [dataclasses.asdict(r) for r in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Capacity at a run's resolution (the sweep report's columns)
# ---------------------------------------------------------------------------------------------------------------------


def run_image_sizes(h_short_side: int, max_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(H, L) image sizes, (height, width), for a run: the 800 x 1333 box scaled to `h_short_side`, capped by
    `max_size`, and L = H / 2 rounded up (as `LOW_RESOLUTION`).

    Args:
        h_short_side: the run's H short side (`data.test_short_side`).
        max_size: the cap on H's long side (`data.max_size`).
    """
    long_side = h_short_side * HIGH_RESOLUTION[1] / HIGH_RESOLUTION[0]
    scale = min(1.0, max_size / long_side)
    high = (round(h_short_side * scale), round(long_side * scale))
    return high, (math.ceil(high[0] / 2), math.ceil(high[1] / 2))


def detector_gflops(width: float, role: str, high: tuple[int, int]) -> float:
    """GFLOPs of the whole detector of `role` for one H image of size `high` (and its half-size L): see
    `detector_flops` (FPN and head at the paper's 256 channels and 80 classes).

    Args:
        width: backbone width multiplier.
        role: "teacher", "student" or "fcos".
        high: H image size (height, width).
    """
    return detector_flops(width, role, tuple(high)) / 1e9


def backbone_capacity(role: str, width: float, h_short_side: int, max_size: int) -> float:
    """Backbone FLOPs of `role`'s inputs at the sizes `run_image_sizes` gives, relative to width 1.0 at 800 x 1333
    (the README's capacity); at (800, 1333) it equals `capacity_rows`' value.

    Args:
        role: "teacher" (H and L), "student" (L) or "fcos" (H).
        width: backbone width multiplier.
        h_short_side: the run's H short side.
        max_size: the cap on H's long side.
    """
    _check_role(role)
    high, low = run_image_sizes(h_short_side, max_size)
    inputs = {"teacher": (high, low), "student": (low,), "fcos": (high,)}[role]
    reference = backbone_flops(1.0, *HIGH_RESOLUTION)
    return sum(backbone_flops(width, *size) for size in inputs) / reference


def capacity_for(role: str, width: float, h_short_side: int, max_size: int) -> tuple[float, float | None, float]:
    """(capacity at the run's resolution, the paper's capacity or None, detector GFLOPs at the run's resolution).

    Args:
        role: "teacher", "student" or "fcos".
        width: backbone width multiplier.
        h_short_side: the run's H short side.
        max_size: the cap on H's long side.

    Returns:
        See `backbone_capacity` and `detector_gflops`. The published value is the paper's for this role and width
        (at 800 x 1333), None for the FCOS baseline and for widths the paper does not list.
    """
    capacity = backbone_capacity(role, width, h_short_side, max_size)
    published = PUBLISHED_CAPACITY.get(width)
    published_capacity = None if published is None or role == "fcos" else published[0 if role == "teacher" else 1]
    return capacity, published_capacity, detector_gflops(width, role, run_image_sizes(h_short_side, max_size)[0])
