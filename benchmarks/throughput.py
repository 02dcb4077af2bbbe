"""Training and evaluation throughput at the cpu_base.yaml scale (512 / 64 shapes images, batch 8 per worker).

Training: images/s per worker, as the loop itself reports it (`images_per_sec_per_worker`, one report per
iteration; median over iterations, the first left out), for the teacher and the student (distilled from the
teacher this script has just trained), through `fit()` with 1 and 2 Ray workers (1 CPU each, so torch gets one
thread per worker). Runs go teacher 1w, teacher 2w, student 2w, student 1w (ABBA) against drifting load.

Evaluation: batched inference (`predict` on batches of `batch_per_worker`, one thread, as in a worker) and the full
`msad.engine.loop.evaluate` (inference + COCOeval) on the 64 val images, teacher (fused branch) and student,
alternating, medians.

`--padding` adds what batch padding costs: the share of training batches padded to 512 x 512 (landscape and portrait
images in one batch; size_divisibility 256) and a teacher step on 8 images padded to 512 x 512 vs 8 same-orientation
images padded to 256 x 512 (each step `msad.engine.loop.train_step`, the loop's own).

    .venv/bin/python benchmarks/throughput.py --iterations 10 --padding
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from msad.build import build_model, build_optimizer, build_train_dataset, build_val_dataset, resolve_data_paths
from msad.checkpoint import checkpoint_config, load_checkpoint
from msad.config import Config, load_config
from msad.data.transforms import Collate, collate
from msad.engine.in_process import LocalContext
from msad.engine.loop import evaluate, train_step
from msad.engine.trainer import fit

REPO = Path(__file__).resolve().parents[1]


def run_config(role: str, workers: int, iterations: int, storage: Path, extra: list[str]) -> Config:
    """cpu_base.yaml with a report every iteration and one checkpoint/evaluation at the end."""
    return load_config(REPO / "configs" / "cpu_base.yaml", [
        f"train.role={role}", f"distributed.num_workers={workers}", f"train.iterations={iterations}",
        f"train.lr_steps=[{iterations - 1}]", "train.log_period=1", f"train.checkpoint_period={iterations}",
        "train.eval_period=0", f"distributed.storage_path={storage}", f"distributed.run_name={role}-{workers}w",
        "distributed.max_failures=0", *extra])


def train_throughput(cfg: Config) -> tuple[dict[str, Any], Path]:
    """images/s per worker of one `fit()` run (median and spread over iterations 2..N) and its checkpoint."""
    start = time.perf_counter()
    result = fit(cfg)
    wall = time.perf_counter() - start
    history = load_checkpoint(result.checkpoint)["history"]
    rates = [h["images_per_sec_per_worker"] for h in history[1:]]
    numbers = {"role": cfg.train.role, "workers": cfg.distributed.num_workers,
               "images_per_sec_per_worker_median": statistics.median(rates), "min": min(rates), "max": max(rates),
               "images_per_sec_total": statistics.median(rates) * cfg.distributed.num_workers,
               "iterations": len(history), "wall_s": wall}
    return numbers, result.checkpoint


def eval_throughput(checkpoint: Path, data_cfg: Config, repeats: int) -> list[dict[str, float]]:
    """Inference-only and full-evaluate images/s of a checkpoint on data_cfg's val set, `repeats` times."""
    state = load_checkpoint(checkpoint)
    cfg = checkpoint_config(state, checkpoint)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    val_set = build_val_dataset(cfg, resolve_data_paths(data_cfg.data))
    loader = DataLoader(val_set, batch_size=cfg.train.batch_per_worker, num_workers=0,
                        collate_fn=Collate(cfg.data.size_divisibility))
    batches = list(loader)  # decode once: the numbers below are the model's and COCOeval's, not the JPEG reader's
    ctx = LocalContext(device=torch.device("cpu"))
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                model.predict(batch.images, batch.image_sizes)
        inference = time.perf_counter() - start
        start = time.perf_counter()
        evaluate(model, val_set, cfg, ctx)
        full = time.perf_counter() - start
        out.append({"inference_images_per_sec": len(val_set) / inference,
                    "evaluate_images_per_sec": len(val_set) / full})
    return out


