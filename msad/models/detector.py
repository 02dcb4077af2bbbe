"""Plain single-resolution FCOS on a slimmable ResNet-50, and the parts builder the teacher and student share.

Every model in this package is the same trio -- ``backbone`` (SlimmableResNet50), ``pyramid`` (FeaturePyramid on
res2..res5, P2..P7) and ``head`` (FCOSHead over 5 levels) -- under the same attribute names, so state dicts line up
across the detector, the teacher and the student (the student is initialised from the teacher key by key). Models
differ only in which pyramid levels they read; the modules a model never runs are frozen at construction
(``requires_grad=False``) rather than left out, which keeps that common layout while giving DDP no unused
parameters. Build optimizers from ``requires_grad`` parameters only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from msad.models.fcos import STRIDES, FCOSHead, HeadOutputs, fcos_detections, fcos_losses
from msad.models.fpn import FeaturePyramid
from msad.models.slimmable import WIDTHS, SlimmableResNet50
from msad.models.trainable import Trainable, check_single_branch

# Levels read at each resolution: H's P(k+1) and L's P(k) have the same size and both predict at STRIDES[k-2].
HIGH_LEVELS: tuple[str, ...] = ("p3", "p4", "p5", "p6", "p7")
LOW_LEVELS: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")


class FCOSParts(NamedTuple):
    """The three modules of every model here, in forward order."""

    backbone: SlimmableResNet50
    pyramid: FeaturePyramid
    head: FCOSHead


def build_fcos_parts(
    width: float,
    width_list: Sequence[float],
    fpn_channels: int,
    num_classes: int,
    head_convs: int,
    gn_groups: int,
    levels: Sequence[str],
) -> FCOSParts:
    """Build backbone, pyramid and head, freezing the pyramid modules that ``levels`` never uses.

    Args:
        width: the slimmable width the model runs at; fixed for the model's life because the pyramid's lateral
            convs are sized for it.
        width_list: every width the backbone's weights serve (one BN per width, as in the ImageNet file).
        fpn_channels: channels of every pyramid level and of the head (256 in the paper).
        num_classes: foreground classes of the head.
        head_convs: conv + GN + ReLU blocks per head tower (4 in the paper).
        gn_groups: GroupNorm groups in the head (32 in the paper).
        levels: every pyramid level the model reads, over all its passes; the rest is frozen.
    """
    backbone = SlimmableResNet50(width, width_list)
    pyramid = FeaturePyramid(backbone.out_channels(), fpn_channels)
    head = FCOSHead(fpn_channels, num_classes, num_convs=head_convs, num_levels=len(STRIDES), gn_groups=gn_groups)
    freeze_unused_levels(pyramid, levels)
    return FCOSParts(backbone, pyramid, head)


def freeze_unused_levels(pyramid: FeaturePyramid, levels: Sequence[str]) -> None:
    """Turn off ``requires_grad`` of the pyramid convs that computing ``levels`` never runs.

    The pyramid skips the output conv of a level not asked for, the laterals finer than the finest level asked for,
    and P6/P7 unless asked; those parameters would never get a gradient (DDP's "unused parameters" error).

    Args:
        pyramid: a pyramid on res2..res5 with P6/P7.
        levels: the levels the owning model asks for, over all its passes.
    """
    wanted = set(levels)
    unknown = wanted.difference(pyramid.level_names)
    if unknown:
        raise ValueError(f"unknown pyramid levels {sorted(unknown)}; the pyramid has {pyramid.level_names}")
    # The top-down path runs from the coarsest lateral down to the finest asked-for level among P2..P5 (if any).
    asked = [int(key) for key in pyramid.output if f"p{key}" in wanted]
    finest = min(asked, default=None)
    for key, conv in pyramid.output.items():
        conv.requires_grad_(f"p{key}" in wanted)
    for key, conv in pyramid.lateral.items():
        conv.requires_grad_(finest is not None and int(key) >= finest)
    top = max(int(key) for key in pyramid.lateral)
    p6_name, p7_name = f"p{top + 1}", f"p{top + 2}"
    if pyramid.p6 is not None and pyramid.p7 is not None:
        pyramid.p6.requires_grad_(p6_name in wanted or p7_name in wanted)
        pyramid.p7.requires_grad_(p7_name in wanted)


def pyramid_features(
    backbone: SlimmableResNet50, pyramid: FeaturePyramid, images: Tensor, levels: Sequence[str]
) -> list[Tensor]:
    """Run backbone + pyramid on ``images`` and return ``levels`` in the order given.

    Args:
        backbone: the model's backbone.
        pyramid: the model's pyramid.
        images: [B, 3, H, W] normalised batch.
        levels: pyramid levels to compute, e.g. HIGH_LEVELS or LOW_LEVELS.
    """
    features = pyramid(backbone(images), levels)
    return [features[name] for name in levels]


class SlimmableFCOS(Trainable):
    """The trio every model here is made of, at one width; a subclass names the pyramid levels it reads (the rest
    is frozen, see ``build_fcos_parts``) and its own settings, and passes these on as keywords.

    Args:
        levels: every pyramid level the model reads, over all its passes.
        width: slimmable width the model runs at (a student's must equal its teacher's).
        width_list: widths the backbone's weights serve.
        fpn_channels: pyramid and head channels (C of the teacher's fusion; equal on both sides of distillation).
        num_classes: foreground classes.
        head_convs: conv blocks per head tower.
        gn_groups: GroupNorm groups in the head.
        giou_plus_one: the original's smoothed GIoU (``fcos_losses``).
    """

    def __init__(
        self,
        levels: Sequence[str],
        width: float = 1.0,
        width_list: Sequence[float] = WIDTHS,
        fpn_channels: int = 256,
        num_classes: int = 80,
        head_convs: int = 4,
        gn_groups: int = 32,
        giou_plus_one: bool = False,
    ) -> None:
        super().__init__()
        self.giou_plus_one = giou_plus_one
        self.backbone, self.pyramid, self.head = build_fcos_parts(
            width, width_list, fpn_channels, num_classes, head_convs, gn_groups, levels
        )

    @property
    def width(self) -> float:
        return self.backbone.width

    def compile_network(self, backend: str = "inductor") -> None:
        """Backbone, pyramid, head (and a teacher's C-FF) compiled in place, one graph per input shape; the loss's
        target assignment, with its data-dependent indexing, stays eager (``msad.engine.compilation``)."""
        for part in (self.backbone, self.pyramid, self.head, getattr(self, "fusion", None)):
            if part is not None:
                part.compile(dynamic=False, backend=backend)


class FCOSDetector(SlimmableFCOS):
    """Plain FCOS at one resolution: P3..P7 of the input image at strides 8..128 (the "no MSAD" baseline).

    Args:
        parts: ``SlimmableFCOS``'s settings (width, channels, classes, ...).
    """

    def __init__(self, **parts: Any) -> None:
        super().__init__(HIGH_LEVELS, **parts)

    def head_outputs(self, images: Tensor) -> HeadOutputs:
        """Raw head predictions on P3..P7 of ``images`` [B, 3, H, W]."""
        return self.head(pyramid_features(self.backbone, self.pyramid, images, HIGH_LEVELS))

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """Training losses {"loss_cls", "loss_box", "loss_ctr"}; their plain sum is the objective.

        Args:
            images: [B, 3, H, W] padded, normalised batch.
            targets: per image "boxes" [N, 4] xyxy in ``images`` pixels and "labels" [N].
        """
        return fcos_losses(self.head_outputs(images), targets, STRIDES, self.giou_plus_one)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]], branch: str | None = None,
                **postprocess_kwargs) -> list[dict]:
        """Detections per image ({"boxes", "scores", "labels"}) in ``images`` pixels; call ``eval()`` first.

        Args:
            images: [B, 3, H, W] padded, normalised batch.
            image_sizes: (h, w) of each image before padding; boxes are clipped to it.
            branch: None (one output; the argument is there for the interface every trainable model shares).
            postprocess_kwargs: thresholds for ``fcos_detections`` (score_thresh, nms_thresh, ...).
        """
        check_single_branch(self, branch)
        return fcos_detections(self.head_outputs(images), STRIDES, image_sizes, **postprocess_kwargs)
