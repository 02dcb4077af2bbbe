"""The low-resolution student: reads only L = H/2 and is distilled from a frozen teacher's fused features.

Its pyramid P2..P6 on L is aligned with the teacher's fused levels (H's P3..P7), predicts at strides 8..128 of the
H image and is supervised with the H-image boxes. The distillation term per step is

    loss_kd = kd_weight * sum over the 5 levels of mean |s / T - t / T| * T^2,

with ``kd_weight = alpha * ramp`` supplied by the caller from ``KDWarmup.weight`` (alpha 0.2, T 3.0 and a
500-iteration linear ramp in the paper). At test time only the student runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msad.data.transforms import to_low_resolution
from msad.errors import UserError
from msad.models.detector import LOW_LEVELS, SlimmableFCOS, pyramid_features
from msad.models.fcos import STRIDES, HeadOutputs, fcos_detections, fcos_losses
from msad.models.slimmable import SlicedResNet50, SlimmableConv2d, SlimmableResNet50, SwitchableBatchNorm2d
from msad.models.state import load_state_strictly
from msad.models.teacher import MSADTeacher
from msad.models.trainable import check_single_branch

KD_LOSSES: tuple[str, ...] = ("l1", "mse")
# Teacher parameters a student has no counterpart for; everything else must match key for key.
TEACHER_ONLY_PREFIXES: tuple[str, ...] = ("fusion.",)


def aligned_distillation_loss(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], temperature: float, kind: str = "l1"
) -> Tensor:
    """Sum over aligned levels of mean L1 (or MSE) between s / T and t / T, times T^2 (no kd_weight applied).

    Args:
        student_feats: the student's P2..P6 on L.
        teacher_feats: the teacher's fused levels (shapes equal to the student's level by level).
        temperature: T; dividing both sides by it softens the match, T^2 keeps the gradient scale independent of it.
        kind: "l1" (the paper) or "mse".
    """
    if kind not in KD_LOSSES:
        raise UserError(f"unknown distillation loss {kind!r}; allowed: {', '.join(KD_LOSSES)}")
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student levels but {len(teacher_feats)} teacher levels")
    distance = F.l1_loss if kind == "l1" else F.mse_loss
    total = student_feats[0].new_zeros(())
    for level, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if s.shape != t.shape:
            raise ValueError(f"level {level}: student feature {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        total = total + distance(s.float() / temperature, t.float() / temperature)  # fp32 under autocast
    return total * temperature**2


class KDWarmup:
    """Linear ramp of the distillation weight from 0 to ``alpha`` over ``warmup_iters`` steps.

    Kept in checkpoints (``state_dict``), so a resumed run continues the ramp instead of restarting it.

    Args:
        alpha: the full distillation weight (0.2 in the paper).
        warmup_iters: steps to reach ``alpha`` (500 in the paper); 0 starts at full weight.
    """

    def __init__(self, alpha: float, warmup_iters: int) -> None:
        if alpha < 0 or warmup_iters < 0:
            raise UserError(f"KD warm-up needs alpha >= 0 and warmup_iters >= 0, got {alpha} and {warmup_iters}")
        self.alpha = float(alpha)
        self.warmup_iters = int(warmup_iters)
        self.iteration = 0

    @property
    def weight(self) -> float:
        """``alpha * min(1, iteration / warmup_iters)``: the kd_weight for the current step."""
        if self.iteration >= self.warmup_iters:
            return self.alpha
        return self.alpha * self.iteration / self.warmup_iters

    def step(self) -> None:
        """Advance one training iteration (call once per optimizer step)."""
        self.iteration += 1

    def state_dict(self) -> dict[str, float | int]:
        return {"iteration": self.iteration, "alpha": self.alpha, "warmup_iters": self.warmup_iters}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        """Restore the step count; alpha and warmup_iters stay as configured (a resumed run may change them)."""
        if not isinstance(state.get("iteration"), int) or state["iteration"] < 0:
            raise UserError(f"KD warm-up state needs a non-negative int 'iteration', got {state.get('iteration')!r}")
        self.iteration = state["iteration"]


class MSADStudent(SlimmableFCOS):
    """The "L" student: its own backbone + pyramid + head at its teacher's width, reading L only.

    Its ``forward`` and ``predict`` take the H batch -- the very tensor the teacher gets -- and make L themselves
    with ``to_low_resolution(images, low_res_mode)``, so teacher and student always see the same L and the
    training loop passes one batch to both. Boxes in and out are in H pixels. P7 is never read: the pyramid keeps
    it (the layout shared with the teacher) but frozen, so every trainable parameter gets a gradient.

    Args:
        low_res_mode: how L is made from H; must match the teacher's.
        temperature: T of the distillation loss (3.0 in the paper).
        kd_loss: "l1" (the paper) or "mse".
        parts: ``SlimmableFCOS``'s settings (width, channels, classes, ...); width and channels the teacher's.
    """

    def __init__(self, low_res_mode: str = "nearest", temperature: float = 3.0, kd_loss: str = "l1",
                 **parts: Any) -> None:
        super().__init__(LOW_LEVELS, **parts)
        if temperature <= 0:
            raise UserError(f"distillation temperature must be > 0, got {temperature}")
        if kd_loss not in KD_LOSSES:
            raise UserError(f"unknown distillation loss {kd_loss!r}; allowed: {', '.join(KD_LOSSES)}")
        self.low_res_mode = low_res_mode
        self.temperature = float(temperature)
        self.kd_loss = kd_loss

    def low_features(self, images: Tensor) -> list[Tensor]:
        """The student's P2..P6 on L = H/2 of the H batch ``images`` (aligned with the teacher's fused levels)."""
        return pyramid_features(self.backbone, self.pyramid, to_low_resolution(images, self.low_res_mode), LOW_LEVELS)

    def forward(
        self,
        images: Tensor,
        targets: list[dict],
        teacher_features: Sequence[Tensor] | None = None,
        kd_weight: float = 0.0,
    ) -> dict[str, Tensor]:
        """Training losses {"loss_cls", "loss_box", "loss_ctr", "loss_kd"}; the objective is their plain sum.

        Args:
            images: the H batch [B, 3, H, W] (padded to a multiple of 256); the student reads only its L.
            targets: per image "boxes" [N, 4] xyxy in H pixels and "labels" [N].
            teacher_features: the frozen teacher's fused levels (``run_frozen_teacher``); None trains without
                distillation (the "L only" baseline) and makes loss_kd a constant 0.
            kd_weight: multiplies the distillation loss; pass ``KDWarmup.weight`` (alpha times the ramp).
        """
        features = self.low_features(images)
        losses = fcos_losses(self.head(features), targets, STRIDES, self.giou_plus_one)
        if teacher_features is None:
            losses["loss_kd"] = features[0].new_zeros(())
        else:
            kd = aligned_distillation_loss(features, teacher_features, self.temperature, self.kd_loss)
            losses["loss_kd"] = kd * kd_weight
        return losses

    def head_outputs(self, images: Tensor) -> HeadOutputs:
        """Raw head predictions from L of the H batch ``images``, at strides 8..128 of H."""
        return self.head(self.low_features(images))

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]], branch: str | None = None,
                **postprocess_kwargs) -> list[dict]:
        """Detections per image in H pixels, running only the student (no teacher needed); call ``eval()`` first.

        Args:
            images: the H batch [B, 3, H, W] padded to a multiple of 256; only its L = H/2 is read.
            image_sizes: (h, w) of each H image before padding.
            branch: None (one output).
            postprocess_kwargs: thresholds for ``fcos_detections``.
        """
        check_single_branch(self, branch)
        return fcos_detections(self.head_outputs(images), STRIDES, image_sizes, **postprocess_kwargs)


def check_teacher_matches(student: MSADStudent, teacher: MSADTeacher) -> None:
    """Refuse (UserError) a teacher the student cannot be distilled from or initialised by.

    Slimmable weights are stored at full width for every width, so a width mismatch would not show in parameter
    shapes everywhere; it is checked by value here. L must also be made the same way on both sides.
    """
    if student.width != teacher.width or student.backbone.width_list != teacher.backbone.width_list:
        raise UserError(
            f"student width {student.width} (widths {student.backbone.width_list}) differs from its teacher's "
            f"{teacher.width} (widths {teacher.backbone.width_list}); train the student at the teacher's width"
        )
    if student.low_res_mode != teacher.low_res_mode:
        raise UserError(
            f"student low_res_mode {student.low_res_mode!r} differs from its teacher's {teacher.low_res_mode!r}"
        )


def init_from_teacher(
    student: MSADStudent, teacher_state_dict: Mapping[str, Tensor], teacher_width: float | None = None
) -> None:
    """Copy the teacher's backbone, pyramid and head into the student, strictly.

    Every student key must be in the teacher state dict with the same shape; the teacher may carry extra keys only
    under TEACHER_ONLY_PREFIXES (its fusion module). Anything else means the two were built differently (width,
    classes, channels, widths list) and raises UserError naming the first offending key.

    Args:
        student: the freshly built student.
        teacher_state_dict: ``MSADTeacher.state_dict()`` (e.g. from the teacher's checkpoint).
        teacher_width: the teacher's width when known (checkpoints record it); checked against the student's.
    """
    if teacher_width is not None and float(teacher_width) != student.width:
        raise UserError(f"teacher width {teacher_width} differs from student width {student.width}")
    load_state_strictly(student, teacher_state_dict, "teacher state", ignore_prefixes=TEACHER_ONLY_PREFIXES)


def init_student_from_teacher(student: MSADStudent, teacher: MSADTeacher) -> None:
    """Start ``student`` from ``teacher``: a training teacher strictly key by key, a sliced one at its width.

    A sliced teacher (``SlicedResNet50`` backbone) fills the student's active slices and that width's batch norms;
    the slices outside its width and the other widths' batch norms, which a student at that width never reads, keep
    the student's own initialisation.
    """
    if not isinstance(teacher.backbone, SlicedResNet50):
        init_from_teacher(student, teacher.state_dict(), teacher.width)
        return
    if student.width != teacher.width:
        raise UserError(f"teacher width {teacher.width} differs from student width {student.width}")
    _unslice_into(student.backbone, teacher.backbone)
    others: dict[str, nn.Module] = {"pyramid": teacher.pyramid, "head": teacher.head}
    for name, module in others.items():
        load_state_strictly(getattr(student, name), module.state_dict(), f"sliced teacher {name}")


def _unslice_into(student_backbone: SlimmableResNet50, sliced: SlimmableResNet50) -> None:
    """Copy a one-width backbone into the active slices and BN of a slimmable one at the same width."""
    index = student_backbone.width_list.index(sliced.width)
    targets = dict(student_backbone.named_modules())
    with torch.no_grad():
        for name, module in sliced.named_modules():
            target = targets[name]
            if isinstance(module, SlimmableConv2d):
                out_c, in_c = module.weight.shape[:2]
                target.weight[:out_c, :in_c].copy_(module.weight)
            elif isinstance(module, SwitchableBatchNorm2d):
                target.bn[index].load_state_dict(module.bn[0].state_dict())


def run_frozen_teacher(teacher: MSADTeacher, images: Tensor, batch_statistics: bool = False) -> list[Tensor]:
    """The teacher's fused levels for distillation, with the teacher frozen.

    Puts the teacher in eval mode (its BN statistics never move; call every step, since a loop's ``train()`` on a
    parent module would undo it) and turns off its ``requires_grad``, then runs it under ``inference_mode``. The
    results are cloned outside inference mode: inference tensors cannot be saved for the student's backward, and
    the clones carry no graph, so no gradient can reach the teacher.

    Args:
        teacher: the trained teacher (kept outside DDP).
        images: the H batch, the same tensor the student gets.
        batch_statistics: the original's behaviour (`train.teacher_batch_stats`): the teacher stays in train mode,
            so its BN normalises with each batch's statistics (and its running statistics drift); its weights
            still never change.
    """
    teacher.train(batch_statistics)
    teacher.requires_grad_(False)
    with torch.inference_mode():
        fused = teacher.fuse_aligned_levels(images).fused
    return [level.clone() for level in fused]
