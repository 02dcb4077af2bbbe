"""ASHA against the full grid on a KD sweep: the compute each spends, and whether both pick the same best student.

The sweep file (`sweeps/kd_weights.yaml` by default) is run twice, unchanged except for the scheduler, from a fresh
`launch.py` process each: once with its own ASHA scheduler, once with FIFO (every student to the end). Both runs
are students-only sweeps against one given teacher checkpoint (`--teacher`), so the two arms distil from the same
teacher and neither pays for training it. Compute is counted as iterations trained (read from every trial's own
results) and trial-seconds; the best student is the one with the highest final AP among those that finished.

    python benchmarks/asha_vs_grid.py --teacher runs/fidelity/teacher/checkpoint_0000300/checkpoint.pt \
        [--sweep sweeps/kd_weights.yaml] [--out runs/asha_vs_grid] [--set config.train.iterations=120 ...]

`--set` scales the sweep down (or changes it) identically in both arms, for machines where the file's own schedule
would take hours.

Which student ASHA keeps depends on the order in which students reach a rung, so one ASHA run says little. The
replay mode answers "how often" from one grid run: every student's recorded results are fed, in many random
arrival orders, to the scheduler the sweep would build (`msad.sweep.search.make_scheduler`, i.e. Ray's ASHA with
the students-only rules, with the grace period and reduction factor of `--sweep`'s scheduler), ranking by each
`--metric` given, and it counts how often the grid's best student (by final AP) survives, and how often the
survivors include one whose final AP is within `--tie` of the best:

    python benchmarks/asha_vs_grid.py --replay runs/asha_vs_grid/runs/kd_weights_grid \
        --metric AP --metric AP50 --orders 2000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from ray.tune.schedulers import TrialScheduler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from msad.sweep.search import make_scheduler  # noqa: E402
from msad.sweep.spec import load_sweep  # noqa: E402
from msad.sweep.trials import read_trial_summaries  # noqa: E402


def apply_settings(spec: dict[str, Any], settings: list[str]) -> None:
    """Set `dotted.path=value` entries (values parsed as YAML) in the sweep spec, e.g. `config.train.iterations=120`
    or `scheduler.grace_period=30`; a path whose parent is missing is refused, so a typo cannot pass silently."""
    for setting in settings:
        path, sep, raw = setting.partition("=")
        keys = path.split(".")
        node = spec
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise SystemExit(f"error: --set {setting}: {key!r} is not a section of the sweep spec")
            node = node[key]
        if not sep or not keys[-1]:
            raise SystemExit(f"error: --set {setting}: expected dotted.path=value")
        node[keys[-1]] = yaml.safe_load(raw)


def derived_sweep(source: Path, out: Path, name: str, teacher: Path, asha: bool, settings: list[str]) -> Path:
    """`source` as a students-only sweep against `teacher`, named `name`, under `out`; FIFO unless `asha`;
    `settings` applied on top (the same in both arms)."""
    spec = yaml.safe_load(source.read_text())
    apply_settings(spec, settings)
    spec["name"] = name
    spec["base"] = str((source.parent / spec["base"]).resolve())
    spec.setdefault("config", {}).setdefault("distributed", {})["storage_path"] = str(out / "runs")
    widths = spec["students"]["grid"]["model.width"]
    spec.pop("teachers", None)
    spec["students"]["teacher_checkpoints"] = {float(w): str(teacher) for w in widths}
    if not asha:
        spec["scheduler"] = {**spec.get("scheduler", {}), "type": "fifo"}  # ASHA's settings kept for --replay
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def iterations_trained(experiment: Path) -> dict[str, int]:
    """Each trial's last reported iteration, from Tune's own per-trial result.json."""
    return {name: int(lines[-1]["iteration"]) for name, lines in recorded_results(experiment).items()}


def run_arm(source: Path, out: Path, teacher: Path, asha: bool, settings: list[str]) -> dict[str, Any]:
    name = f"{source.stem}_{'asha' if asha else 'grid'}"
    path = derived_sweep(source, out, name, teacher, asha, settings)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("WANDB_MODE", "offline")
    start = time.time()
    with (out / f"{name}.log").open("w") as log:
        code = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path)], cwd=out, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if code != 0:
        raise RuntimeError(f"{name} exited {code}; see {out / (name + '.log')}")
    rows = read_trial_summaries(out / "runs" / name)
    trained = iterations_trained(out / "runs" / name)
    finished = [r for r in rows if r.status == "TERMINATED" and r.AP is not None]
    best = max(finished, key=lambda r: r.AP)
    return {
        "wall_s": round(wall, 1),
        "iterations_trained": sum(trained.values()),
        "trial_seconds": round(sum(r.ended_at - r.started_at for r in rows), 1),
        "stopped_early": sorted(r.name for r in rows if r.status == "STOPPED"),
        "best": best.name,
        "trials": {r.name: {"status": r.status, "AP": r.AP, "iterations": trained.get(r.name)} for r in rows},
    }


def ranking(rows: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(rows, key=lambda n: -(rows[n]["AP"] or 0.0))


def recorded_results(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result each trial reported (Tune's per-trial result.json), in order, keyed by trial name."""
    trials = {}
    for result in sorted(experiment.glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            trials[lines[0]["config"]["trial_name"]] = lines
    return trials


def replay(experiment: Path, asha: dict[str, Any], metric: str, orders: int, tie: float, seed: int) -> dict[str, Any]:
    """Feed the grid's recorded student results to the sweep's own ASHA scheduler (`asha`: the source sweep file's
    scheduler section; grace period, reduction factor), ranking by `metric`, in `orders` random arrival orders
    (trials arrive one after another, each reporting until it ends or is stopped); count how often the grid's best
    student (final AP) and a student within `tie` AP of it survive."""
    sweep_file = next(experiment.parent.parent.glob(f"{experiment.name}.yaml"), None)
    if sweep_file is None:
        raise SystemExit(f"error: --replay {experiment}: its sweep file {experiment.name}.yaml is not two folders up")
    spec = yaml.safe_load(sweep_file.read_text())
    spec["scheduler"] = {**asha, "type": "asha", "metric": metric, "mode": "min" if "loss" in metric else "max"}
    derived = sweep_file.with_name(f".{sweep_file.stem}-replay-{metric}.yaml")
    derived.write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        sweep = load_sweep(derived)
    finally:
        derived.unlink()
    results = {name: lines for name, lines in recorded_results(experiment).items()
               if lines[0]["config"].get("role") == "student"}
    final_ap = {name: lines[-1].get("AP") for name, lines in results.items()}
    best = max(final_ap, key=lambda n: final_ap[n] if final_ap[n] is not None else -1.0)
    near_best = {n for n, ap in final_ap.items() if ap is not None and ap >= final_ap[best] - tie}
    rng = random.Random(seed)
    kept_best = kept_near = 0
    survivors_total = 0
    for _ in range(orders):
        scheduler = make_scheduler(sweep)
        trials = [_ReplayTrial(name, lines[0]["config"]) for name, lines in results.items()]
        rng.shuffle(trials)
        survivors = set()
        for trial in trials:
            scheduler.on_trial_add(None, trial)
            stopped = any(scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP
                          for result in results[trial.trial_id] if metric in result)
            if not stopped:
                survivors.add(trial.trial_id)
        survivors_total += len(survivors)
        kept_best += best in survivors
        kept_near += bool(survivors & near_best)
    return {"metric": metric, "orders": orders, "grid_best": best, "grid_best_AP": final_ap[best],
            "within_tie": sorted(near_best), "kept_best": kept_best / orders, "kept_within_tie": kept_near / orders,
            "mean_survivors": survivors_total / orders, "students": len(results)}


class _ReplayTrial:
    """What the scheduler reads of a trial: its id and its config."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.trial_id, self.config = name, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=REPO / "sweeps" / "kd_weights.yaml")
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint of the sweep's width (required to train)")
    parser.add_argument("--out", type=Path, default=Path("runs/asha_vs_grid"))
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="change the sweep spec in both arms (repeatable), e.g. config.train.iterations=120")
    parser.add_argument("--arm", choices=["both", "asha", "grid"], default="both",
                        help="train both arms, or one (e.g. the grid, to --replay it)")
    parser.add_argument("--replay", type=Path, help="a finished grid arm's experiment folder: replay its results "
                        "through ASHA in random arrival orders instead of training")
    parser.add_argument("--metric", action="append", help="with --replay: the metric ASHA ranks by (repeatable)")
    parser.add_argument("--orders", type=int, default=2000, help="with --replay: random arrival orders")
    parser.add_argument("--tie", type=float, default=0.005, help="with --replay: final-AP margin counted as a tie")
    args = parser.parse_args()
    if args.replay:
        for metric in args.metric or ["AP"]:
            asha = yaml.safe_load(args.sweep.read_text()).get("scheduler", {})
            print(json.dumps(replay(args.replay.resolve(), asha, metric, args.orders, args.tie, seed=0)))
        return
    out = args.out.resolve()
    if (out / "runs").exists():
        sys.exit(f"error: {out / 'runs'} exists (an earlier run): pick a new --out; nothing was overwritten")
    if args.teacher is None or not args.teacher.is_file():
        sys.exit(f"error: --teacher {args.teacher}: file not found")
    out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher.resolve()
    arms = {arm: run_arm(args.sweep.resolve(), out, teacher, asha=arm == "asha", settings=args.set)
            for arm in (["asha", "grid"] if args.arm == "both" else [args.arm])}
    if len(arms) == 1:
        (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "arms": arms}, indent=1))
        print(json.dumps(arms, indent=1))
        return
    grid_order = ranking(arms["grid"]["trials"])
    summary = {
        "compute_ratio_iterations": round(arms["asha"]["iterations_trained"] / arms["grid"]["iterations_trained"], 3),
        "compute_ratio_trial_seconds": round(arms["asha"]["trial_seconds"] / arms["grid"]["trial_seconds"], 3),
        "wall_ratio": round(arms["asha"]["wall_s"] / arms["grid"]["wall_s"], 3),
        "same_best": arms["asha"]["best"] == arms["grid"]["best"],
        "asha_best_rank_in_grid": grid_order.index(arms["asha"]["best"]) + 1,
        "grid_ranking": [(n, arms["grid"]["trials"][n]["AP"]) for n in grid_order],
    }
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "arms": arms, "summary": summary}, indent=1))
    for arm, r in arms.items():
        best_ap = 100 * r["trials"][r["best"]]["AP"]
        print(f"{arm}: {r['iterations_trained']} iterations, {r['trial_seconds']:.0f} trial-s,"
              f" wall {r['wall_s']:.0f} s, stopped {len(r['stopped_early'])}, best {r['best']} (AP {best_ap:.1f})")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
