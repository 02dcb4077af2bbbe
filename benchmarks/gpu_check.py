"""GPU acceptance check: one command, a few minutes on one H100/H200-class GPU, for what only a GPU shows.

Checks, each isolated (an exception is a FAIL row with its last line; the other checks still run):

- teacher_ray_nccl: a tiny MSAD teacher through Ray Train (`msad.engine.trainer.fit`), 1 worker, use_gpu, nccl;
  final loss, AP (a number), the checkpoint, and that its tensors were saved from the GPU.
- student_ray_nccl: a tiny student distilled from that checkpoint the same way; loss_kd > 0 in the final metrics.
- amp_bf16, amp_fp16: a teacher trained in this process (`run_training` + `LocalContext` on cuda) under autocast;
  losses finite, AP computed, conv outputs in the AMP dtype.
- syncbn_from_checkpoint: the teacher checkpoint rebuilt, converted to SyncBatchNorm, one training forward +
  backward on the GPU inside a single-process nccl group; SyncBatchNorm modules > 0, loss finite.
- fcos_step_vs_torchvision: train-step time of msad's FCOS vs torchvision's fcos_resnet50_fpn on the GPU
  (benchmarks/fcos_step.py's building blocks, synchronized timing): medians and the ratio ours / torchvision.
- precision_steps: the teacher's step in fp32, bf16 and fp16 autocast, interleaved, and what `train.amp: auto` picks
  on this GPU: the numbers that decide auto's rule for GPUs (fp16 is not picked by auto until a GPU shows it pays).

Every row also carries the peak GPU memory its check allocated in this process (torch.cuda.max_memory_allocated,
reset between checks; the Ray checks allocate in their worker, so theirs is blank). The table is printed at the end
and written to OUT/gpu_check.md, the rows to OUT/gpu_check.json; the exit code is 1 if any check failed.

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--steps 20]    # on a GPU machine (< 8 min)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check          # on CPU (CI): same code path, gloo, no AMP

`--dry-run` runs every check on the CPU at tiny sizes: use_gpu false (gloo), amp off (rows say so), the SyncBN
conversion counted but the forward run with the original model (SyncBatchNorm's forward needs CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from msad.config import Config
    from msad.data.transforms import Batch

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "gpu_check: no CUDA device (use --dry-run on CPU)"
CHECKS = ("teacher_ray_nccl", "student_ray_nccl", "amp_bf16", "amp_fp16", "syncbn_from_checkpoint",
          "fcos_step_vs_torchvision", "precision_steps")
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: tiny on CPU so the dry-run takes a few minutes on 2 cores; larger, still quick, on a GPU."""

    num_train: int
    num_val: int
    image_size: tuple[int, int]
    object_size: tuple[int, int]
    short_side: int
    fpn_channels: int
    gn_groups: int
    iterations: int
    batch: int
    loader_workers: int
    width_list: tuple[float, ...]
    fcos_size: int
    fcos_warmup: int
    fcos_steps: int


GPU_SIZES = Sizes(num_train=64, num_val=16, image_size=(256, 384), object_size=(6, 60), short_side=256,
                  fpn_channels=64, gn_groups=32, iterations=20, batch=4, loader_workers=1,
                  width_list=(0.25, 0.5, 0.75, 1.0), fcos_size=512, fcos_warmup=3, fcos_steps=20)
# One width only: the multi-width checkpoint is ~190 MB, too slow to write and read on 2 CPU cores.
CPU_SIZES = Sizes(num_train=8, num_val=4, image_size=(96, 128), object_size=(8, 40), short_side=128,
                  fpn_channels=32, gn_groups=8, iterations=3, batch=2, loader_workers=0, width_list=(0.25,),
                  fcos_size=128, fcos_warmup=1, fcos_steps=2)


@dataclass
class Row:
    """One line of the table."""

    name: str
    status: str = "SKIP"  # PASS / FAIL / SKIP
    numbers: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
    peak_mib: float | None = None


@dataclass
class Plan:
    """What every check needs: the mode, the sizes, the device, the output folder, and results passed along."""

    dry_run: bool
    sizes: Sizes
    out: Path
    device: torch.device
    steps: int
    teacher_checkpoint: str | None = None
    teacher_loss: float | None = None  # the fp32 Ray teacher's final loss: same seed, data and schedule as AMP's

    @property
    def backend(self) -> str:
        return "gloo" if self.dry_run else "nccl"


