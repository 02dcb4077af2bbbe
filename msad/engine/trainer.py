"""Driver side of one training run: checks, Ray start-up, `TorchTrainer` set-up, results, evaluation of a file.

Everything that can be checked before workers start is checked here (config, teacher file, dataset files), so a
mistake costs one line and no cluster time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from msad import console, storage
from msad.build import (
    annotation_cache_dir,
    build_val_dataset,
    check_num_classes,
    check_teacher_for_student,
    model_from_checkpoint,
    resolve_data_paths,
)
from msad.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, checkpoint_config, load_checkpoint
from msad.config import Config, DistributedConfig, check_ready_to_train, config_from_dict
from msad.data.coco_cache import load_annotations
from msad.data.paths import DataPaths
from msad.engine.evaluate import METRIC_NAMES
from msad.engine.gpu import PreflightTorchConfig, gpu_error_line
from msad.engine.placement import (
    cluster_shapes,
    release_leftovers,
    unplaceable,
    waiting_line,
    worker_resources,
)
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


ADDRESS_FORMS = "'auto', 'ray://HOST:PORT' (Ray client) or HOST:PORT (the cluster's GCS, e.g. 10.0.0.1:6379)"
CONNECT_TIMEOUT_S = 5.0


def check_address(address: str) -> None:
    """Refuse a malformed or unreachable `--address` in one line, in seconds (before Ray's own long retries)."""
    if address == "auto":  # Ray finds the cluster on this machine (or RAY_ADDRESS); it says at once if there is none
        return
    match = re.fullmatch(r"(ray://)?(\[[0-9A-Fa-f:]+\]|[^:/\s\[\]]+):(\d{1,5})", address)
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise UserError(f"--address {address}: invalid address; expected {ADDRESS_FORMS}")
    host, port = match.group(2).strip("[]"), int(match.group(3))
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror:
        raise UserError(f"--address {address}: unknown host {host!r}") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"--address {address}: no Ray cluster answers at {host}:{port} ({reason}); start it "
                        "(`ray start --head` / `ray up`) or check the address") from None


def init_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a private local Ray (bound to localhost) when none is given.

    No address means a new Ray of our own even when another one runs on this machine (a cluster head started with
    `ray start --head`, or a second msad run): plain `ray.init()` would join that one, and refuse our resources.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--address {address}: cannot join a Ray cluster ({first})") from None
        return
    # One logical CPU more than the cores: Tune's and Train's driver actors hold a sliver each but sit idle.
    start_local_ray(num_cpus=(os.cpu_count() or 1) + 1)


API_SERVER_ENV_VAR = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients go (else: the one Ray on this machine)


def start_local_ray(num_cpus: int, **init_args: Any) -> None:
    """Start a private local Ray whose own processes find its dashboard even when other Rays run on this machine.

    Ray Train's placement-group cleaner (a detached actor that frees a run's CPUs when its controller dies, e.g. a
    trial ASHA stops) asks Ray's State API, which without an address looks for "the" Ray of this machine and fails
    with "Found multiple active Ray instances" when there are two: the stopped trial's CPUs stayed reserved, and
    the sweep waited forever. The dashboard (the State API's server) gets a port chosen here, on localhost only, and
    `RAY_API_SERVER_ADDRESS` names it to every process of this Ray (they inherit this process's environment).

    Args:
        num_cpus: logical CPUs of the local Ray.
        init_args: more `ray.init` arguments (tests: log_to_driver, configure_logging).
    """
    import ray

    with socket.socket() as probe:  # a port free now; Ray binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ[API_SERVER_ENV_VAR] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, **init_args)


STORAGE_CHECK_TIMEOUT_S = 60.0


@dataclass
class StorageProbe:
    """Nodes (id -> "address (id)") that did not see the driver's marker file, and those that gave no answer in
    time or left while answering."""

    blind: dict[str, str]
    silent: dict[str, str]


