"""The multi-scale teacher: one backbone + pyramid on H and on L = H/2, crossing feature-level fusion, one head.

H's P3..P7 and L's P2..P6 form five aligned pairs (same spatial size, both predicting at strides 8..128 of the H
image). C-FF fuses each pair with two softmax weights computed from both; the one head then predicts on H, L and
fused features, all supervised with the H-image boxes: loss = L_high + L_low + joint_weight * L_fused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from msad.data.transforms import to_low_resolution
from msad.errors import UserError
from msad.models.detector import HIGH_LEVELS, LOW_LEVELS, SlimmableFCOS, pyramid_features
from msad.models.fcos import STRIDES, HeadOutputs, fcos_detections, fcos_losses

BRANCHES: tuple[str, ...] = ("high", "low", "fused")
HIGH_BRANCH_PREFIX = "H_"  # metric keys of the H branch's evaluation: H_AP, H_AP_lo, ...


def check_aligned(high: Sequence[Tensor], low: Sequence[Tensor]) -> None:
    """Raise UserError unless H's P(k+1) and L's P(k) have equal spatial sizes for every pair.

    An even H halves exactly, which aligns every level; the check is what keeps a change to the padding or to the
    downscaling from silently pairing features of different sizes (or crashing inside the fusion's arithmetic).

    Args:
        high: H features P3..P7.
        low: L features P2..P6.
    """
    for high_name, low_name, h, lo in zip(HIGH_LEVELS, LOW_LEVELS, high, low, strict=True):
        if h.shape[-2:] != lo.shape[-2:]:
            raise UserError(
                f"H level {high_name} is {tuple(h.shape[-2:])} but L level {low_name} is {tuple(lo.shape[-2:])}; "
                "MSAD needs them equal: pad images to a multiple of 64 (data.size_divisibility) and make L exactly H/2"
            )


class CrossLevelFusion(nn.Module):
    """C-FF: per aligned pair (h, l), softmax weights (a, b) from the pooled pair, fused = a * h + b * l.

    One module serves all levels (as in the original); the levels are pooled and weighted in one batched call.
    Pooling [h, l] equals concatenating the pooled h and the pooled l, so the 2C-channel concat is never built.

    The logits are 1-homogeneous in the pooled features (no biases, ReLU), whose norms are ~5-15 per level, so a
    random last layer maps them to logit gaps of a unit or more, and the fc barely moves in a short run: the mix is
    set by a random projection of moving features (0.11 on H at P4 at the start with the original's init; a 1.3x
    larger init saturated two levels onto L, where a * b ~ 0 returns no gradient; benchmarks/RESULTS.md).
    ``init="zero"`` starts the last layer at zero:
    (0.5, 0.5) everywhere, and every change to the weights comes from the loss. ``init="original"`` is the original's:
    Detectron2's ``c2_xavier_fill`` on both layers, i.e. ``kaiming_uniform_(a=1)``, U(+-sqrt(3 / fan_in)) (not
    ``xavier_uniform_``, whose weights are larger when fan_out < fan_in).

    Args:
        channels: C, the channels of each feature map (the fc input is 2C).
        hidden: width of the bottleneck layer (32 in the paper).
        init: "zero" (last layer zero, first as the original) or "original" (both as the original).
    """

    def __init__(self, channels: int, hidden: int = 32, init: str = "zero") -> None:
        super().__init__()
        if init not in ("zero", "original"):
            raise UserError(f"model.fusion_init: invalid value {init!r}; allowed: zero, original")
        # Named like the original's `SE.fc` (Linear, ReLU, Linear without biases) so weights map 1:1.
        self.fc = nn.Sequential(
            nn.Linear(2 * channels, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, 2, bias=False)
        )
        nn.init.kaiming_uniform_(self.fc[0].weight, a=1)  # c2_xavier_fill, as the original's SELayer
        if init == "zero":
            nn.init.zeros_(self.fc[2].weight)
        else:
            nn.init.kaiming_uniform_(self.fc[2].weight, a=1)

    def level_weights(self, high: Sequence[Tensor], low: Sequence[Tensor]) -> Tensor:
        """The (a, b) weights of every image and level: [B, num_levels, 2], each row summing to 1."""
        pairs = zip(high, low, strict=True)
        pooled = torch.stack([torch.cat((h.mean((2, 3)), lo.mean((2, 3))), dim=1) for h, lo in pairs], dim=1)
        return self.fc(pooled).softmax(dim=-1)

    def forward(self, high: Sequence[Tensor], low: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Fuse aligned levels.

        Args:
            high: per level [B, C, H_i, W_i].
            low: per level, the same shapes as ``high``.

        Returns:
            (fused per level, weights [B, num_levels, 2]).
        """
        weights = self.level_weights(high, low)
        fused = [
            weights[:, i, 0, None, None, None] * h + weights[:, i, 1, None, None, None] * lo
            for i, (h, lo) in enumerate(zip(high, low, strict=True))
        ]
        return fused, weights