class CheckFailedError(AssertionError):
    """A check ran but its result is wrong (the message is the FAIL row's note)."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailedError(message)


# ---------------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------------


def nvidia_smi() -> str | None:
    """Driver version and GPU name as nvidia-smi reports them (None when it is absent or fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def environment(dry_run: bool) -> dict[str, Any]:
    """Versions and the device, printed first so a failing table can be read against them."""
    import ray

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "ray": ray.__version__,
                           "cuda_available": torch.cuda.is_available(), "dry_run": dry_run}
    if torch.cuda.is_available():
        try:
            env.update(gpu_details())
        except Exception as err:  # the environment is context: a failing probe must not stop the checks
            env["gpu_error"] = last_line(err)
    env["nvidia_smi"] = nvidia_smi()
    return env


def gpu_details() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version()
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "bf16_supported": torch.cuda.is_bf16_supported()}


def print_environment(env: dict[str, Any]) -> None:
    print("gpu_check environment:", flush=True)
    for key, value in env.items():
        print(f"  {key:<16s} {value}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def run_config(plan: Plan, role: str, name: str, amp: str = "off", extra: tuple[str, ...] = ()) -> Config:
    """cpu_base.yaml at the plan's sizes: one worker, a report per iteration, one checkpoint + evaluation at the end."""
    from msad.config import load_config

    s = plan.sizes
    return load_config(REPO / "configs" / "cpu_base.yaml", [
        f"train.role={role}", f"distributed.run_name={name}", f"distributed.storage_path={plan.out / 'runs'}",
        f"data.shapes.cache_dir={plan.out / 'cache'}", f"data.shapes.num_train={s.num_train}",
        f"data.shapes.num_val={s.num_val}", f"data.shapes.image_size=[{s.image_size[0]},{s.image_size[1]}]",
        f"data.shapes.object_size=[{s.object_size[0]},{s.object_size[1]}]", f"data.train_short_sides=[{s.short_side}]",
        f"data.test_short_side={s.short_side}", f"data.num_workers={s.loader_workers}",
        f"model.width_list=[{','.join(map(str, s.width_list))}]", f"model.fpn_channels={s.fpn_channels}",
        f"model.gn_groups={s.gn_groups}", f"train.iterations={s.iterations}", f"train.batch_per_worker={s.batch}",
        f"train.lr_steps=[{s.iterations - 1}]", "train.warmup_iters=2", f"train.checkpoint_period={s.iterations}",
        f"train.eval_period={s.iterations}", "train.log_period=1", "train.kd_warmup_iters=1",
        f"train.amp='{amp}'", "distributed.num_workers=1", "distributed.max_failures=0",
        f"distributed.use_gpu={'false' if plan.dry_run else 'true'}", *extra])


def final_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """The final loss and AP, checked to be numbers (AP in [0, 1], loss finite)."""
    loss, ap = metrics.get("loss_total"), metrics.get("AP")
    require(isinstance(loss, float) and math.isfinite(loss), f"final loss_total is not a finite number: {loss!r}")
    require(isinstance(ap, float) and 0.0 <= ap <= 1.0, f"final AP is not a number in [0, 1]: {ap!r}")
    return {"iterations": metrics.get("iteration"), "loss_total": loss, "AP": ap}


def saved_devices(checkpoint: str) -> set[str]:
    """Where the checkpoint's tensors lived when saved ('cpu', 'cuda:0'): proof of where training ran."""
    locations: set[str] = set()

    def record(storage: Any, location: str) -> Any:
        locations.add(location)
        return storage

    torch.load(checkpoint, map_location=record, weights_only=True)
    return locations


# ---------------------------------------------------------------------------------------------------------------------
# Checks: each returns (numbers, note) or raises
# ---------------------------------------------------------------------------------------------------------------------


def check_teacher_ray(plan: Plan) -> tuple[dict[str, Any], str]:
    """A teacher through Ray Train, as `launch.py train` runs it (1 worker)."""
    from msad.engine.trainer import fit

    result = fit(run_config(plan, "teacher", "teacher"))
    numbers = final_numbers(result.metrics)
    require(result.checkpoint is not None and Path(result.checkpoint).is_file(),
            f"no checkpoint file: {result.checkpoint!r}")
    devices = saved_devices(str(result.checkpoint))
    if not plan.dry_run:
        require(any(d.startswith("cuda") for d in devices), f"checkpoint saved from {sorted(devices)}, not cuda")
    plan.teacher_checkpoint, plan.teacher_loss = str(result.checkpoint), numbers["loss_total"]
    numbers.update(saved_on=",".join(sorted(devices)), checkpoint=result.checkpoint)
    return numbers, f"1 worker, {plan.backend}" + (" (dry-run on CPU)" if plan.dry_run else "")


def check_student_ray(plan: Plan) -> tuple[dict[str, Any], str]:
    """A student distilled from the teacher above, through Ray Train."""
    from msad.engine.trainer import fit

    cfg = run_config(plan, "student", "student", extra=(f"train.teacher_checkpoint={plan.teacher_checkpoint}",))
    result = fit(cfg)
    numbers = final_numbers(result.metrics)
    kd = result.metrics.get("loss_kd")
    require(isinstance(kd, float) and kd > 0.0, f"final loss_kd is not > 0: {kd!r}")
    numbers.update(loss_kd=kd, kd_weight=result.metrics.get("kd_weight"), checkpoint=result.checkpoint)
    return numbers, f"from the teacher's checkpoint, {plan.backend}" + (" (dry-run on CPU)" if plan.dry_run else "")


@contextlib.contextmanager
def conv_output_dtypes() -> Iterator[set[str]]:
    """The dtypes of every Conv2d output while the block runs (shows whether autocast really took effect)."""
    seen: set[str] = set()

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(module, nn.Conv2d) and isinstance(output, Tensor):
            seen.add(str(output.dtype).removeprefix("torch."))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def check_amp(plan: Plan, amp: str) -> tuple[dict[str, Any], str]:
    """A teacher trained in this process under autocast (the loop's own AMP path and GradScaler for fp16)."""
    from msad.build import resolve_data_paths
    from msad.engine.in_process import LocalContext
    from msad.engine.loop import run_training

    effective = "off" if plan.dry_run else amp
    cfg = run_config(plan, "teacher", f"amp_{amp}", amp=effective)
    run_dir = plan.out / "local" / f"amp_{amp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with conv_output_dtypes() as dtypes:
        state = run_training(cfg, resolve_data_paths(cfg.data), LocalContext(device=plan.device, run_dir=run_dir))
    require(bool(state.history), "no report")
    bad = [f"{k}@{h['iteration']}" for h in state.history for k, v in h.items()
           if k.startswith("loss_") and not math.isfinite(v)]
    require(not bad, f"non-finite losses: {', '.join(bad[:3])}")
    numbers = final_numbers(state.history[-1])
    expected = "float32" if plan.dry_run else AMP_DTYPES[amp]
    require(expected in dtypes, f"conv outputs in {sorted(dtypes)}, expected {expected}")
    numbers["conv_dtypes"] = ",".join(sorted(dtypes))
    if plan.teacher_loss is not None:  # how far the AMP run drifted from the fp32 one (no threshold: information)
        numbers["loss_rel_diff_vs_fp32"] = abs(numbers["loss_total"] - plan.teacher_loss) / plan.teacher_loss
    return numbers, "dry-run: amp off" if plan.dry_run else f"autocast {AMP_DTYPES[amp]}, LocalContext on cuda"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def single_process_group(backend: str, device: torch.device) -> Iterator[None]:
    """A world of one (rank 0) over a TCP store on localhost, destroyed afterwards."""
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def first_batch(cfg: Config) -> Batch:
    """One padded training batch of the run's own data (the transforms and collate the loop uses)."""
    from msad.build import build_train_dataset, resolve_data_paths
    from msad.data.transforms import collate

    dataset = build_train_dataset(cfg, resolve_data_paths(cfg.data))
    landscape = dataset.landscape()
    same = [i for i in range(len(dataset)) if landscape[i] == landscape[0]][:cfg.train.batch_per_worker]
    return collate([dataset[i] for i in same], cfg.data.size_divisibility)


def check_syncbn(plan: Plan) -> tuple[dict[str, Any], str]:
    """The teacher checkpoint rebuilt, converted to SyncBatchNorm, one training step in a single-process group."""
    import torch.distributed as dist

    from msad.build import build_teacher
    from msad.checkpoint import checkpoint_config, load_checkpoint
    from msad.models.trainable import loss_terms

    path = plan.teacher_checkpoint or ""
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, path)
    teacher = build_teacher(cfg)
    teacher.load_state_dict(state["model"])
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(teacher))  # converts in place: keep the original
    count = sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    require(count > 0, "convert_sync_batchnorm found no BatchNorm to convert")
    model = teacher if plan.dry_run else synced  # SyncBatchNorm's forward refuses CPU tensors
    model.to(plan.device).train()
    batch = first_batch(cfg).to(plan.device)
    with single_process_group(plan.backend, plan.device):
        loss = sum(loss_terms(model(batch.images, batch.targets)).values())  # not the fusion diagnostics
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the group's collective works on this device
    require(math.isfinite(float(total)), f"loss is not finite: {float(total)}")
    grads = sum(p.grad is not None for p in model.parameters())
    require(grads > 0, "no parameter got a gradient")
    numbers = {"syncbn_modules": count, "loss_total": float(total), "params_with_grad": grads}
    if plan.dry_run:
        return numbers, "dry-run: converted and counted; forward with the original model (gloo, CPU)"
    return numbers, "nccl world of 1: SyncBatchNorm runs batch_norm locally (cross-GPU sync needs >= 2 ranks)"


