"""Driver side of one training run: checks, `TorchTrainer` set-up, results.

Everything that can be checked before workers start is checked here (config, teacher file, dataset files), so a
mistake costs one line and no cluster time. Ray plumbing shared with sweeps (joining Ray, the shared-storage and
placement checks) is in `msad.engine.cluster`; training and evaluation in one process without Ray in
`msad.engine.in_process`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from msad import console, storage
from msad.build import (
    annotation_cache_dir,
    build_val_dataset,
    check_num_classes,
    check_teacher_for_student,
    resolve_data_paths,
)
from msad.checkpoint import CHECKPOINT_FILE, CONFIG_FILE
from msad.config import Config, check_ready_to_train, config_from_dict
from msad.data.coco_cache import load_annotations
from msad.data.paths import DataPaths
from msad.engine.cluster import check_shared_storage, check_workers_placeable, init_ray
from msad.engine.evaluate import METRIC_NAMES
from msad.engine.gpu import PreflightTorchConfig, gpu_error_line
from msad.engine.placement import release_leftovers, waiting_line, worker_resources
from msad.errors import RunFailedError, UserError

FINAL_METRICS_FILE = "final_metrics.json"


@dataclass
class RunResult:
    run_dir: str  # local path or storage URI
    metrics: dict[str, Any]
    checkpoint: str | None  # latest (local path or URI)
    best_checkpoint: str | None  # best by AP

    def summary(self) -> dict[str, Any]:
        keys = ("iteration", *METRIC_NAMES, "loss_total")
        return {"run_dir": self.run_dir, "checkpoint": self.checkpoint, "best_checkpoint": self.best_checkpoint,
                **{k: self.metrics[k] for k in keys if k in self.metrics}}


def prepare_run(cfg: Config) -> tuple[DataPaths, str]:
    """Validate everything a run needs on the driver; returns the data paths and the run directory."""
    check_ready_to_train(cfg)
    if cfg.train.role == "student":
        check_teacher_for_student(cfg)
    paths = resolve_data_paths(cfg.data)
    check_num_classes(cfg, build_val_dataset(cfg, paths))
    # the training annotations' cache, built here once (COCO train: 17 s, 2.3 GB) so that the workers on this node
    # only map it; workers on other nodes build their node's copy, one per node, under a file lock
    load_annotations(paths.train_annotations, annotation_cache_dir(cfg.data))
    run_dir = storage.join(storage.resolve(cfg.distributed.storage_path), cfg.distributed.run_name)
    saved = storage.join(run_dir, CONFIG_FILE)
    storage.check_reachable(run_dir)  # a wrong endpoint fails here in seconds, not after the retry window
    if storage.exists(saved):
        previous = config_from_dict(yaml.safe_load(storage.read_bytes(saved)))
        if cfg.train.amp == "auto":  # the workers wrote what auto resolved to; the run keeps it (msad.engine.loop)
            previous.train.amp = "auto"
        changed = _changed_keys(previous.to_dict(), cfg.to_dict())
        if changed:
            raise UserError(f"distributed.run_name: run {run_dir} exists with another config ({changed[0]}); "
                            "re-run with the same config to resume it, or choose a new distributed.run_name")
    storage.write_bytes(saved, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    return paths, run_dir


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def _worker_error_line(err: BaseException) -> str:
    """The failing worker's own exception line out of Ray's wrapped error text (rank 0's snippet first)."""
    text = str(err)
    snippets = re.split(r"\[Rank (\d+) Error Snippet\]:", text)
    by_rank = {int(snippets[i]): snippets[i + 1] for i in range(1, len(snippets) - 1, 2)}
    for rank in sorted(by_rank):
        lines = [line.strip() for line in by_rank[rank].splitlines() if line.strip()]
        if lines:
            return f"rank {rank}: {lines[-1]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


START_TIMEOUT_ENV_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait for one start of the workers
START_ATTEMPTS = 3


def _start_timed_out(err: BaseException) -> bool:
    """Whether Ray Train gave up because the workers' placement group was never ready (not a worker's error)."""
    failure = getattr(err, "controller_failure", None)
    return failure is not None and type(failure).__name__ == "WorkerGroupStartupTimeoutError"


TRAIN_POLL_ENV_VAR, TRAIN_POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
TRAIN_LOG = "train.log"  # beside the run's checkpoints: everything the progress bar does not show


def _local_log_file(run_dir: str, run_name: str) -> Path:
    """The run's log: in its folder, or for object-store runs in ./runs/<run_name> (uploaded when the run ends)."""
    return (Path("runs") / run_name if storage.is_uri(run_dir) else Path(run_dir)) / TRAIN_LOG


def fit(cfg: Config, address: str | None = None, callbacks: list[Any] | None = None,
        check_storage: bool = True, progress: bool = False,
        train_loop: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run one training with Ray Train. Re-running the same run_name (same config) resumes from its checkpoints.

    Args:
        cfg: validated config.
        address: Ray cluster address; None starts a local Ray.
        callbacks: Ray Train callbacks (a sweep passes Tune's TuneReportCallback).
        check_storage: check that every node sees distributed.storage_path (a sweep checks once for all trials).
        progress: show a progress bar and evaluations on `msad.console` (the `train` command; not inside sweeps);
            an active `msad.console.capture` then keeps its log as the run's `train.log`.
        train_loop: what each worker runs, called with {"config": ..., "data_paths": ...}; default
            `msad.engine.loop.train_loop_per_worker` (benchmarks pass one that wraps it, as Ray's trainers take
            `train_loop_per_worker`).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from msad.engine.loop import UNEVALUATED_SCORE, train_loop_per_worker

    storage.set_retry_window(cfg.distributed.storage_retry_s)
    paths, run_dir = prepare_run(cfg)
    init_ray(address)
    # Train V2's controller collects the workers' reports at each health-check poll (default every 2 s) and workers
    # wait in ray.train.report until it does: 0.5 s made a 6-step, report-every-step test run 1.6x faster (49.9 s ->
    # 31.4 s). Train passes the variable from this process to its controller and workers; the user's value wins.
    os.environ.setdefault(TRAIN_POLL_ENV_VAR, TRAIN_POLL_INTERVAL_S)
    if check_storage:
        check_shared_storage(cfg.distributed.storage_path)
    log = console.keep_log(_local_log_file(run_dir, cfg.distributed.run_name)) if progress else None
    if log:
        console.current().event(f"train {cfg.distributed.run_name}: {cfg.train.iterations} iterations on "
                                f"{cfg.distributed.num_workers} worker(s) in {run_dir}; Ray's messages: {log}")
    shown = None
    if progress:
        from msad.engine.progress import TrainProgress

        shown = TrainProgress(cfg.distributed.run_name, cfg.train.iterations)
    d = cfg.distributed
    resources = worker_resources(d)
    if check_storage:  # a sweep checks every trial before the first starts (on_head: its trial drivers)
        check_workers_placeable(f"run {d.run_name}", d)
        if address and (released := release_leftovers()):  # what stopped runs left on the cluster
            console.current().event(released)
    # Ray Train retries a worker group that cannot start without end: 3 starts of a third of the timeout each (one
    # more after a start that fails for a passing reason, a node lost while its workers came up), then the run fails
    os.environ[START_TIMEOUT_ENV_VAR] = f"{d.worker_start_timeout_s / START_ATTEMPTS:g}"
    storage_path, storage_filesystem = storage.ray_storage(d.storage_path)
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data_paths": {k: str(v) for k, v in asdict(paths).items()},
                           "run_dir": run_dir},
        torch_config=PreflightTorchConfig(backend="nccl" if d.use_gpu else "gloo"),  # nccl: GPU checked first
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=d.run_name,
            # an object store behind retries (uploads wait out an outage); a local path behind temp file + rename
            # (a controller killed mid-write leaves Train's checkpoint list whole)
            storage_path=storage_path, storage_filesystem=storage_filesystem,
            callbacks=[*(callbacks or []), *([shown.forwarder] if shown else [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per report per worker
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures,
                                                   controller_failure_limit=START_ATTEMPTS - 1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                         checkpoint_score_attribute="checkpoint_score",
                                                         checkpoint_score_order="max"),
        ),
    )
    try:
        with shown or contextlib.nullcontext():
            result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        where = f" (full log: {log})" if log else ""
        why = (waiting_line(d.num_workers, resources, d.worker_start_timeout_s) if _start_timed_out(err)
               else gpu_error_line(str(err)) or _worker_error_line(err))
        failure = RunFailedError(f"run {run_dir} failed: {why}{where}")
        failure.details = str(err)  # the full worker tracebacks, for logs
        raise failure from None
    finally:
        if log and storage.is_uri(run_dir):
            try:
                storage.write_bytes(storage.join(run_dir, TRAIN_LOG), log.read_bytes())
            except OSError as err:  # the run's own outcome (or failure) is what the caller needs to hear
                console.current().warn(f"{TRAIN_LOG} stays at {log}: {storage.first_line(err)}")
    def location(checkpoint: Any) -> str:
        return storage.join(storage.uri_for(checkpoint.path, run_dir), CHECKPOINT_FILE)

    latest = location(result.checkpoint) if result.checkpoint else None
    evaluated = [(m["checkpoint_score"], m["iteration"], c) for c, m in (result.best_checkpoints or [])
                 if m.get("checkpoint_score", UNEVALUATED_SCORE) > UNEVALUATED_SCORE]
    best = location(max(evaluated, key=lambda e: e[:2])[2]) if evaluated else latest  # ties: the newest
    metrics = dict(result.metrics or {})
    storage.write_bytes(storage.join(run_dir, FINAL_METRICS_FILE), json.dumps(
        {**metrics, "checkpoint": latest, "best_checkpoint": best}, indent=2, default=str).encode())
    return RunResult(run_dir, metrics, latest, best)
