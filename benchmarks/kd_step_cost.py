"""Cost of one distillation step against the sum of its parts, measured side by side.

- KD step: `msad.engine.loop._step` for a student with its frozen teacher (`run_frozen_teacher` on H and L under
  inference mode, student forward on L with the aligned L1 loss, backward, SGD step);
- student step without the teacher: the same `_step` on the kd_alpha = 0 path (no teacher forward, loss_kd = 0);
- teacher forward: `fuse_aligned_levels` under `torch.inference_mode()`.

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

from msad.build import build_model, build_optimizer, build_teacher, build_train_dataset, resolve_data_paths
from msad.config import Config, load_config
from msad.data.transforms import Batch, collate
from msad.engine.loop import _step
from msad.engine.trainer import LocalContext
from msad.models.student import KDWarmup, MSADStudent, init_from_teacher
from msad.models.teacher import MSADTeacher

REPO = Path(__file__).resolve().parents[1]


def bench_config(width: float, fpn_channels: int, cache: Path) -> Config:
    """cpu_base.yaml as a student at `width`, with square 256 x 256 images (batch padding adds nothing)."""
    return load_config(REPO / "configs" / "cpu_base.yaml", [
        "train.role=student", f"model.width={width}", f"model.fpn_channels={fpn_channels}", "train.kd_alpha=0.2",
        "data.shapes.num_train=8", "data.shapes.num_val=1", "data.shapes.image_size=[256,256]",
        f"data.shapes.cache_dir={cache}", "data.hflip_prob=0.0"])


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

    cfg = bench_config(args.width, args.fpn_channels, Path(tempfile.gettempdir()) / "msad-bench-cache")
    batch = one_batch(cfg, args.batch)
    torch.manual_seed(0)
    teacher: MSADTeacher = build_teacher(cfg).eval().requires_grad_(False)
    student = build_model(cfg)
    assert isinstance(student, MSADStudent)
    init_from_teacher(student, teacher.state_dict(), teacher.width)
    student.train()
    optimizer = build_optimizer(cfg, student)
    ctx = LocalContext(device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with_kd, without_kd = KDWarmup(cfg.train.kd_alpha, 0), KDWarmup(0.0, 0)  # full weight / the kd_alpha 0 path

    def kd_step() -> None:
        losses = _step(student, teacher, batch, with_kd, cfg, ctx, optimizer, scaler, 0)
        assert losses["loss_kd"].item() > 0

    def student_step() -> None:
        losses = _step(student, teacher, batch, without_kd, cfg, ctx, optimizer, scaler, 0)
        assert losses["loss_kd"].item() == 0

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