def timed(step: Callable[[], Any], device: torch.device) -> Callable[[], dict[str, float]]:
    """Wall time of one whole step, synchronized: the steps time their parts without synchronizing."""

    def run() -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"step": time.perf_counter() - start}

    return run


def to_device(targets: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def check_fcos_step(plan: Plan) -> tuple[dict[str, Any], str]:
    """Our FCOS against torchvision's, the same inputs, interleaved steps (benchmarks/fcos_step.py's parts)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fcos_step import OursStep, TorchvisionStep, interleave, make_inputs, total_median
    from torchvision.models.detection import fcos_resnet50_fpn

    from msad.models import FCOSDetector

    size, classes, device = plan.sizes.fcos_size, 80, plan.device
    images, targets = make_inputs(2, size, 5, classes, seed=0)
    torch.manual_seed(0)
    ours = OursStep(FCOSDetector(width=1.0, fpn_channels=256, num_classes=classes).to(device), images, targets)
    ours.batch, ours.targets = ours.batch.to(device), to_device(targets, device)  # normalised on the CPU, then moved
    tv_model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=classes, min_size=size,
                                 max_size=size).to(device)
    tv = TorchvisionStep(tv_model, [im.to(device) for im in images], to_device(targets, device))
    steps = [timed(ours, device), timed(tv, device)]
    interleave(steps, plan.sizes.fcos_warmup)
    ours_records, tv_records = interleave(steps, plan.steps)
    ours_s, tv_s = total_median(ours_records), total_median(tv_records)
    require(ours_s > 0 and tv_s > 0, f"non-positive step times: {ours_s}, {tv_s}")
    numbers = {"ours_s": ours_s, "torchvision_s": tv_s, "ratio": ours_s / tv_s, "size": size, "steps": plan.steps}
    return numbers, f"2 images {size}x{size}, median of {plan.steps} interleaved steps" + (
        " (dry-run on CPU)" if plan.dry_run else "")


def check_precision_steps(plan: Plan) -> tuple[dict[str, Any], str]:
    """The teacher's training step in fp32, bf16 and fp16 autocast on this device (interleaved, synchronized medians)
    and what `train.amp: auto` picks here: the evidence for auto's rule (msad/engine/precision.py)."""
    from msad.build import build_model, build_optimizer
    from msad.config import config_from_dict, deep_merge, parse_overrides
    from msad.engine.in_process import LocalContext
    from msad.engine.loop import train_step
    from msad.engine.precision import choose_amp, device_facts

    base = run_config(plan, "teacher", "precision_steps")
    batch = first_batch(base).to(plan.device)
    ctx = LocalContext(device=plan.device)
    modes = ["off", "bf16"] + (["fp16"] if plan.device.type == "cuda" else [])  # fp16 autocast is GPU-only here

    def step_for(amp: str) -> Callable[[], Any]:
        cfg = config_from_dict(deep_merge(base.to_dict(), parse_overrides([f"train.amp={amp}"])))
        torch.manual_seed(0)
        model = build_model(cfg).to(plan.device).train()
        optimizer = build_optimizer(cfg, model)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        return lambda: train_step(model, batch, cfg, ctx, optimizer, scaler, 0)

    steps = [timed(step_for(amp), plan.device) for amp in modes]
    times: dict[str, list[float]] = {amp: [] for amp in modes}
    for i in range(plan.sizes.fcos_warmup + plan.steps):
        for amp, step in zip(modes, steps, strict=True):
            elapsed = step()["step"]
            if i >= plan.sizes.fcos_warmup:
                times[amp].append(elapsed)
    medians = {amp: sorted(t)[len(t) // 2] for amp, t in times.items()}
    numbers: dict[str, Any] = {f"{amp}_s": value for amp, value in medians.items()}
    numbers.update({f"{amp}_vs_fp32": medians[amp] / medians["off"] for amp in modes if amp != "off"})
    facts = device_facts(plan.device)
    numbers["auto_picks"] = choose_amp("auto", facts).amp
    return numbers, f"teacher step, batch {tuple(batch.images.shape)}, median of {plan.steps}; {facts.describe()}"


# ---------------------------------------------------------------------------------------------------------------------
# Running, table, files
# ---------------------------------------------------------------------------------------------------------------------


def last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def run_check(name: str, check: Callable[[], tuple[dict[str, Any], str]], device: torch.device) -> Row:
    """Run one check in isolation: its time, its peak GPU memory in this process, PASS or FAIL with the reason."""
    print(f"\n=== {name}", flush=True)
    row = Row(name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        row.numbers, row.note = check()
        row.status = "PASS"
    except Exception as err:  # isolation: one broken check must not hide the others
        traceback.print_exc()
        row.status, row.note = "FAIL", last_line(err)
    row.seconds = time.perf_counter() - start
    if device.type == "cuda":
        row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"=== {name}: {row.status} ({row.seconds:.1f} s) {row.note}", flush=True)
    return row


def skipped(name: str, reason: str) -> Row:
    print(f"\n=== {name}: SKIP ({reason})", flush=True)
    return Row(name, "SKIP", note=reason)


def run_all(plan: Plan) -> list[Row]:
    """Every check in order; the student and SyncBN checks need the teacher's checkpoint."""
    checks: list[tuple[str, Callable[[], tuple[dict[str, Any], str]], bool]] = [
        ("teacher_ray_nccl", lambda: check_teacher_ray(plan), False),
        ("student_ray_nccl", lambda: check_student_ray(plan), True),
        ("amp_bf16", lambda: check_amp(plan, "bf16"), False),
        ("amp_fp16", lambda: check_amp(plan, "fp16"), False),
        ("syncbn_from_checkpoint", lambda: check_syncbn(plan), True),
        ("fcos_step_vs_torchvision", lambda: check_fcos_step(plan), False),
        ("precision_steps", lambda: check_precision_steps(plan), False),
    ]
    rows = []
    for name, check, needs_teacher in checks:
        if needs_teacher and plan.teacher_checkpoint is None:
            rows.append(skipped(name, "no teacher checkpoint (teacher_ray_nccl failed)"))
        else:
            rows.append(run_check(name, check, plan.device))
    return rows


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[Row]) -> str:
    """Markdown table: one row per check (the checkpoint paths stay in the JSON)."""
    lines = ["| check | status | numbers | peak MiB | s | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        numbers = " ".join(f"{k}={format_value(v)}" for k, v in r.numbers.items() if k != "checkpoint")
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        note = r.note.replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {numbers} | {peak} | {r.seconds:.1f} | {note} |")
    lines.append("\npeak MiB: torch.cuda.max_memory_allocated in this process during the check; '-' = not measured "
                 "here (CPU, or a Ray check, which allocates in its worker)")
    return "\n".join(lines)


def write_outputs(out: Path, env: dict[str, Any], rows: list[Row], text: str, wall: float) -> None:
    (out / "gpu_check.md").write_text(text + "\n")
    payload = {"environment": env, "wall_s": wall, "rows": [asdict(r) for r in rows]}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))


def fresh_out(out: Path) -> None:
    """Remove earlier runs under OUT (a same-named run would resume instead of training); keep the data cache."""
    for sub in ("runs", "local"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="run every check on the CPU at tiny sizes (CI)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed FCOS steps per model (default {GPU_SIZES.fcos_steps}; dry-run "
                             f"{CPU_SIZES.fcos_steps})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    sizes = CPU_SIZES if args.dry_run else GPU_SIZES
    out = args.out.resolve()
    fresh_out(out)
    plan = Plan(dry_run=args.dry_run, sizes=sizes, out=out, steps=args.steps or sizes.fcos_steps,
                device=torch.device("cpu") if args.dry_run else torch.device("cuda", 0))
    start = time.perf_counter()
    env = environment(args.dry_run)
    print_environment(env)

    import ray

    from msad.engine.cluster import init_ray

    ray_start = time.perf_counter()
    init_ray(None)
    env["ray_start_s"] = round(time.perf_counter() - ray_start, 1)
    print(f"  {'ray_start_s':<16s} {env['ray_start_s']}", flush=True)
    try:
        rows = run_all(plan)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    text = table(rows)
    print(f"\ngpu_check ({'dry-run, CPU' if args.dry_run else env.get('gpu')}), {wall:.0f} s in all\n{text}",
          flush=True)
    write_outputs(out, env, rows, text, wall)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
