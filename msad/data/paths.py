"""Where a dataset's two splits lie: the one description the driver resolves and every worker reads."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    """Image folders and instances files of both splits (what `CocoDetection` takes, per split)."""

    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path

    def complete(self) -> bool:
        """Every folder and file exists."""
        return all(path.exists() for path in astuple(self))
