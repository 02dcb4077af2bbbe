"""Seconds per training iteration of a quickstart trial's own loop under variants (config overrides, environment).

`cpu_step_modes.py` times one fixed batch; a trial's loop also draws batches of both orientations from its data
loader, reports, and creates oneDNN kernels for every shape it meets. This script runs the loop itself
(`msad.engine.loop.run_training` with `LocalContext`, no Ray, no evaluation) on the quickstart's config for one role,
each variant in a fresh process (so environment variables such as oneDNN's take effect), in alternating rounds
(A B A B ...) against drifting load, and prints the median seconds per iteration of every variant from the loop's
own `images_per_sec_per_worker` (reports every 10 iterations, the first window left out: start-up and first kernels).

    python benchmarks/loop_levers.py --role teacher --iterations 60 --rounds 2 \\
        --variant "fp32=train.amp=off" --variant "fp32 cl=train.amp=off,train.channels_last=true"
    (a variant is NAME=override,override,...; ENV:NAME=VALUE items set the process's environment)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(role: str, iterations: int, overrides: list[str], out: Path) -> None:
    """One run of the loop in this process; writes the seconds per iteration of each report window to `out`."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from cpu_step_modes import quickstart_config

    from msad.build import resolve_data_paths
    from msad.engine.in_process import LocalContext
    from msad.engine.loop import run_training

    cfg = quickstart_config(role, [f"train.iterations={iterations}", f"train.checkpoint_period={iterations}",
                                   "train.log_period=10", "train.eval_period=0", "train.base_lr=0.01",
                                   f"train.lr_steps=[{iterations - 1}]", "train.warmup_iters=5", *overrides])
    ctx = LocalContext(torch.device("cpu"))
    with tempfile.TemporaryDirectory():
        run_training(cfg, resolve_data_paths(cfg.data), ctx)
    batch = cfg.train.batch_per_worker
    out.write_text(json.dumps([batch / r["images_per_sec_per_worker"] for r in ctx.reports
                               if "images_per_sec_per_worker" in r]))


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    name, _, spec = text.partition("=")
    overrides, env = [], {}
    for item in filter(None, spec.split(",")):
        if item.startswith("ENV:"):
            key, _, value = item[4:].partition("=")
            env[key] = value
        else:
            overrides.append(item)
    return name, overrides, env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="teacher", choices=["teacher", "fcos", "student"])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, help="NAME=override,...,ENV:KEY=VALUE")
    parser.add_argument("--child", nargs=2, metavar=("OUT", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.role, args.iterations, json.loads(args.child[1]), Path(args.child[0]))
        return
    variants = [parse_variant(v) for v in args.variant]
    windows: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name, overrides, env in variants:
                out = Path(tmp) / f"{round_index}-{len(windows[name])}.json"
                subprocess.run([sys.executable, __file__, "--role", args.role, "--iterations", str(args.iterations),
                                "--variant", "x=", "--child", str(out), json.dumps(overrides)],
                               env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
                seconds = json.loads(out.read_text())[1:]  # the first window holds start-up
                windows[name] += seconds
                print(f"round {round_index + 1} {name}: {statistics.median(seconds):.3f} s/it", flush=True)
    first = statistics.median(windows[variants[0][0]])
    print(f"\n{args.role}, {args.iterations} iterations x {args.rounds} rounds, medians of 10-iteration windows")
    print(f"| variant | s/iteration | vs {variants[0][0]} |\n|---|---:|---:|")
    for name, values in windows.items():
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / first:.2f} |")


if __name__ == "__main__":
    main()
