"""Small file helpers shared by checkpoints, weight files and caches."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from msad.errors import UserError


def cache_root() -> Path:
    """$MSAD_CACHE (default ~/.cache/msad): the node-local folder of everything msad can rebuild (annotation
    indexes, downloaded weights, compiled kernels), shared by every run on the node."""
    return Path(os.environ.get("MSAD_CACHE", "~/.cache/msad")).expanduser()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints and annotation files can be GBs)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` through a temp file beside it, synced and renamed over it: readers (and a run restarted after a
    crash) see the old file or the whole new one, never half a file. The temp file never outlives the call."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_tensor_file(path: Path, what: str, error: type[UserError] = UserError) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU -- opening a file never runs code from it -- with one-line
    errors naming `what` and the file: `error` for a file that exists but cannot be read (a checkpoint's caller
    passes its "corrupt" error, so it can skip to an older one), UserError for a missing file. A file of numpy
    arrays, which safe loading refuses, gets the command that re-saves it with tensors."""
    import torch  # here, not at the top: the annotation cache imports this module and needs only numpy

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        text = str(err).strip()
        if isinstance(err, pickle.UnpicklingError) and "numpy" in text:
            raise UserError(
                f"{path} holds numpy arrays, which safe loading (weights_only) refuses; if you trust the file, "
                "re-save it with tensors: torch.save({'model': {k: torch.as_tensor(v) for k, v in "
                "torch.load(src, weights_only=False)['model'].items()}}, dst)") from None
        first_line = text.splitlines()[0] if text else type(err).__name__
        raise error(f"{path}: unreadable {what} ({first_line})") from None
