"""CPU training-step time of the quickstart's models under memory-format, precision and compiler options.

Today's step (eager, fp32, contiguous) against channels-last, bf16 autocast, both, and torch.compile (with bf16):
the teacher (H & L) and the student (L, with its frozen teacher's forward) at the quickstart's sizes, on one fixed
batch of the built-in dataset. After warm-up (compile time is timed and printed apart), the timed steps alternate
between the modes so that machine noise hits all alike; medians and the ratio to today's step are printed.

    python benchmarks/cpu_step_modes.py [--roles teacher student] [--steps 6] [--modes eager channels_last bf16 ...]
        [--set key=value ...]   (config overrides on top of sweeps/quickstart.yaml's config)

bf16 autocast only pays on CPUs with native bf16 (AVX-512 BF16 or AMX: `lscpu | grep -o 'avx512_bf16\\|amx_bf16'`);
elsewhere it can be slower than fp32, which this script shows.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from msad.build import build_model, build_train_dataset, resolve_data_paths  # noqa: E402
from msad.config import config_from_dict, deep_merge, load_yaml_with_bases, parse_overrides  # noqa: E402
from msad.data.transforms import Collate  # noqa: E402
from msad.models.student import MSADStudent, run_frozen_teacher  # noqa: E402

MODES = ("eager", "channels_last", "bf16", "channels_last_bf16", "compile_bf16")


def quickstart_config(role: str, overrides: list[str]) -> object:
    """The quickstart sweep's trial config for `role` (its base, its `config`, then `overrides`)."""
    spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    data = load_yaml_with_bases(REPO / "sweeps" / spec["base"])
    data = deep_merge(data, spec.get("config", {}))
    data = deep_merge(data, parse_overrides([*overrides, f"train.role={role}", "train.amp=off"]))
    return config_from_dict(data)


def one_batch(cfg: object) -> object:
    """The first training batch of the built-in dataset (one orientation, padded as training pads it)."""
    dataset = build_train_dataset(cfg, resolve_data_paths(cfg.data))
    wide = [i for i, landscape in enumerate(dataset.landscape()) if landscape][: cfg.train.batch_per_worker]
    return Collate(cfg.data.size_divisibility)([dataset[i] for i in wide])


class Step:
    """One SGD step of a fresh model (same seed in every mode) under one mode."""

    def __init__(self, role: str, cfg: object, batch: object, mode: str) -> None:
        torch.manual_seed(0)
        self.mode = mode
        self.model = build_model(cfg).train()
        self.teacher = None
        if role == "student":
            teacher_cfg = config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "role": "teacher"}})
            self.teacher = build_model(teacher_cfg).eval().requires_grad_(False)
        channels_last = "channels_last" in mode
        self.images = batch.images.contiguous(memory_format=torch.channels_last) if channels_last else batch.images
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.targets = batch.targets
        self.forward: Callable = torch.compile(self.model) if mode.startswith("compile") else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)

    def __call__(self) -> float:
        start = time.perf_counter()
        precision = (torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in self.mode
                     else contextlib.nullcontext())
        with precision:
            if isinstance(self.model, MSADStudent):
                features = run_frozen_teacher(self.teacher, self.images)
                losses = self.forward(self.images, self.targets, teacher_features=features, kd_weight=0.2)
            else:
                losses = self.forward(self.images, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", nargs="+", default=["teacher", "student"], choices=["teacher", "student", "fcos"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (compile happens here)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
          f"mkldnn bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    for role in args.roles:
        cfg = quickstart_config(role, args.overrides)
        batch = one_batch(cfg)
        print(f"\n{role}: batch {tuple(batch.images.shape)}, width {cfg.model.width}, FPN {cfg.model.fpn_channels}")
        steps = {mode: Step(role, cfg, batch, mode) for mode in args.modes}
        for mode, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.warmup):
                step()
            print(f"  warm-up {mode}: {time.perf_counter() - start:.1f} s for {args.warmup} steps", flush=True)
        times: dict[str, list[float]] = {mode: [] for mode in args.modes}
        for _ in range(args.steps):
            for mode, step in steps.items():
                times[mode].append(step())
        reference = statistics.median(times[args.modes[0]])
        print(f"  | mode | median s/step (min-max) | vs {args.modes[0]} |\n  |---|---:|---:|")
        for mode in args.modes:
            median = statistics.median(times[mode])
            print(f"  | {mode} | {median:.3f} ({min(times[mode]):.3f}-{max(times[mode]):.3f}) | "
                  f"{median / reference:.2f} |")


if __name__ == "__main__":
    main()
