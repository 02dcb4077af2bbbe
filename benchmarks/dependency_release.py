"""Dependency release against a two-stage barrier: when the first student starts, and when the sweep ends.

One tiny sweep, two teachers of uneven length (width 0.25: `--short` iterations; width 0.5: `--long`), two
students per teacher, `--concurrency` trials at a time, run two ways from a fresh `launch.py` process each:

  release  one sweep; each width's students are released as soon as that width's teacher ends (msad's searcher)
  barrier  what a user does without it: a teachers-only sweep, then a students-only sweep given the teachers'
           checkpoints (`students.teacher_checkpoints`); no student starts before the slowest teacher ends

Times are seconds from the first launch (Ray start-up included, as a user waits for it), read from the trials'
own start/end stamps (`results/*.json`). The sweeps are the same trials with the same configs in both modes.

    python benchmarks/dependency_release.py [--short 6] [--long 40] [--concurrency 2] [--out runs/dependency_release]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from msad.sweep.trials import TrialSummary, read_trial_summaries  # noqa: E402

WIDTHS = (0.25, 0.5)


def base_config(out: Path) -> dict[str, Any]:
    """The tests' tiny trial config (seconds per trial), writing under `out`."""
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny_sweep_config.yaml").read_text())
    config["distributed"] = {"storage_path": str(out / "runs"), "num_workers": 1, "cpus_per_worker": 1,
                             "max_failures": 0}
    config["data"]["shapes"]["cache_dir"] = str(out / "cache")
    config["train"].update(iterations=6, lr_steps=[5], eval_period=6, checkpoint_period=6)
    return config


def teachers_stage(short: int, long: int) -> dict[str, Any]:
    variants = []
    for width, iterations in zip(WIDTHS, (short, long), strict=True):
        variants.append({"model.width": width, "train.iterations": iterations,
                         "train.lr_steps": [iterations - 1], "train.eval_period": iterations,
                         "train.checkpoint_period": iterations})
    return {"variants": variants}


def students_stage() -> dict[str, Any]:
    return {"grid": {"model.width": list(WIDTHS), "train.kd_alpha": [0.0, 0.2]}}


def write_sweep(out: Path, name: str, args: argparse.Namespace, teachers: dict | None, students: dict | None) -> Path:
    spec: dict[str, Any] = {"name": name, "base": str(REPO / "configs" / "cpu_base.yaml"), "config": base_config(out),
                            "max_concurrent_trials": args.concurrency}
    if teachers is not None:
        spec["teachers"] = teachers
    if students is not None:
        spec["students"] = students
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def launch(path: Path, out: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("WANDB_MODE", "offline")
    log = out / f"{path.stem}.log"
    with log.open("w") as handle:
        code = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path)], cwd=out, env=env,
                              stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{path.name} exited {code}; see {log}")


def timings(rows: list[TrialSummary], origin: float) -> dict[str, Any]:
    students = [r for r in rows if r.role == "student"]
    teachers = [r for r in rows if r.role == "teacher"]
    if any(r.status != "TERMINATED" for r in rows):
        raise RuntimeError("a trial did not finish: " + ", ".join(f"{r.name} {r.status}" for r in rows))
    return {
        "first_student_start_s": round(min(r.started_at for r in students) - origin, 1),
        "last_teacher_end_s": round(max(r.ended_at for r in teachers) - origin, 1),
        "last_trial_end_s": round(max(r.ended_at for r in rows) - origin, 1),
        "trials": {r.name: [round(r.started_at - origin, 1), round(r.ended_at - origin, 1)] for r in rows},
    }


def run_release(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    path = write_sweep(out, "release", args, teachers_stage(args.short, args.long), students_stage())
    origin = time.time()
    launch(path, out)
    wall = time.time() - origin
    return {**timings(read_trial_summaries(out / "runs" / "release"), origin), "wall_s": round(wall, 1)}


def run_barrier(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    origin = time.time()
    launch(write_sweep(out, "barrier_teachers", args, teachers_stage(args.short, args.long), None), out)
    teachers = read_trial_summaries(out / "runs" / "barrier_teachers")
    given = {r.width: r.checkpoint for r in teachers}
    students = {**students_stage(), "teacher_checkpoints": given}
    launch(write_sweep(out, "barrier_students", args, None, students), out)
    wall = time.time() - origin
    rows = [*teachers, *read_trial_summaries(out / "runs" / "barrier_students")]
    return {**timings(rows, origin), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=6, help="iterations of the width-0.25 teacher")
    parser.add_argument("--long", type=int, default=40, help="iterations of the width-0.5 teacher")
    parser.add_argument("--concurrency", type=int, default=2, help="max_concurrent_trials (1 CPU each)")
    parser.add_argument("--out", type=Path, default=Path("runs/dependency_release"))
    args = parser.parse_args()
    out = args.out.resolve()
    if (out / "runs").exists():
        sys.exit(f"error: {out / 'runs'} exists (an earlier run): pick a new --out; nothing was overwritten")
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": {**vars(args), "out": str(out)}, "release": run_release(out, args),
               "barrier": run_barrier(out, args)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for mode in ("release", "barrier"):
        r = results[mode]
        print(f"{mode:8s} first student starts {r['first_student_start_s']:6.1f} s   last teacher ends "
              f"{r['last_teacher_end_s']:6.1f} s   sweep ends {r['last_trial_end_s']:6.1f} s"
              f"   wall {r['wall_s']:.1f} s")
    rel, bar = results["release"], results["barrier"]
    print(f"release / barrier: first student {rel['first_student_start_s'] / bar['first_student_start_s']:.2f}, "
          f"total {rel['wall_s'] / bar['wall_s']:.2f}")


if __name__ == "__main__":
    main()
