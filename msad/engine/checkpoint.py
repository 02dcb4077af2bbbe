"""Checkpoint files: atomic writes, integrity checks, safe loading, teacher checks and standalone student export.

A checkpoint is a plain dict of tensors and primitives written with `torch.save` and read with
`torch.load(weights_only=True)`, so opening a file never runs code from it. A SHA-256 of the bytes is written
beside it; a truncated or altered file fails that check and is reported as corrupt instead of half-loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from msad.config import Config, config_from_dict
from msad.engine import storage
from msad.errors import UserError
from msad.files import file_sha256, read_tensor_file, write_atomically

CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"  # in the run's folder: its config, with what `auto` values resolved to
DIGEST_SUFFIX = ".sha256"


class CorruptCheckpointError(UserError):
    """The file exists but cannot be trusted: digest mismatch, truncated archive, or missing fields."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` via a temp file + rename (a crash never leaves a half file under the real name)."""
    path = Path(path)
    write_atomically(path, lambda f: torch.save(state, f))
    digest = file_sha256(path)
    write_atomically(path.with_name(path.name + DIGEST_SUFFIX), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU (local path or storage URI), verifying its digest when one was written beside it."""
    if storage.is_uri(path):
        if not storage.exists(str(path)):
            raise UserError(f"{path}: checkpoint not found")
        path = storage.local_copy(str(path), sidecars=(DIGEST_SUFFIX,))
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    digest_file = path.with_name(path.name + DIGEST_SUFFIX)
    if digest_file.is_file():
        expected = digest_file.read_text().split()[0]
        if file_sha256(path) != expected:
            raise CorruptCheckpointError(f"{path}: corrupt checkpoint (SHA-256 differs from {digest_file.name})")
    state = read_tensor_file(path, "checkpoint", CorruptCheckpointError)
    if not isinstance(state, dict) or "model" not in state:
        raise CorruptCheckpointError(f"{path}: not an msad checkpoint (no 'model' entry)")
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path) -> Config:
    """The config a checkpoint was trained with."""
    if "config" not in state or "role" not in state:
        raise UserError(f"{path}: not an msad training checkpoint (no config/role); convert original MSAD files "
                        "with msad.models.convert first")
    return config_from_dict(state["config"])


def check_teacher_for_student(cfg: Config) -> Config:
    """Fail before any worker starts if a student's teacher file is missing, not a teacher, or of another shape.

    Returns the teacher's own config (needed to rebuild it).
    """
    path = cfg.train.teacher_checkpoint or ""
    if not path:
        raise UserError("train.teacher_checkpoint: a student needs its trained teacher's checkpoint (got null)")
    state = load_checkpoint(path)
    teacher_cfg = checkpoint_config(state, path)
    if state["role"] != "teacher":
        raise UserError(f"{path}: train.teacher_checkpoint must be a teacher checkpoint, this one is a "
                        f"{state['role']!r} checkpoint")
    if teacher_cfg.model.width != cfg.model.width:
        raise UserError(f"{path}: teacher width {teacher_cfg.model.width} differs from model.width "
                        f"{cfg.model.width}; MSAD distils between equal widths (no projector)")
    for key in ("width_list", "fpn_channels", "head_convs", "gn_groups", "num_classes"):
        # a sliced teacher holds one width; the widths it was cut from are what the student must share
        theirs = state.get("source_width_list", teacher_cfg.model.width_list) if key == "width_list" else getattr(
            teacher_cfg.model, key)
        if theirs != getattr(cfg.model, key):
            raise UserError(f"{path}: teacher model.{key}={theirs} differs from the student's "
                            f"model.{key}={getattr(cfg.model, key)}")
    return teacher_cfg


def export_standalone_student(checkpoint: str | Path, output: str | Path) -> Path:
    """A student for deployment: ``launch.py export``'s ``pt`` format (``msad.deploy.export_checkpoint``).

    Weights at the student's width only (no other widths, no teacher, no optimizer) and the config that rebuilds
    them, checked against the training model before it is written.
    """
    from msad.deploy.export import export_checkpoint

    return export_checkpoint(checkpoint, output, "pt", roles=("student",)).path


def import_original_checkpoint(original: str | Path, cfg: Config, output: str | Path) -> Path:
    """Turn an original MSAD (Detectron2) .pth file into an msad checkpoint that `eval` and students can use.

    The config describes the model (width, channels, classes) and is checked against the weights: the width is read
    from the file and must equal model.width; every key is mapped and shape-checked when the model loads.
    A student file becomes a standalone student (the teacher inside it is dropped); a teacher file a teacher.
    """
    from msad.build import build_model
    from msad.models.convert import infer_width, load_original

    output = Path(output)
    if output.exists():
        raise UserError(f"{output}: already exists; choose another --output (nothing was overwritten)")
    converted = load_original(original, fold_input=cfg.data.input_format == "rgb_imagenet")
    weights = converted.student if converted.role == "student" else converted.teacher
    width = infer_width(weights)
    if width != cfg.model.width:
        raise UserError(f"{original}: trained at width {width:g}, but model.width is {cfg.model.width:g}")
    data = cfg.to_dict()
    data["train"]["role"] = converted.role
    data["model"]["fusion"] = any(k.startswith("fusion.") for k in weights) or converted.role == "student"
    model_cfg = config_from_dict(data)
    model = build_model(model_cfg, load_pretrained=False)  # every weight comes from the original file
    from msad.models.state import load_state_strictly

    load_state_strictly(model, weights, str(original))
    return save_checkpoint({
        "version": CHECKPOINT_VERSION, "role": converted.role,
        "kind": "standalone" if converted.role == "student" else "training", "width": width, "iteration": 0,
        "config": model_cfg.to_dict(), "model": model.state_dict(), "metrics": {}, "source": str(original),
    }, output)