def probe_shared_storage(location: str, node_ids: list[str] | None = None,
                         timeout: float = STORAGE_CHECK_TIMEOUT_S) -> StorageProbe:
    """Ask nodes whether they see a marker file the driver writes under `location` (a path; URIs are shared).

    Args:
        location: distributed.storage_path (a local or NFS path).
        node_ids: the nodes to ask (default: every alive node).
        timeout: how long to wait for answers; a node that is still joining, or is leaving, may not answer.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    targets = {node: alive[node] for node in (node_ids if node_ids is not None else alive) if node in alive}
    if storage.is_uri(location) or not targets:
        return StorageProbe({}, {})
    root = Path(storage.resolve(location))
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".msad-shared-check-{os.getpid()}-{time.monotonic_ns()}"
    marker.write_text("msad")

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str) -> bool:
        return Path(path).is_file()

    try:
        refs = {sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker)):
                node for node in targets}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        label = {node: f"{address} ({node[:12]})" for node, address in targets.items()}
        blind, silent = {}, {refs[r]: label[refs[r]] for r in pending}
        for ref in ready:
            node = refs[ref]
            try:
                if not ray.get(ref):
                    blind[node] = label[node]
            except ray.exceptions.RayError:  # the node went away while answering
                silent[node] = label[node]
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        marker.unlink(missing_ok=True)
    return StorageProbe(blind, silent)


def check_shared_storage(location: str, what: str = "distributed.storage_path") -> list[str]:
    """On a multi-node cluster, refuse a storage path that some node cannot see (before any trial starts).

    Object-store URIs are shared by construction. For a path, the driver writes a marker file and a task pinned to
    every alive node looks for it: an NFS mount passes, a head-local folder fails, naming the first blind node.
    A node that does not answer in time (joining, or leaving in an autoscaling event) is reported, not fatal: it
    runs no trial yet, and `SharedStorageWatch` checks nodes again as they join. Returns the node ids checked.
    """
    import ray

    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if storage.is_uri(location) or len(alive) < 2:
        return alive
    probe = probe_shared_storage(location, alive)
    if probe.blind:
        root, first = storage.resolve(location), next(iter(probe.blind.values()))
        raise UserError(f"{what}: {root} is not shared by every node (node {first} cannot see it); use a path "
                        "mounted alike on every node (NFS) or s3://bucket/prefix")
    if probe.silent:
        console.current().warn(f"{what}: node(s) {', '.join(probe.silent.values())} did not answer the "
                               f"shared-storage check in {STORAGE_CHECK_TIMEOUT_S:.0f} s (joining or leaving?); they "
                               "are checked again when they are up")
    return alive


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


def check_workers_placeable(what: str, distributed: DistributedConfig, on_head: dict[str, float] | None = None) -> None:
    """Refuse, in one line, workers that no node of the connected cluster (or of its autoscaler's node types) can
    ever hold: Ray would wait for them forever (`msad.engine.placement`).

    Args:
        what: the run or trial, as the line names it.
        distributed: the run's distributed section.
        on_head: what else the run keeps on the head (a sweep's trial driver).
    """
    line = unplaceable(what, distributed.num_workers, worker_resources(distributed), on_head or {}, cluster_shapes())
    if line:
        raise UserError(line)


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
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data_paths": {k: str(v) for k, v in asdict(paths).items()},
                           "run_dir": run_dir},
        torch_config=PreflightTorchConfig(backend="nccl" if d.use_gpu else "gloo"),  # nccl: GPU checked first
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=d.run_name,
            storage_path=storage.resolve(d.storage_path),
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
            storage.write_bytes(storage.join(run_dir, TRAIN_LOG), log.read_bytes())
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


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation of a checkpoint file (teacher, student, standalone student or plain FCOS)
# ---------------------------------------------------------------------------------------------------------------------


class LocalContext:
    """WorkerContext of a single process (no Ray): used for `eval` and by benchmarks to run the plain loop."""

    def __init__(self, device: torch.device | None = None, run_dir: Path | None = None) -> None:
        self.rank, self.world_size = 0, 1
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.run_dir = run_dir
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: Any) -> Any:
        return loader

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.run_dir is not None:
            import shutil

            shutil.copytree(checkpoint_dir, self.run_dir / f"checkpoint_{iteration:07d}", dirs_exist_ok=True)

    def restore_candidates(self) -> Iterator[Path]:
        if self.run_dir is None:
            return iter(())
        return iter(sorted(self.run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), reverse=True))


def evaluate_checkpoint(cfg: Config, weights: str, output_dir: Path, branch: str = "fused") -> dict[str, float]:
    """COCO AP of a checkpoint on the val set of `cfg`'s data, in this process (GPU when there is one).

    The model is rebuilt from the checkpoint's own config (role, width, channels); `cfg` supplies the data.
    A student (or standalone student) is evaluated with no teacher in memory. Detections, bootstrap replicates and
    metrics (with intervals) are written into `output_dir`.
    """
    from msad.engine.loop import BOOTSTRAP_FILE, RESULTS_FILE, evaluate

    state = load_checkpoint(weights)
    model_cfg = checkpoint_config(state, weights)
    saved = model_cfg.to_dict()
    saved["train"]["bootstrap_samples"] = cfg.train.bootstrap_samples  # how to evaluate is the caller's choice
    run_cfg = config_from_dict({**saved, "data": cfg.to_dict()["data"]})
    paths = resolve_data_paths(run_cfg.data)
    val_set = build_val_dataset(run_cfg, paths)
    check_num_classes(run_cfg, val_set)
    model, _ = model_from_checkpoint(state, weights, cfg=run_cfg)  # every weight from the checkpoint, strictly
    ctx = LocalContext()
    model.to(ctx.device)
    output_dir.mkdir(parents=True, exist_ok=True)
    chosen = branch if branch in model.branches else None  # a model with one output ignores it
    metrics = evaluate(model, val_set, run_cfg, ctx, output_json=output_dir / RESULTS_FILE, branch=chosen,
                       bootstrap_json=output_dir / BOOTSTRAP_FILE)
    metrics = {**metrics, "role": state["role"], "width": state["width"], "iteration": state["iteration"],
               "branch": branch if state["role"] == "teacher" else "student"}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

