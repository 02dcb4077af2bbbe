"""Teacher hand-off: a sliced, weights-only teacher file that student runs distil from instead of the training file.

A width-0.25 teacher's training checkpoint carries full ResNet-50 convs, four widths of BN and SGD momentum; what a
student run needs is the teacher at its width. ``export_sliced_teacher`` writes that (a ``pt`` export, checked
against the training teacher), ``load_sliced_teacher`` rebuilds a frozen ``MSADTeacher`` from it, and
``init_student_from_teacher`` starts a student from either kind of teacher.

The loaded teacher is an ``MSADTeacher`` whose backbone holds one width (BN unfolded: ``train.teacher_batch_stats``
still works) and reports the widths it was cut from as its ``width_list``, so ``check_teacher_matches`` accepts a
student built for the training widths. Its fused features are the training teacher's, bit for bit, so a student
distils exactly as from the training checkpoint. The student's slices outside its width and the other widths' BNs,
which a student at that width never reads, keep the student's own initialisation instead of the teacher's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msad.build import build_teacher
from msad.deploy.export import SLICED_KIND, export_checkpoint
from msad.engine.checkpoint import checkpoint_config, load_checkpoint
from msad.errors import UserError
from msad.models.slimmable import SlimmableConv2d, SlimmableResNet50, SwitchableBatchNorm2d
from msad.models.state import load_state_strictly
from msad.models.student import MSADStudent, init_from_teacher
from msad.models.teacher import MSADTeacher

SLICED_TEACHER_FILE = "teacher_sliced.pt"


class SlicedResNet50(SlimmableResNet50):
    """``SlimmableResNet50(w, width_list=(w,))`` that names the widths its weights were cut from.

    ``width_list`` is the source list (what ``check_teacher_matches`` compares with the student's); the module
    itself holds and runs only ``width``.

    Args:
        width: the one width held.
        source_width_list: the training backbone's widths.
    """

    def __init__(self, width: float, source_width_list: Sequence[float]) -> None:
        super().__init__(width, (width,))
        source = tuple(float(w) for w in source_width_list)
        if float(width) not in source:
            raise UserError(f"sliced width {width} is not one of its source widths {source}")
        self.width_list = source

    @property
    def width(self) -> float:
        return self._width

    @width.setter
    def width(self, width: float) -> None:
        if hasattr(self, "_width") and float(width) != self._width:
            raise UserError(f"a sliced backbone runs only at its width {self._width}, not {width}")
        for m in self.modules():
            if isinstance(m, (SlimmableConv2d, SwitchableBatchNorm2d)):
                m.set_width_index(0)
        self._width = float(width)


def export_sliced_teacher(training_checkpoint: str | Path, output: str | Path | None = None) -> Path:
    """Write the teacher of ``training_checkpoint`` sliced to its width, next to it unless ``output`` is given.

    The file is a ``pt`` export (weights-only, checked against the training teacher before it is written).
    """
    output = Path(output) if output is not None else Path(training_checkpoint).with_name(SLICED_TEACHER_FILE)
    return export_checkpoint(training_checkpoint, output, "pt", roles=("teacher",)).path


def publish_sliced_teacher(checkpoint: str) -> str:
    """The sliced teacher beside a finished teacher's best `checkpoint` (a path or a storage URI), written once:
    what the sweep hands to that teacher's students instead of the training file (a fraction of its size, no
    optimizer state, no other widths). On an object store it is written locally, checked, then uploaded with its
    SHA-256 sidecar, so each node downloads it once (`msad.engine.storage.local_copy`) and verifies it."""
    from msad.engine import storage
    from msad.engine.checkpoint import DIGEST_SUFFIX

    target = storage.sibling(checkpoint, SLICED_TEACHER_FILE)
    digest = storage.sibling(checkpoint, SLICED_TEACHER_FILE + DIGEST_SUFFIX)
    if storage.exists(digest):  # written last: a resumed or re-run trial wrote it before
        return target
    if not storage.is_uri(checkpoint):
        export_sliced_teacher(checkpoint, target)  # atomic, digest beside it (save_checkpoint)
        return target
    with tempfile.TemporaryDirectory(prefix="msad-teacher-") as tmp:
        local = export_sliced_teacher(checkpoint, Path(tmp) / SLICED_TEACHER_FILE)
        storage.write_bytes(target, local.read_bytes())
        storage.write_bytes(digest, local.with_name(local.name + DIGEST_SUFFIX).read_bytes())
    return target


def teacher_from_sliced_state(state: dict[str, Any], path: str | Path) -> MSADTeacher:
    """The frozen teacher of an already loaded sliced-teacher file (``load_checkpoint``'s dict)."""
    if state.get("kind") != SLICED_KIND or state.get("role") != "teacher":
        raise UserError(f"{path}: not a sliced teacher (kind {state.get('kind')!r}, role {state.get('role')!r}); "
                        "write one with msad.deploy.export_sliced_teacher(CHECKPOINT)")
    cfg = checkpoint_config(state, path)
    source = state.get("source_width_list")
    if not isinstance(source, list) or not source:
        raise UserError(f"{path}: field 'source_width_list' is {source!r}, expected the training widths")
    teacher = build_teacher(cfg)
    teacher.backbone = SlicedResNet50(cfg.model.width, source)
    load_state_strictly(teacher, state["model"], str(path))
    teacher.requires_grad_(False)
    return teacher.eval()


def load_sliced_teacher(path: str | Path, device: torch.device | str = "cpu") -> MSADTeacher:
    """A frozen, eval-mode teacher from a sliced-teacher file, for ``run_frozen_teacher``."""
    return teacher_from_sliced_state(load_checkpoint(path), path).to(device)


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


def init_student_from_teacher(student: MSADStudent, teacher: MSADTeacher) -> None:
    """Start ``student`` from ``teacher``: a training teacher strictly key by key, a sliced one at its width."""
    if not isinstance(teacher.backbone, SlicedResNet50):
        init_from_teacher(student, teacher.state_dict(), teacher.width)
        return
    if student.width != teacher.width:
        raise UserError(f"teacher width {teacher.width} differs from student width {student.width}")
    _unslice_into(student.backbone, teacher.backbone)
    others: dict[str, nn.Module] = {"pyramid": teacher.pyramid, "head": teacher.head}
    for name, module in others.items():
        load_state_strictly(getattr(student, name), module.state_dict(), f"sliced teacher {name}")
