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
# Dummy credentials for the S3 server that tests/test_cluster_runtime.py starts on 127.0.0.1 (moto): set before Ray
# starts so its workers inherit them. Not a real account; nothing here reaches a cloud.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "msad-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "msad-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray shared by every test that needs one (start-up costs seconds; pay it once)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the built-in dataset, so the session generates each spec once."""
    return tmp_path_factory.mktemp("msad_cache")
