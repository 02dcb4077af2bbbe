"""The checkpoint file format: what a checkpoint holds, atomic writes, integrity checks and safe loading.

A checkpoint is a plain dict of tensors and primitives (`checkpoint_dict`) written with `torch.save` and read with
`torch.load(weights_only=True)`, so opening a file never runs code from it. A SHA-256 of the bytes is written
beside it; a truncated or altered file fails that check and is reported as corrupt instead of half-loading.

Only the file: turning one into a model is `msad.build`'s (`model_from_checkpoint`, `load_frozen_teacher`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from msad import storage
from msad.config import Config, config_from_dict
from msad.errors import UserError
from msad.files import file_sha256, read_tensor_file, write_atomically

CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"  # in the run's folder: its config, with what `auto` values resolved to
DIGEST_SUFFIX = ".sha256"

ROLES: tuple[str, ...] = ("teacher", "fcos", "student")  # what was trained (train.role); also the report's order
TRAINING_KIND = "training"  # the training loop's: every width's weights, optimizer, scheduler, history
STANDALONE_KIND = "standalone"  # a student without its teacher (an imported original student file)
SLICED_KIND = "sliced"  # a `pt` export: the model at its width only (`msad.deploy.export`)
KINDS: tuple[str, ...] = (TRAINING_KIND, STANDALONE_KIND, SLICED_KIND)


class CorruptCheckpointError(UserError):
    """The file exists but cannot be trusted: digest mismatch, truncated archive, or missing fields."""


def checkpoint_dict(kind: str, role: str, cfg: Config, model: dict[str, Any], iteration: int,
                    metrics: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """What every checkpoint kind holds, plus the kind's own ``fields`` (a training checkpoint's optimizer, ...).

    Args:
        kind: one of ``KINDS``.
        role: one of ``ROLES``.
        cfg: the config that rebuilds the model (its ``model.width`` is the checkpoint's width).
        model: the model's state dict.
        iteration: the training iteration the weights are from.
        metrics: the last evaluation's numbers (empty when there was none).
    """
    if kind not in KINDS or role not in ROLES:
        raise ValueError(f"kind must be one of {KINDS} and role one of {ROLES}, got {kind!r} and {role!r}")
    return {"version": CHECKPOINT_VERSION, "kind": kind, "role": role, "width": cfg.model.width,
            "iteration": int(iteration), "config": cfg.to_dict(), "model": model, "metrics": metrics, **fields}


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
