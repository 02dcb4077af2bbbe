"""Teacher hand-off: a sliced, weights-only teacher file that student runs distil from instead of the training file.

A width-0.25 teacher's training checkpoint carries full ResNet-50 convs, four widths of BN and SGD momentum; what a
student run needs is the teacher at its width. ``export_sliced_teacher`` writes that (a ``pt`` export, checked
against the training teacher), ``publish_sliced_teacher`` puts it beside a sweep's teacher, ``load_sliced_teacher``
rebuilds a frozen ``MSADTeacher`` from it (``msad.build.sliced_teacher_from_checkpoint``, which a student run's
``load_frozen_teacher`` uses too), and ``msad.models.student.init_student_from_teacher`` starts a student from either
kind of teacher.

The loaded teacher is an ``MSADTeacher`` whose backbone holds one width (``msad.models.slimmable.SlicedResNet50``,
BN unfolded: ``train.teacher_batch_stats`` still works) and reports the widths it was cut from as its
``width_list``, so ``check_teacher_matches`` accepts a student built for the training widths. Its fused features
are the training teacher's, bit for bit, so a student distils exactly as from the training checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from msad import storage
from msad.build import sliced_teacher_from_checkpoint
from msad.checkpoint import DIGEST_SUFFIX, load_checkpoint
from msad.deploy.export import export_checkpoint
from msad.models.teacher import MSADTeacher

SLICED_TEACHER_FILE = "teacher_sliced.pt"


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
    SHA-256 sidecar, so each node downloads it once (`msad.storage.local_copy`) and verifies it."""
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


def load_sliced_teacher(path: str | Path, device: torch.device | str = "cpu") -> MSADTeacher:
    """A frozen, eval-mode teacher from a sliced-teacher file, for ``run_frozen_teacher``."""
    return sliced_teacher_from_checkpoint(load_checkpoint(path), path).to(device)