def padding_cost(cfg: Config, rounds: int) -> dict[str, Any]:
    """Share of 512 x 512 training batches, and a teacher step on a mixed-orientation vs a same-orientation batch."""
    dataset = build_train_dataset(cfg, resolve_data_paths(cfg.data))
    sizes = [tuple(dataset[i][0].shape[-2:]) for i in range(len(dataset))]
    torch.manual_seed(0)
    order = torch.randperm(len(dataset)).tolist()
    b = cfg.train.batch_per_worker
    shapes = Counter(tuple(collate([(torch.zeros(3, *sizes[i]), {}) for i in order[k:k + b]],
                                   cfg.data.size_divisibility).images.shape[-2:])
                     for k in range(0, len(order) - b + 1, b))
    landscape = [i for i, (h, w) in enumerate(sizes) if w > h]
    portrait = [i for i, (h, w) in enumerate(sizes) if h > w]
    same = collate([dataset[i] for i in landscape[:b]], cfg.data.size_divisibility)
    mixed = collate([dataset[i] for i in landscape[:b // 2] + portrait[:b - b // 2]], cfg.data.size_divisibility)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    model.train()
    ctx = LocalContext(device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def step(batch: Any) -> float:
        start = time.perf_counter()
        train_step(model, batch, cfg, ctx, optimizer, scaler, 0)  # the loop's own step
        return time.perf_counter() - start

    step(same)  # warm-up
    times: dict[str, list[float]] = {"same": [], "mixed": []}
    for r in range(rounds):
        for name in (("same", "mixed") if r % 2 == 0 else ("mixed", "same")):
            times[name].append(step(same if name == "same" else mixed))
    return {"batch_shapes": {f"{h}x{w}": n for (h, w), n in shapes.items()},
            "content_pixels_per_image_mean": statistics.fmean(h * w for h, w in sizes),
            "same_orientation_shape": list(same.images.shape[-2:]), "mixed_shape": list(mixed.images.shape[-2:]),
            "teacher_step_same_s": statistics.median(times["same"]),
            "teacher_step_mixed_s": statistics.median(times["mixed"]),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--padding", action="store_true")
    parser.add_argument("--padding-rounds", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    storage = Path(tempfile.mkdtemp(prefix="msad-throughput-"))
    base = run_config("teacher", 1, args.iterations, storage, args.overrides)
    resolve_data_paths(base.data)  # generate the dataset once, outside every timing
    # 2 workers x 1 CPU plus the driver and the Train controller: allow 4 logical CPUs on the 2 cores (as the tests)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpus": os.cpu_count(),
                               "iterations": args.iterations, "train": []}
    teacher_numbers, teacher_ckpt = train_throughput(base)
    summary["train"].append(teacher_numbers)
    print(json.dumps(teacher_numbers), flush=True)
    checkpoints = {"teacher": teacher_ckpt}
    for role, workers in (("teacher", 2), ("student", 2), ("student", 1)):
        extra = [*args.overrides, f"train.teacher_checkpoint={teacher_ckpt}"] if role == "student" else args.overrides
        numbers, ckpt = train_throughput(run_config(role, workers, args.iterations, storage, extra))
        summary["train"].append(numbers)
        checkpoints.setdefault(role, ckpt)
        print(json.dumps(numbers), flush=True)
    ray.shutdown()

    torch.set_num_threads(1)  # one worker's share, as in the Ray runs above
    evals: dict[str, list[dict[str, float]]] = {"teacher": [], "student": []}
    for r in range(args.eval_repeats):
        for role in (("teacher", "student") if r % 2 == 0 else ("student", "teacher")):
            evals[role] += eval_throughput(checkpoints[role], base, 1)
    summary["eval"] = {role: {k: statistics.median(run[k] for run in runs) for k in runs[0]}
                       for role, runs in evals.items()}
    print(json.dumps(summary["eval"]), flush=True)
    if args.padding:
        summary["padding"] = padding_cost(base, args.padding_rounds)
        print(json.dumps(summary["padding"]), flush=True)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
