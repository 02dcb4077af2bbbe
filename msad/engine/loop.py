"""The one training loop, for every role, run by every Ray Train worker.

`train_loop_per_worker(config)` is what `TorchTrainer` calls; `run_training(cfg, data_paths, ctx)` is the loop
itself, written against a small `WorkerContext` so the same code also runs in one plain process (benchmarks,
debugging). The loop knows no role: `msad.build.build_trainable` gives it a `msad.models.trainable.Trainable`
(a plain detector, a teacher, or a `Distiller` holding a student and its frozen teacher) that owns its forward,
its per-step schedules and the branches it is evaluated on; the loop steps, reports, evaluates and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

import msad
from msad import storage
from msad.build import (
    build_lr_scheduler,
    build_optimizer,
    build_train_dataset,
    build_trainable,
    build_val_dataset,
)
from msad.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    TRAINING_KIND,
    CorruptCheckpointError,
    checkpoint_dict,
    load_checkpoint,
    save_checkpoint,
)
from msad.config import Config, config_from_dict
from msad.data.coco import CocoDetection
from msad.data.paths import DataPaths
from msad.data.transforms import Batch, Collate
from msad.engine.compilation import choose_compile, has_cpp_compiler, use_shared_compile_cache
from msad.engine.data import EpochSeededDataset, GroupedDistributedSampler, same_padding_batches, shard_indices
from msad.engine.evaluate import coco_evaluate, to_coco_results
from msad.engine.precision import Precision, choose_amp, device_facts
from msad.models.state import load_state_strictly
from msad.models.trainable import Trainable, loss_terms

RESULTS_FILE = "coco_results.json"
BOOTSTRAP_FILE = "bootstrap.json"  # per-resample AP, AP50, APs of the evaluation (msad.engine.bootstrap.Replicates)
UNEVALUATED_SCORE = -1.0  # below any AP (0..1)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; raised before the optimizer step so no weight (or checkpoint) is spoiled."""


class WorkerContext(Protocol):
    """What the loop needs from its runtime (Ray Train worker, or one plain process)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None: ...

    def restore_candidates(self) -> Iterator[Path]: ...


@dataclass
class TrainState:
    """Everything that must survive a restart besides the weights."""

    iteration: int = 0
    best_ap: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)  # every report's numbers (the loss curve)
    resumed_from: list[int] = field(default_factory=list)  # iterations this run restarted from (provenance)

    @property
    def latest_ap(self) -> float | None:
        """AP of the most recent evaluation (progress tables show it between evaluations)."""
        return next((h["AP"] for h in reversed(self.history) if "AP" in h), None)


def unwrap(model: nn.Module) -> Trainable:
    """The model inside DDP (DDP's own forward would try to sync gradients during evaluation)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def branch_file(filename: str, branch: str | None) -> str:
    """Where an evaluation of a model's extra branch writes `filename` (coco_results_high.json for "high")."""
    return filename.replace(".json", f"_{branch}.json") if branch else filename


def with_precision(cfg: Config, device: torch.device, pinned: str | None = None) -> tuple[Config, Precision]:
    """`cfg` with `train.amp` resolved for `device` (`msad.engine.precision.choose_amp`); `pinned` is the value a
    resumed run's checkpoint was trained with, which it keeps (a run never changes arithmetic half-way, even on
    other hardware: the warning says so when that hardware emulates it)."""
    precision = choose_amp(pinned or cfg.train.amp, device_facts(device))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=precision.amp)), precision


