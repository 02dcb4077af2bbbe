"""Ray Train overhead: the same training run through `fit()` (TorchTrainer, 1 worker) and in one plain process.

Both sides run `msad.engine.loop.run_training` with identical settings (cpu_base.yaml, a small built-in dataset,
log every iteration, one checkpoint + evaluation at the end only, the same DataLoader workers and torch threads):
the Ray side through `msad.engine.trainer.fit(cfg, train_loop=...)` (its checks, Ray set-up and TorchTrainer), whose
per-worker loop is `train_loop_per_worker`'s with a stamping context; the plain side with a stamping `LocalContext`.
Each report is time-stamped by the worker context (a subclass of the real one that writes one JSON line per report),
so the driver gets per-iteration wall times from both sides:

- start-up: from the call (`fit()` / the plain set-up) to the start of the first iteration
  (first report's time minus the first window's own step time);
- per-iteration time: median of the gaps between consecutive reports, the first and the last (which evaluates and
  checkpoints) left out; the gaps include everything Ray adds per step (`ray.train.report`, controller polling);
- outside-the-step time: each gap minus the loop's own time for the step inside it, i.e. what reporting costs per
  iteration; with the step time shared by both sides this gives a per-iteration ratio that load noise barely moves.

Runs alternate A, B, B, A, ... so drifting background load hits both sides alike.

    .venv/bin/python benchmarks/ray_overhead.py --role fcos --iterations 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from msad.build import DataPaths, resolve_data_paths
from msad.config import Config, config_from_dict, load_config
from msad.engine.cluster import init_ray
from msad.engine.in_process import LocalContext
from msad.engine.loop import RayWorkerContext, run_training
from msad.engine.trainer import fit

REPO = Path(__file__).resolve().parents[1]


def _stamp(path: Path, metrics: dict[str, Any], batch: int) -> None:
    """Append this report's wall time, iteration, torch threads and the loop's own window time to `path`."""
    line = {"t": time.time(), "iteration": metrics["iteration"], "threads": torch.get_num_threads(),
            "window_s": batch / metrics["images_per_sec_per_worker"]}
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


class StampedLocalContext(LocalContext):
    """The plain-process context, stamping each report."""

    def __init__(self, stamps: Path, batch: int) -> None:
        super().__init__(device=torch.device("cpu"))
        self.stamps, self.batch = stamps, batch

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None:
        _stamp(self.stamps, metrics, self.batch)
        super().report(metrics, checkpoint_dir, iteration)


def stamped_train_loop(stamps: Path) -> Callable[[dict[str, Any]], None]:
    """What `msad.engine.loop.train_loop_per_worker` runs (`run_training` with a `RayWorkerContext`), with a context
    that stamps each report (rank 0) before `ray.train.report`; passed to `fit(cfg, train_loop=...)`."""

    def train_loop_per_worker(config: dict[str, Any]) -> None:
        class StampedRayContext(RayWorkerContext):
            def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None:
                if self.rank == 0:
                    _stamp(stamps, metrics, int(config["config"]["train"]["batch_per_worker"]))
                super().report(metrics, checkpoint_dir, iteration)

        cfg = config_from_dict(config["config"])
        run_training(cfg, DataPaths(**{k: Path(v) for k, v in config["data_paths"].items()}), StampedRayContext())

    return train_loop_per_worker


def bench_config(role: str, iterations: int, storage: Path, name: str, extra: list[str]) -> Config:
    """cpu_base.yaml with a small dataset, a report every iteration and one checkpoint/evaluation at the end."""
    return load_config(REPO / "configs" / "cpu_base.yaml", [
        f"train.role={role}", f"train.iterations={iterations}", f"train.lr_steps=[{iterations - 1}]",
        "train.log_period=1", f"train.checkpoint_period={iterations}", "train.eval_period=0",
        "data.shapes.num_train=64", "data.shapes.num_val=8", f"distributed.storage_path={storage}",
        f"distributed.run_name={name}", "distributed.max_failures=0", *extra])


def steady_state(lines: list[dict[str, float]]) -> dict[str, float]:
    """Per-iteration numbers between the first and the last report (the last one evaluates and saves).

    A gap between two reports is the next iteration's step (the loop's own window time) plus everything outside
    the step: the previous report (`ray.train.report` on the Ray side) and the loss averaging. Pairing each gap with
    its own step time isolates that outside part from the load-driven noise of the steps themselves.
    """
    times = [line["t"] for line in lines]
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)][:-1]
    steps = [line["window_s"] for line in lines[1:-1]]
    outside = [gap - step for gap, step in zip(gaps, steps, strict=True)]
    return {"iter_median_s": statistics.median(gaps), "iter_mean_s": statistics.fmean(gaps),
            "step_median_s": statistics.median(steps), "outside_step_median_s": statistics.median(outside),
            "outside_step_mean_s": statistics.fmean(outside)}


def summarize(stamps: Path, called_at: float, returned_at: float) -> dict[str, float]:
    """Start-up, steady-state per-iteration numbers and tear-down from one run's stamps."""
    lines = [json.loads(line) for line in stamps.read_text().splitlines()]
    times = [line["t"] for line in lines]
    first = lines[0]
    return {"startup_s": first["t"] - first["window_s"] - called_at, "first_report_s": first["t"] - called_at,
            **steady_state(lines), "final_eval_ckpt_s": times[-1] - times[-2], "teardown_s": returned_at - times[-1],
            "total_s": returned_at - called_at, "threads": first["threads"], "iterations": len(lines)}