@dataclass
class TeacherFeatures:
    """What one teacher pass on a batch produces, five aligned levels per list (strides 8..128 of H).

    Args:
        high: H's P3..P7.
        low: L's P2..P6; empty for a teacher built with ``fusion=False`` (it never sees L).
        fused: C-FF output per level; H's features themselves when ``fusion=False``, so a student can distil
            from either kind of teacher.
        fusion_weights: [B, 5, 2] the (a, b) per image and level; (1, 0) when ``fusion=False``.
    """

    high: list[Tensor]
    low: list[Tensor]
    fused: list[Tensor]
    fusion_weights: Tensor


class MSADTeacher(SlimmableFCOS):
    """The "H & L" teacher of MSAD (or, with ``fusion=False``, the "teacher on H only" ablation).

    Args:
        fusion: True runs H and L with C-FF; False runs H only (no L pass, no fusion module).
        joint_weight: weight of the fused branch's losses (0.4 in the paper).
        low_res_mode: how L is made from H ("nearest" as the original, or "antialias"); the student must match.
        fusion_hidden: bottleneck width of C-FF.
        fusion_init: C-FF's initialisation, "zero" or "original" (see ``CrossLevelFusion``).
        parts: ``SlimmableFCOS``'s settings (width, channels, classes, ...); its students must share width and
            channels.
    """

    branches = BRANCHES

    def __init__(self, fusion: bool = True, joint_weight: float = 0.4, low_res_mode: str = "nearest",
                 fusion_hidden: int = 32, fusion_init: str = "zero", **parts: Any) -> None:
        super().__init__(sorted(set(HIGH_LEVELS) | set(LOW_LEVELS)) if fusion else HIGH_LEVELS, **parts)
        self.fusion: CrossLevelFusion | None = (
            CrossLevelFusion(self.pyramid.out_channels, fusion_hidden, fusion_init) if fusion else None
        )
        self.joint_weight = float(joint_weight)
        self.low_res_mode = low_res_mode

    def fuse_aligned_levels(self, images: Tensor) -> TeacherFeatures:
        """Run the backbone + pyramid on H (P3..P7) and on L = H/2 (P2..P6), check alignment, fuse.

        Args:
            images: the H batch [B, 3, H, W], padded to a multiple of 64 (data.size_divisibility).
        """
        high = pyramid_features(self.backbone, self.pyramid, images, HIGH_LEVELS)
        if self.fusion is None:
            weights = high[0].new_tensor([1.0, 0.0]).expand(images.shape[0], len(high), 2)
            return TeacherFeatures(high=high, low=[], fused=high, fusion_weights=weights)
        low_images = to_low_resolution(images, self.low_res_mode)
        low = pyramid_features(self.backbone, self.pyramid, low_images, LOW_LEVELS)
        check_aligned(high, low)
        fused, weights = self.fusion(high, low)
        return TeacherFeatures(high=high, low=low, fused=fused, fusion_weights=weights)

    def _head_per_branch(self, branches: Sequence[list[Tensor]]) -> list[HeadOutputs]:
        """Apply the one head to several aligned feature lists in a single call (stacked on the batch axis).

        The head is per-sample (conv + GroupNorm), so stacking changes no number; it runs each level's towers once
        instead of once per branch.
        """
        stacked = self.head([torch.cat(level, dim=0) for level in zip(*branches, strict=True)])
        count = len(branches)
        splits = [[m.chunk(count, dim=0) for m in maps] for maps in
                  (stacked.cls_logits, stacked.box_regression, stacked.centerness)]
        return [HeadOutputs(*([level[b] for level in field] for field in splits)) for b in range(count)]

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """Training losses ``loss_{cls,box,ctr}_{high,low,fused}`` (the objective is their plain sum) and, with
        fusion, the diagnostics ``fusion_high_p3``..``p7``: C-FF's mean weight on H per level in this batch, logged
        with the losses so that a fusion collapsing onto one resolution shows in the run's curves.

        The fused terms are already multiplied by ``joint_weight``. A ``fusion=False`` teacher returns the high
        terms only.

        Args:
            images: the H batch [B, 3, H, W], padded to a multiple of 64 (data.size_divisibility).
            targets: per image "boxes" [N, 4] xyxy in H pixels and "labels" [N]; every branch uses them.
        """
        features = self.fuse_aligned_levels(images)
        if self.fusion is None:
            high_losses = fcos_losses(self.head(features.high), targets, STRIDES, self.giou_plus_one)
            return {f"{name}_high": value for name, value in high_losses.items()}
        outputs = self._head_per_branch([features.high, features.low, features.fused])
        losses: dict[str, Tensor] = {}
        for branch, branch_outputs in zip(BRANCHES, outputs, strict=True):
            weight = self.joint_weight if branch == "fused" else 1.0
            for name, value in fcos_losses(branch_outputs, targets, STRIDES, self.giou_plus_one).items():
                losses[f"{name}_{branch}"] = value * weight
        high_weights = features.fusion_weights[..., 0].detach().float().mean(0)
        return {**losses, **{f"fusion_high_{level}": w for level, w in zip(HIGH_LEVELS, high_weights, strict=True)}}

    def evaluation_branches(self) -> dict[str, str | None]:
        """The fused output, and with fusion also the H branch alone (``H_`` keys): what C-FF adds."""
        return {"": "fused", HIGH_BRANCH_PREFIX: "high"} if self.fusion is not None else {"": "fused"}

    @torch.no_grad()
    def predict(
        self, images: Tensor, image_sizes: list[tuple[int, int]], branch: str | None = "fused", **postprocess_kwargs
    ) -> list[dict]:
        """Detections per image in H pixels from one branch, computing only what that branch needs.

        Args:
            images: the H batch [B, 3, H, W], padded to a multiple of 64 (data.size_divisibility).
            image_sizes: (h, w) of each H image before padding.
            branch: "fused" or None (the teacher's real output: needs H and L), "high" (H only) or "low" (L only;
                not available without fusion, since such a teacher never trained on L).
            postprocess_kwargs: thresholds for ``fcos_detections``.
        """
        branch = branch or "fused"
        if branch not in BRANCHES:
            raise UserError(f"unknown teacher branch {branch!r}; allowed: {', '.join(BRANCHES)}")
        if branch == "high" or (branch == "fused" and self.fusion is None):
            features = pyramid_features(self.backbone, self.pyramid, images, HIGH_LEVELS)
        elif branch == "low":
            if self.fusion is None:
                raise UserError("branch 'low' needs a teacher built with fusion=True; this one never saw L images")
            low_images = to_low_resolution(images, self.low_res_mode)
            features = pyramid_features(self.backbone, self.pyramid, low_images, LOW_LEVELS)
        else:
            features = self.fuse_aligned_levels(images).fused
        return fcos_detections(self.head(features), STRIDES, image_sizes, **postprocess_kwargs)