def _autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision as resolved (`with_precision`): bf16 on GPUs and CPUs, fp16 on GPUs only (config validation
    refuses it elsewhere). Losses and decoding cast to fp32 themselves."""
    if cfg.train.amp == "auto":
        cfg, _ = with_precision(cfg, device)
    if cfg.train.amp == "off" or (cfg.train.amp == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_finite(losses: dict[str, Tensor], iteration: int) -> None:
    values = torch.stack([v.detach().float() for v in losses.values()])
    if not bool(torch.isfinite(values).all()):
        bad = [f"{k}={v.item()}" for k, v in losses.items() if not math.isfinite(v.item())]
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: {', '.join(bad)}; lower train.base_lr "
                                 "or enable train.grad_clip")


def _mean_over_workers(sums: dict[str, Tensor], count: int, ctx: WorkerContext) -> dict[str, float]:
    """Average logged loss terms over the window and over workers (one collective per report)."""
    names = sorted(sums)
    stacked = torch.stack([sums[n] for n in names]).to(ctx.device) / max(count, 1)
    if ctx.world_size > 1:
        dist.all_reduce(stacked)
        stacked /= ctx.world_size
    return dict(zip(names, stacked.tolist(), strict=True))


def with_batch_norm_sync(model: nn.Module, cfg: Config, device: torch.device, world_size: int) -> nn.Module:
    """SyncBatchNorm across GPUs when training on several and `train.sync_bn` (per-GPU batches are small); plain BN
    otherwise, and always on CPU (gloo), where SyncBatchNorm cannot run."""
    if device.type == "cuda" and world_size > 1 and cfg.train.sync_bn:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def evaluate(model: nn.Module, dataset: CocoDetection, cfg: Config, ctx: WorkerContext,
             output_json: Path | None = None, branch: str | None = None,
             bootstrap_json: Path | None = None, intervals: bool = True, with_loss: bool = False) -> dict[str, float]:
    """COCO box AP of `model` on `dataset`, with bootstrap intervals (`train.bootstrap_samples`) unless `intervals`
    is False; inference is split across workers and gathered on rank 0. `branch` picks one of the model's
    outputs (a teacher's "high", ...); None is its own output. `with_loss` adds "val_loss": the model's
    `validation_losses` summed per batch, averaged over batches weighted by their image counts.

    Batches hold images of one padded size (`same_padding_batches`), so every image's detections are what it gets
    alone, whatever the batch size. Every rank returns the same metrics (rank 0 broadcasts them). Rank 0 writes
    the detections to `output_json` and the per-resample metrics to `bootstrap_json` (when given).
    """
    module = unwrap(model)
    was_training = module.training
    module.eval()
    d = cfg.data
    batches = same_padding_batches(dataset.image_sizes(), shard_indices(len(dataset), ctx.rank, ctx.world_size),
                                   cfg.train.batch_per_worker, d.test_short_side, d.max_size, d.size_divisibility)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=d.num_workers,
                        collate_fn=Collate(d.size_divisibility))
    results: list[dict[str, Any]] = []
    loss_sum = torch.zeros(2, dtype=torch.float64)  # sum over images of the per-batch loss, images
    # eager even where training compiled the network: evaluation's shapes and inference mode would compile new graphs
    with torch.inference_mode(), _autocast(cfg, ctx.device), torch.compiler.set_stance("force_eager"):
        for batch in loader:
            batch = batch.to(ctx.device)
            if with_loss:
                terms = module.validation_losses(batch.images, batch.targets)
                loss_sum += torch.tensor([float(sum(terms.values())) * len(batch.targets), len(batch.targets)],
                                         dtype=torch.float64)
            detections = module.predict(batch.images, batch.image_sizes, branch)
            detections = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()}
                          for d in detections]
            results.extend(to_coco_results(detections, batch.targets, dataset.contiguous_to_category_id))
    if ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (results, loss_sum.tolist()))
        results = [r for part, _ in gathered for r in part]
        loss_sum = torch.tensor([sums for _, sums in gathered], dtype=torch.float64).sum(0)
    metrics: list[Any] = [None]
    if ctx.rank == 0:
        metrics[0] = coco_evaluate(dataset.coco, results, image_ids=dataset.image_ids, output_json=output_json,
                                   bootstrap_samples=cfg.train.bootstrap_samples if intervals else 0,
                                   bootstrap_json=bootstrap_json)
    if ctx.world_size > 1:
        dist.broadcast_object_list(metrics, src=0)
    module.train(was_training)
    if with_loss and loss_sum[1] > 0:
        return {**metrics[0], "val_loss": float(loss_sum[0] / loss_sum[1])}
    return metrics[0]


def _evaluate_branches(model: nn.Module, val_set: CocoDetection, cfg: Config, ctx: WorkerContext,
                       out: Path | None, final: bool) -> dict[str, float]:
    """The metrics of every branch the model names (`Trainable.evaluation_branches`): its own output, and e.g. a
    fusing teacher's H branch under "H_" keys, so the report can tell what C-FF adds. Rank 0 writes detections and,
    at the `final` evaluation (the one the report pairs), bootstrap replicates into `out` (RESULTS_FILE,
    BOOTSTRAP_FILE; `branch_file` names an extra branch's); earlier ones are point estimates (the fast evaluator,
    no resampling)."""
    metrics: dict[str, float] = {}
    for prefix, branch in unwrap(model).evaluation_branches().items():
        extra = branch if prefix else None
        files = {"output_json": out / branch_file(RESULTS_FILE, extra) if out else None,
                 "bootstrap_json": out / branch_file(BOOTSTRAP_FILE, extra) if out else None}
        found = evaluate(model, val_set, cfg, ctx, branch=branch, intervals=final,
                         with_loss=cfg.train.eval_loss and not prefix, **files)
        metrics.update({f"{prefix}{k}": v for k, v in found.items()})
    return metrics


FAULT_DIR_ENV_VAR = "MSAD_FAULT_DIR"  # tests only: see _inject_fault


def _inject_fault(run_name: str, iteration: int) -> None:
    """Fault injection from outside, for tests of restarts: when the workers' environment names a folder in
    MSAD_FAULT_DIR and it holds `<run_name>.fail-at-<iteration>`, the worker that removes that file raises; with
    `<run_name>.kill-at-<iteration>` it SIGKILLs itself, as the kernel's OOM killer or a lost machine ends a worker
    (once: the file is gone for the restarted workers). Unset in every real run: one dictionary lookup per step."""
    folder = os.environ.get(FAULT_DIR_ENV_VAR)
    if not folder:
        return
    for fault in ("fail", "kill"):
        try:
            (Path(folder) / f"{run_name}.{fault}-at-{iteration}").unlink()
        except FileNotFoundError:
            continue
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at iteration {iteration}")


def _restore(ctx: WorkerContext) -> tuple[dict[str, Any] | None, Path | None]:
    """Newest readable checkpoint; a corrupt one is skipped with a warning naming it."""
    for candidate in ctx.restore_candidates():
        try:
            return load_checkpoint(candidate), candidate
        except CorruptCheckpointError as err:
            warnings.warn(f"skipping corrupt checkpoint, using the previous one: {err}", stacklevel=2)
    return None, None


def run_training(cfg: Config, data_paths: DataPaths, ctx: WorkerContext, run_dir: str | None = None) -> TrainState:
    """Train `cfg.train.role` for `cfg.train.iterations`, reporting metrics and checkpoints through `ctx`.

    Args:
        cfg: the run's validated config; `train.amp: auto` is resolved here, on the worker's own device.
        data_paths: dataset files (resolved once by the driver, so workers never generate data concurrently).
        ctx: the runtime (rank, device, DDP and data-loader preparation, reporting, restore candidates).
        run_dir: the run's folder (local or a URI), where rank 0 rewrites config.yaml with the resolved values.
    """
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    train_set = build_train_dataset(cfg, data_paths)
    val_set = build_val_dataset(cfg, data_paths)

    model = build_trainable(cfg, ctx.device)
    checkpoint, checkpoint_path = _restore(ctx)
    pinned = checkpoint["config"]["train"]["amp"] if checkpoint is not None else None
    cfg, precision = with_precision(cfg, ctx.device, pinned)
    if ctx.world_size > 1:  # one arithmetic for the whole run: rank 0's (another node's CPU may differ)
        chosen: list[Any] = [precision.amp]
        dist.broadcast_object_list(chosen, src=0)
        if chosen[0] != precision.amp:
            cfg, precision = with_precision(cfg, ctx.device, chosen[0])
    t = cfg.train
    if ctx.rank == 0:
        if precision.warning:
            warnings.warn(precision.warning, stacklevel=1)
        if run_dir is not None:  # the run's config.yaml names the arithmetic it really used
            storage.write_bytes(storage.join(run_dir, CONFIG_FILE),
                                yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    state = TrainState()
    if checkpoint is not None:
        load_state_strictly(model, checkpoint["model"], str(checkpoint_path))
        model.load_training_state(checkpoint)
        state = TrainState(checkpoint["iteration"], checkpoint["best_ap"], list(checkpoint["history"]),
                           [*checkpoint["resumed_from"], checkpoint["iteration"]])
    model = ctx.prepare_model(with_batch_norm_sync(model, cfg, ctx.device, ctx.world_size))
    compiled = choose_compile(t.compile, t.iterations - state.iteration, ctx.device.type, t.amp, has_cpp_compiler())
    if compiled.enabled:
        use_shared_compile_cache()
        unwrap(model).compile_network()
    if ctx.rank == 0:
        print(f"{precision.line()}; {compiled.line()}", flush=True)
        # which copy of the code this worker runs (a job's --working-dir, or an installed msad): for logs and tests
        print(f"msad code: {Path(msad.__file__).parent}", flush=True)
    optimizer = build_optimizer(cfg, unwrap(model))
    scheduler = build_lr_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16" and ctx.device.type == "cuda")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if ctx.rank == 0:
            print(f"resumed from {checkpoint_path} at iteration {state.iteration}", flush=True)

    seeded = EpochSeededDataset(train_set, t.seed)
    sampler = GroupedDistributedSampler(train_set.landscape(), t.batch_per_worker, ctx.world_size, ctx.rank,
                                        seed=t.seed)
    loader = ctx.prepare_loader(DataLoader(
        seeded, batch_size=t.batch_per_worker, sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=Collate(cfg.data.size_divisibility), drop_last=True, pin_memory=ctx.device.type == "cuda"))
    per_epoch = sampler.batches_per_epoch

    model.train()
    sums: dict[str, Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    while state.iteration < t.iterations:
        epoch, offset = divmod(state.iteration, per_epoch)
        seeded.epoch = epoch
        sampler.set_epoch(epoch)
        sampler.set_start(offset)
        for batch in loader:
            if state.iteration >= t.iterations:
                break
            _inject_fault(cfg.distributed.run_name, state.iteration)
            outputs = train_step(model, batch.to(ctx.device), cfg, ctx, optimizer, scaler, state.iteration)
            scheduler.step()
            unwrap(model).advance()
            state.iteration += 1
            window_steps += 1
            for name, value in outputs.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()

            is_last = state.iteration == t.iterations
            save_now = state.iteration % t.checkpoint_period == 0 or is_last
            if state.iteration % t.log_period == 0 or save_now:
                elapsed = time.perf_counter() - window_start
                metrics = _mean_over_workers(sums, window_steps, ctx)
                metrics["loss_total"] = sum(v for k, v in metrics.items() if k.startswith("loss_"))
                metrics.update(iteration=state.iteration, epoch=epoch, lr=optimizer.param_groups[0]["lr"],
                               images_per_sec_per_worker=window_steps * t.batch_per_worker / max(elapsed, 1e-9),
                               precision=precision.line(), compile=compiled.line(),
                               **({"precision_warning": precision.warning} if precision.warning else {}))
                if state.latest_ap is not None:
                    metrics["latest_AP"] = state.latest_ap
                _report(metrics, save_now, is_last, model, optimizer, scheduler, state, val_set, cfg, ctx)
                sums, window_start, window_steps = {}, time.perf_counter(), 0
    return state


def train_step(model: nn.Module, batch: Batch, cfg: Config, ctx: WorkerContext, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, iteration: int) -> dict[str, Tensor]:
    """One optimizer step on `batch`: forward under the configured autocast, a finiteness check before anything
    changes, backward of the summed loss terms, optional gradient clipping. Returns the forward's outputs (loss
    terms and diagnostics)."""
    with _autocast(cfg, ctx.device):
        outputs = model(batch.images, batch.targets)
    losses = loss_terms(outputs)
    _check_finite(losses, iteration)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if cfg.train.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return outputs


def _numbers(metrics: dict[str, Any]) -> dict[str, float | int]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _report(metrics: dict[str, Any], save_now: bool, is_last: bool, model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
            val_set: CocoDetection, cfg: Config, ctx: WorkerContext) -> None:
    """Report metrics; at checkpoint iterations also evaluate (when due) and hand a checkpoint to the runtime."""
    t = cfg.train
    if not save_now:
        state.history.append(_numbers(metrics))
        ctx.report(metrics, None, state.iteration)
        return
    due = is_last or (t.eval_period > 0 and state.iteration % t.eval_period == 0)
    with tempfile.TemporaryDirectory(prefix="msad-ckpt-") as tmp:
        out = Path(tmp)
        if due:
            metrics.update(_evaluate_branches(model, val_set, cfg, ctx, out if ctx.rank == 0 else None, is_last))
            metrics["latest_AP"] = metrics["AP"]
            state.best_ap = max(state.best_ap, metrics["AP"])
        # Ray keeps the best checkpoints by this score plus always the latest; unevaluated ones rank last. Not NaN:
        # Ray's resume reads scores back from JSON, where NaN turns into null and breaks its ordering.
        metrics["checkpoint_score"] = metrics["AP"] if due else UNEVALUATED_SCORE
        state.history.append(_numbers(metrics))
        if ctx.rank == 0:
            save_checkpoint(checkpoint_dict(
                TRAINING_KIND, t.role, cfg, unwrap(model).state_dict(), state.iteration, _numbers(metrics),
                best_ap=state.best_ap, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                **unwrap(model).training_state(), history=state.history, resumed_from=state.resumed_from,
            ), out / CHECKPOINT_FILE)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        ctx.report(metrics, out if ctx.rank == 0 else None, state.iteration)


# ---------------------------------------------------------------------------------------------------------------------
# Ray Train runtime
# ---------------------------------------------------------------------------------------------------------------------


class RayWorkerContext:
    """WorkerContext of a Ray Train worker: DDP/loader preparation and reporting through ray.train."""

    def __init__(self) -> None:
        import ray
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._torch = ray.train.torch
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # only parameters that require grad are registered by DDP: the frozen teacher is not passed here at all
        return self._torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        # our sampler is already a DistributedSampler, so Ray keeps it; Batch moves itself to the device
        return self._torch.prepare_data_loader(loader, move_to_device=False)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # where and when rank 0 reported (Tune's node_ip is per machine, not node; its timestamp is whole seconds):
        # recovery times are measured from these
        metrics = {**metrics, "node_id": self.node_id, "reported_at": datetime.now(timezone.utc).isoformat()}
        name = f"checkpoint_{iteration:07d}"
        try:
            self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        except OSError as err:  # the store kept failing for distributed.storage_retry_s: say which checkpoint
            if checkpoint is None:
                raise
            raise storage.StorageUnavailableError(f"{name} was not uploaded: {storage.first_line(err)}") from err

    def restore_candidates(self) -> Iterator[Path]:
        latest = self._train.get_checkpoint()
        if latest is None:
            return
        reported = [r.checkpoint for r in self._train.get_all_reported_checkpoints()]
        ordered = sorted({c.path: c for c in [latest, *reported]}.values(), key=lambda c: c.path, reverse=True)
        for ckpt in ordered:  # names are checkpoint_<iteration>: newest first
            if (folder := storage.local_folder(ckpt.filesystem, ckpt.path)) is not None:
                yield folder / CHECKPOINT_FILE
                continue
            # an object store: a private copy (as_directory's is shared by the node's workers, see local_folder)
            with tempfile.TemporaryDirectory(prefix="msad-restore-") as directory:
                ckpt.to_directory(directory)
                yield Path(directory) / CHECKPOINT_FILE


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for `TorchTrainer(train_loop_per_worker, train_loop_config=...)`.

    Args:
        config: {"config": Config as a dict, "data_paths": DataPaths fields as strings, "run_dir": the run's folder}.
    """
    cfg = config_from_dict(config["config"])
    storage.set_retry_window(cfg.distributed.storage_retry_s)
    paths = DataPaths(**{k: Path(v) for k, v in config["data_paths"].items()})
    run_training(cfg, paths, RayWorkerContext(), run_dir=config.get("run_dir"))
