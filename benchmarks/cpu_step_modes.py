"""CPU training-step time of the quickstart's models under memory-format, precision and compiler options.

Today's step (eager, fp32, contiguous) against channels-last, bf16 autocast, both, and torch.compile (with bf16):
the teacher (H & L) and the student (L, with its frozen teacher's forward) at the quickstart's sizes, on one fixed
batch of the built-in dataset. After warm-up (compile time is timed and printed apart), the timed steps alternate
between the modes so that machine noise hits all alike; medians and the ratio to today's step are printed.

Each step is the loop's own, `msad.engine.loop.train_step`, on the model a run of the role trains: `build_model`'s
teacher or FCOS, and for the student the `msad.models.distiller.Distiller` of a student run (KD weight 0.2 from the
first step) around a freshly built, frozen teacher (`build_teacher`; random weights: this times the step, nothing is
learned). bf16 is the loop's own autocast (`train.amp=bf16`); channels-last converts the model (and a student's
frozen teacher) and the batch; compile is the trainable's `compile_network()`, what `train.compile` runs (backbone,
pyramid, head, C-FF; for a student, the student's: its frozen teacher runs eagerly under inference mode), with the
kernels cached in $MSAD_CACHE/torchinductor (delete it to time a cold compile). lr 1e-4
(`train.base_lr`), `build_optimizer`'s SGD, no lr schedule.

    python benchmarks/cpu_step_modes.py [--roles teacher student] [--steps 6] [--modes eager channels_last bf16 ...]
        [--set key=value ...]   (config overrides on top of sweeps/quickstart.yaml's config)

bf16 autocast only pays on CPUs with native bf16 (AVX-512 BF16 or AMX: `lscpu | grep -o 'avx512_bf16\\|amx_bf16'`);
elsewhere it can be slower than fp32, which this script shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from msad.build import build_model, build_optimizer, build_teacher, build_train_dataset, resolve_data_paths  # noqa: E402
from msad.config import Config, config_from_dict, deep_merge, load_yaml_with_bases, parse_overrides  # noqa: E402
from msad.data.transforms import Batch, Collate  # noqa: E402
from msad.engine.compilation import use_shared_compile_cache  # noqa: E402
from msad.engine.in_process import LocalContext  # noqa: E402
from msad.engine.loop import train_step  # noqa: E402
from msad.engine.precision import device_facts  # noqa: E402
from msad.models.distiller import Distiller  # noqa: E402
from msad.models.student import KDWarmup, MSADStudent  # noqa: E402
from msad.models.trainable import Trainable  # noqa: E402

MODES = ("eager", "channels_last", "bf16", "channels_last_bf16", "compile", "compile_bf16")
STEP_OVERRIDES = ("train.amp=off", "train.base_lr=0.0001", "train.kd_alpha=0.2", "train.kd_warmup_iters=0")


def quickstart_config(role: str, overrides: list[str]) -> Config:
    """The quickstart sweep's trial config for `role` (its base, its `config`, then `overrides`)."""
    spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    data = load_yaml_with_bases(REPO / "sweeps" / spec["base"])
    data = deep_merge(data, spec.get("config", {}))
    data = deep_merge(data, parse_overrides([*STEP_OVERRIDES, *overrides, f"train.role={role}"]))
    return config_from_dict(data)


def one_batch(cfg: Config) -> Batch:
    """The first training batch of the built-in dataset (the first image's orientation, padded as training pads it)."""
    dataset = build_train_dataset(cfg, resolve_data_paths(cfg.data))
    orientation = dataset.landscape()
    same = [i for i, landscape in enumerate(orientation) if landscape == orientation[0]][: cfg.train.batch_per_worker]
    return Collate(cfg.data.size_divisibility)([dataset[i] for i in same])


def trainable(cfg: Config) -> Trainable:
    """What a run of cfg's role trains, on the CPU; for a student, its `Distiller` around a random frozen teacher."""
    model = build_model(cfg)
    if not isinstance(model, MSADStudent):
        return model
    t = cfg.train
    teacher = build_teacher(cfg).requires_grad_(False).eval()
    return Distiller(model, teacher, KDWarmup(t.kd_alpha, t.kd_warmup_iters), t.teacher_batch_stats)


class Step:
    """One `train_step` of a fresh trainable (same seed in every mode) under one mode."""

    def __init__(self, cfg: Config, batch: Batch, mode: str) -> None:
        torch.manual_seed(0)
        self.mode = mode
        self.cfg = config_from_dict(deep_merge(cfg.to_dict(), parse_overrides(
            [f"train.amp={'bf16' if 'bf16' in mode else 'off'}"])))
        self.ctx = LocalContext(torch.device("cpu"))
        self.model = trainable(self.cfg).train()
        self.batch = batch
        if "channels_last" in mode:
            self.model.to(memory_format=torch.channels_last)
            if isinstance(self.model, Distiller):  # the frozen teacher is held outside the module tree
                self.model.teacher.to(memory_format=torch.channels_last)
            self.batch = Batch(batch.images.contiguous(memory_format=torch.channels_last), batch.image_sizes,
                               batch.targets)
        if mode.startswith("compile"):
            use_shared_compile_cache()
            self.model.compile_network()  # what train.compile compiles
        self.optimizer = build_optimizer(self.cfg, self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    def __call__(self) -> float:
        start = time.perf_counter()
        train_step(self.model, self.batch, self.cfg, self.ctx, self.optimizer, self.scaler, 0)
        return time.perf_counter() - start


def measure(role: str, cfg: Config, args: argparse.Namespace) -> None:
    """Warm up every mode, then time them interleaved; print the table for `role`."""
    batch = one_batch(cfg)
    print(f"\n{role}: batch {tuple(batch.images.shape)}, width {cfg.model.width}, FPN {cfg.model.fpn_channels}")
    steps = {mode: Step(cfg, batch, mode) for mode in args.modes}
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", nargs="+", default=["teacher", "student"], choices=["teacher", "student", "fcos"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (compile happens here)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cpu = device_facts(torch.device("cpu")).describe()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
          f"oneDNN's own bf16 check: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    for role in args.roles:
        measure(role, quickstart_config(role, args.overrides), args)


if __name__ == "__main__":
    main()
