"""Cost of one distillation step against the sum of its parts, measured side by side.

- KD step: `msad.engine.loop.train_step` on the `Distiller` that `msad.build.build_trainable` makes for a student
  run (kd_alpha 0.2, no ramp): its frozen teacher (`run_frozen_teacher` on H and L under inference mode), the
  student forward on L with the aligned L1 loss, backward, SGD step;
- student step without the teacher: `train_step` on the Distiller of the same run with kd_alpha = 0 (the no-KD
  path: the teacher is not run, loss_kd = 0);
- teacher forward: the frozen teacher's `fuse_aligned_levels` under `torch.inference_mode()`.

The teacher is a real training checkpoint (one step of `run_training` on this config, written to a temporary
folder), so both Distillers are built, loaded and initialised from it exactly as a student run's are.

Goal: KD step <= 1.1 x (student step + teacher forward). The three are timed in rounds, each round running all three
in a rotating order, so background load hits them alike; medians over rounds, the median of the per-round ratios
(the three calls of a round are seconds apart, so they share the load), the ratio of the minimums and the ratio of
median process CPU times (one torch thread: the least load-sensitive of them). `--profile` adds a torch.profiler table
of one KD step and of the two parts.

    .venv/bin/python benchmarks/kd_step_cost.py --width 0.25 --fpn-channels 64
    .venv/bin/python benchmarks/kd_step_cost.py --width 1.0 --fpn-channels 256 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from msad.build import build_optimizer, build_train_dataset, build_trainable, resolve_data_paths
from msad.checkpoint import CHECKPOINT_FILE
from msad.config import Config, config_from_dict, deep_merge, load_config, parse_overrides
from msad.data.transforms import Batch, collate
from msad.engine.in_process import LocalContext
from msad.engine.loop import run_training, train_step
from msad.models.distiller import Distiller

REPO = Path(__file__).resolve().parents[1]


def bench_config(width: float, fpn_channels: int, cache: Path) -> Config:
    """cpu_base.yaml as a student at `width`, with square 256 x 256 images (batch padding adds nothing)."""
    return load_config(REPO / "configs" / "cpu_base.yaml", [
        "train.role=student", f"model.width={width}", f"model.fpn_channels={fpn_channels}", "train.kd_alpha=0.2",
        "train.kd_warmup_iters=0",
        "data.shapes.num_train=8", "data.shapes.num_val=1", "data.shapes.image_size=[256,256]",
        f"data.shapes.cache_dir={cache}", "data.hflip_prob=0.0"])


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return config_from_dict(deep_merge(cfg.to_dict(), parse_overrides(overrides)))


def short_teacher_checkpoint(cfg: Config, run_dir: Path, iterations: int = 1) -> Path:
    """A teacher training checkpoint for `cfg`'s model and data, from `iterations` steps of the shipped loop
    (`run_training` with a `LocalContext` writing into `run_dir`; evaluated once, without intervals): the file a
    student run's `train.teacher_checkpoint` names, so `build_trainable` builds the student side as a run does."""
    teacher_cfg = with_overrides(cfg, [
        "train.role=teacher", "train.teacher_checkpoint=null", f"train.iterations={iterations}", "train.lr_steps=[]",
        f"train.checkpoint_period={iterations}", f"train.log_period={iterations}", "train.eval_period=0",
        "train.bootstrap_samples=0", "train.amp=off", "distributed.run_name=teacher"])
    run_training(teacher_cfg, resolve_data_paths(teacher_cfg.data), LocalContext(torch.device("cpu"), run_dir))
    return run_dir / f"checkpoint_{iterations:07d}" / CHECKPOINT_FILE


def one_batch(cfg: Config, size: int) -> Batch:
    dataset = build_train_dataset(cfg, resolve_data_paths(cfg.data))
    return collate([dataset[i] for i in range(size)], cfg.data.size_divisibility)


def timed(fn: Callable[[], object]) -> tuple[float, float, int]:
    """Wall seconds, this process's CPU seconds and minor page faults of one call.

    With one torch thread the CPU time is what the call itself costs, nearly free of the waiting that other
    processes on a shared machine add to the wall time; page faults show allocation churn.
    """
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--fpn-channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="1: steadier on a shared machine")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = bench_config(args.width, args.fpn_channels, Path(tempfile.gettempdir()) / "msad-bench-cache")
    batch = one_batch(base, args.batch)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="msad-kd-step-") as tmp:
        cfg = with_overrides(base, [f"train.teacher_checkpoint={short_teacher_checkpoint(base, Path(tmp))}"])
        no_kd_cfg = with_overrides(cfg, ["train.kd_alpha=0"])
        distillers = {"kd": build_trainable(cfg, device), "no_kd": build_trainable(no_kd_cfg, device)}
    assert all(isinstance(d, Distiller) for d in distillers.values())
    for distiller in distillers.values():
        distiller.train()
    optimizers = {name: build_optimizer(cfg, d) for name, d in distillers.items()}
    ctx = LocalContext(device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    teacher = distillers["kd"].teacher

    def kd_step() -> None:
        outputs = train_step(distillers["kd"], batch, cfg, ctx, optimizers["kd"], scaler, 0)
        assert outputs["loss_kd"].item() > 0 and outputs["kd_weight"].item() > 0

    def student_step() -> None:
        outputs = train_step(distillers["no_kd"], batch, no_kd_cfg, ctx, optimizers["no_kd"], scaler, 0)
        assert outputs["loss_kd"].item() == 0 and outputs["kd_weight"].item() == 0

    def teacher_forward() -> None:
        with torch.inference_mode():
            teacher.fuse_aligned_levels(batch.images)

    parts = {"kd_step": kd_step, "student_step": student_step, "teacher_forward": teacher_forward}
    names = list(parts)
    for _ in range(args.warmup):
        for fn in parts.values():
            fn()
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order every round
            samples[name].append(timed(parts[name]))
    times = {name: [w for w, _, _ in values] for name, values in samples.items()}
    cpu = {name: statistics.median(c for _, c, _ in values) for name, values in samples.items()}
    faults = {name: statistics.median(f for _, _, f in values) for name, values in samples.items()}
    med = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}  # least disturbed by the shared machine's load
    per_round = [k / (s + t) for k, s, t in zip(times["kd_step"], times["student_step"], times["teacher_forward"],
                                                 strict=True)]
    parts_sum = med["student_step"] + med["teacher_forward"]
    summary = {
        "width": args.width, "fpn_channels": args.fpn_channels, "batch": args.batch,
        "image": list(batch.images.shape[-2:]), "threads": args.threads, "rounds": args.rounds,
        "median_s": med, "min_s": best, "ratio_kd_over_parts_of_medians": med["kd_step"] / parts_sum,
        "ratio_kd_over_parts_of_mins": best["kd_step"] / (best["student_step"] + best["teacher_forward"]),
        "ratio_kd_over_parts_per_round_median": statistics.median(per_round),
        "cpu_median_s": cpu, "ratio_kd_over_parts_cpu": cpu["kd_step"] / (cpu["student_step"] + cpu["teacher_forward"]),
        "minor_page_faults_median": faults,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps({**summary, "times": times}, indent=2))
    if args.profile:
        for name in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                parts[name]()
            print(f"\n=== {name} ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