def run_ray(cfg: Config, stamps: Path) -> dict[str, float]:
    called_at = time.time()
    fit(cfg, train_loop=stamped_train_loop(stamps))  # fit()'s own TorchTrainer, this loop on its worker
    return summarize(stamps, called_at, time.time())


def run_local(cfg: Config, stamps: Path, threads: int) -> dict[str, float]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # what Ray gives a worker: OMP_NUM_THREADS = floor(cpus_per_worker)
    try:
        called_at = time.time()
        run_training(cfg, resolve_data_paths(cfg.data), StampedLocalContext(stamps, cfg.train.batch_per_worker))
        return summarize(stamps, called_at, time.time())
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["fcos", "teacher"], default="fcos")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (Ray, plain), alternating order")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. data.num_workers=0")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="msad-ray-overhead-"))
    probe = bench_config(args.role, args.iterations, work, "probe", args.overrides)
    resolve_data_paths(probe.data)  # generate the dataset once, outside every timing
    threads = max(math.floor(probe.distributed.cpus_per_worker), 1)
    t0 = time.time()
    init_ray(None)
    ray_init_s = time.time() - t0
    print(f"ray.init: {ray_init_s:.1f} s; torch threads {threads} on both sides; work dir {work}", flush=True)

    runs: dict[str, list[dict[str, float]]] = {"ray": [], "local": []}
    for r in range(args.repeats):
        for side in (("ray", "local") if r % 2 == 0 else ("local", "ray")):
            cfg = bench_config(args.role, args.iterations, work, f"{side}{r}", args.overrides)
            stamps = work / f"{side}{r}.jsonl"
            numbers = run_ray(cfg, stamps) if side == "ray" else run_local(cfg, stamps, threads)
            runs[side].append(numbers)
            print(f"{side:5s} run {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()), flush=True)

    ratios = [a["iter_median_s"] / b["iter_median_s"] for a, b in zip(runs["ray"], runs["local"], strict=True)]
    mean_ratios = [a["iter_mean_s"] / b["iter_mean_s"] for a, b in zip(runs["ray"], runs["local"], strict=True)]
    med = {side: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for side, rs in runs.items()}
    # the same step with each side's own outside-the-step cost: robust to the load noise in the steps themselves
    step = statistics.median(run["step_median_s"] for rs in runs.values() for run in rs)
    paired = (step + med["ray"]["outside_step_median_s"]) / (step + med["local"]["outside_step_median_s"])
    summary = {
        "role": args.role, "iterations": args.iterations, "repeats": args.repeats, "ray_init_s": ray_init_s,
        "median_over_runs": med, "iter_ratio_ray_over_local_per_pair": ratios,
        "iter_ratio_median": statistics.median(ratios), "iter_mean_ratio_median": statistics.median(mean_ratios),
        "iter_ratio_from_outside_step_cost": paired,
        "startup_extra_s": med["ray"]["startup_s"] - med["local"]["startup_s"],
        "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
