"""Shared fixtures: one real local Ray for the whole session, offline W&B, small CPU threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray shared by every test that needs one (start-up costs seconds; pay it once)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the built-in dataset, so the session generates each spec once."""
    return tmp_path_factory.mktemp("msad_cache")
