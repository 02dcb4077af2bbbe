"""Shared fixtures: one real local Ray for the whole session, offline W&B, small CPU threads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from msad.config import Config, deep_merge, load_config

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Dummy credentials for the S3 server that the s3_bucket fixture starts on 127.0.0.1 (moto): set before Ray
# starts so its workers inherit them. Not a real account; nothing here reaches a cloud.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "msad-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "msad-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Fault injection (msad.engine.loop._inject_fault) reads this in the Train workers, whose environment is the one Ray
# started with: set before the session's Ray starts. Tests drop `<run_name>.fail-at-<iteration>` files into it.
FAULT_DIR = Path(os.environ.setdefault("MSAD_FAULT_DIR", f"/tmp/msad-faults-{os.getpid()}"))
FAULT_DIR.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)


@contextmanager
def terminal_to_file(path: Path) -> Iterator[None]:
    """Point this process's standard output and error (descriptors 1 and 2) at `path`, as a shell redirect does
    for a command: what an in-process run prints "to the terminal" lands there."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("a") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray shared by every test that needs one (start-up costs seconds; pay it once)."""
    import ray

    from msad.engine.cluster import API_SERVER_ENV_VAR, start_local_ray

    start_local_ray(num_cpus=4, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.pop(API_SERVER_ENV_VAR, None)


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the built-in dataset, so the session generates each spec once."""
    return tmp_path_factory.mktemp("msad_cache")


def make_tiny_config(tmp: Path, cache: Path, role: str, name: str, *extra: str) -> Config:
    """A config small enough for a few seconds per Ray run: 24 train / 6 val images, batch 2, 6 iterations."""
    return load_config(REPO / "configs" / "cpu_base.yaml", [
        f"train.role={role}", f"distributed.run_name={name}", f"distributed.storage_path={tmp}",
        f"data.shapes.cache_dir={cache}", "data.shapes.num_train=24", "data.shapes.num_val=6",
        "data.shapes.image_size=[96,128]", "data.shapes.object_size=[8,40]", "data.train_short_sides=[128]",
        "data.test_short_side=128", "data.num_workers=0", "model.fpn_channels=32", "model.gn_groups=8",
        "train.iterations=6", "train.batch_per_worker=2", "train.lr_steps=[5]", "train.warmup_iters=2",
        "train.checkpoint_period=2", "train.eval_period=6", "train.log_period=1", "train.kd_warmup_iters=2",
        "distributed.num_workers=2", "distributed.max_failures=0",
        "train.amp=off",  # fp32: the tests' numbers must not depend on whether this CPU has native bf16
        *extra])


@pytest.fixture(scope="session")
def tiny_config():
    """The factory of tiny run configs (see make_tiny_config)."""
    return make_tiny_config


@pytest.fixture(scope="session")
def teacher_run(ray_session: None, tmp_path_factory: pytest.TempPathFactory, shapes_cache: Path):
    """One tiny teacher trained with 2 Ray workers, shared by the tests that need a trained teacher."""
    from msad.engine.trainer import fit

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = make_tiny_config(tmp, shapes_cache, "teacher", "teacher")
    return cfg, fit(cfg)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (a Ray started by a process runs under it)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        found += frontier
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """A bucket on a moto S3 server bound to 127.0.0.1 (a real S3-speaking server); yields a storage URI in it."""
    from msad import storage

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"s3://msad-test/runs?endpoint_override=http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                fs, _ = storage.filesystem(uri + "&allow_bucket_creation=true")
                fs.create_dir("msad-test")
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto S3 server did not start")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def tiny_sweep(tmp: Path, cache: Path, name: str, body: dict, iterations: int = 4, config: dict | None = None) -> Path:
    """A sweep file over tiny configs: 24 train / 6 val images at 128 px, batch 2, 1 Ray worker per trial, storage
    in tmp/runs; `config` is merged into the sweep's `config` section, `body` adds the sweep's other keys."""
    spec = {
        "name": name,
        "base": str(REPO / "configs" / "cpu_base.yaml"),
        "config": deep_merge({
            "model": {"fpn_channels": 32, "gn_groups": 8},
            "data": {"shapes": {"num_train": 24, "num_val": 6, "image_size": [96, 128], "object_size": [8, 40],
                                "cache_dir": str(cache)},
                     "train_short_sides": [128], "test_short_side": 128, "num_workers": 0},
            "train": {"iterations": iterations, "batch_per_worker": 2, "lr_steps": [iterations - 1],
                      "warmup_iters": 1, "checkpoint_period": 2, "eval_period": iterations, "log_period": 1,
                      "kd_warmup_iters": 2},
            "distributed": {"storage_path": str(tmp / "runs"), "max_failures": 0},
            "tracking": {"mode": "offline"},
        }, config or {}),
        **body,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def weights_difference(a: str | Path, b: str | Path) -> float:
    """The largest absolute difference between two checkpoints' weights (every tensor, BN statistics included)."""
    from msad.checkpoint import load_checkpoint

    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first
               if first[k].is_floating_point() and first[k].numel())


def wait_until(check, timeout: float, what: str, poll: float = 0.2) -> float:
    """Poll `check` until it holds; the seconds it took. Raises TimeoutError naming `what` after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - start


def wandb_steps(run_dir: Path) -> list[int]:
    """The steps of an offline W&B run folder's history, in the order logged (read by wandb's own `leet inspect`)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    records = [json.loads(line) for line in out.splitlines()]
    return [r["history"]["item"]["_step"] for r in records if r["type"] == "history"]


def train_undisturbed(config_file: Path, run_dir: Path) -> None:
    """Train a run's config (its config.yaml: `auto` values resolved) in this process, without Ray or faults, with
    as many torch threads as Ray gives each of its workers (CPU sums depend on the thread count); every checkpoint
    lands in `run_dir`. The reference of the exact-resume tests."""
    import torch

    from msad.build import resolve_data_paths
    from msad.config import config_from_dict
    from msad.engine.in_process import LocalContext
    from msad.engine.loop import run_training

    cfg = config_from_dict(yaml.safe_load(config_file.read_text()))
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.distributed.cpus_per_worker))
    try:
        run_training(cfg, resolve_data_paths(cfg.data), LocalContext(torch.device("cpu"), run_dir=run_dir))
    finally:
        torch.set_num_threads(threads)
