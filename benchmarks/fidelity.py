"""Learning and MSAD fidelity on the built-in dataset: do the paper's qualitative claims hold at CPU scale?

Trains, in this one process (msad.engine.loop.run_training with a LocalContext, no Ray), on the same schedule:

  fcos_h     plain FCOS at H (short side 256)
  fcos_l     plain FCOS at L (images resized to short side 128 directly; P3..P7 of L)
  teacher    MSAD teacher (H & L, C-FF); evaluated on its fused, H-only and L-only branches (`--teacher-iterations`
             trains it longer than the rest)
  student_nokd  student on L, initialised from the teacher, kd_alpha 0 (the "L only + P2" baseline)
  student    MSAD student on L, initialised from the teacher, kd_alpha 0.2, T 3
  student_scratch  (opt-in) student on L, kd_alpha 0, random init: separates the P2 level from the teacher's init
  teacher_aa / student_aa   (--low-res-modes antialias) the same two with data.low_res_mode=antialias

and reports COCO AP / AP50 / APs on the whole val set with its 95 % bootstrap interval (and on the two halves of
the val set, even / odd image ids). Checks, each a paired bootstrap difference on the same resampled val images:
fused teacher > H-only; MSAD student > no-KD student; teacher > MSAD student; and the fraction of the
FCOS_L -> FCOS_H gap the student closes. One process trains one seed (`--seed`); `--combine` puts several seeds'
output folders together and averages the paired differences over them (a t-interval over the seeds that also
counts the image noise they share: `msad.engine.bootstrap.seed_t_interval`).

    python benchmarks/fidelity.py --iterations 300 --batch 8 --out runs/fidelity
    python benchmarks/fidelity.py --seed 1 --iterations 300 --batch 8 --out runs/fidelity_s1
    python benchmarks/fidelity.py --combine runs/fidelity runs/fidelity_s1
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from msad.build import DataPaths, build_model, build_val_dataset, resolve_data_paths
from msad.checkpoint import CHECKPOINT_FILE, load_checkpoint
from msad.config import Config, load_config
from msad.data.coco import CocoDetection
from msad.engine.bootstrap import Replicates, seed_averaged_difference
from msad.engine.evaluate import coco_evaluate
from msad.engine.in_process import LocalContext
from msad.engine.loop import BOOTSTRAP_FILE, RESULTS_FILE, evaluate, run_training

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu_base.yaml"
REFERENCE_BATCH, REFERENCE_LR = 8, 0.01  # cpu_base.yaml's lr is for batch 8; other batches scale it linearly
METRICS = ("AP", "AP50", "APs")
CHECKPOINT_PERIOD = 50  # a killed run resumes from here (LocalContext restores the newest checkpoint)
SCORE_FILE = "score{}.json"


class PrintingContext(LocalContext):
    """LocalContext that prints each report (a background run's log shows progress) and keeps the wall time.

    The seconds this process has trained are rewritten to `segments.json` at every report, so a run that is killed
    and resumed from its last checkpoint still adds up its wall time over all the processes that trained it.
    """

    def __init__(self, run_dir: Path, label: str) -> None:
        super().__init__(torch.device("cpu"), run_dir)
        self.label = label
        self.segments_file = run_dir / "segments.json"
        self.earlier = json.loads(self.segments_file.read_text()) if self.segments_file.is_file() else []
        self.start = time.perf_counter()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None:
        line = (f"[{self.label}] it {iteration:4d} loss {metrics.get('loss_total', float('nan')):.3f} "
                f"lr {metrics.get('lr', 0):.5f} kd_w {metrics.get('kd_weight', 0):.3f} "
                f"img/s {metrics.get('images_per_sec_per_worker', 0):.2f}")
        if "AP" in metrics:
            line += f" AP {100 * metrics['AP']:.1f}"
        print(line, flush=True)
        super().report(metrics, checkpoint_dir, iteration)
        if checkpoint_dir is not None:  # keep only the newest checkpoint (each holds full-width weights)
            for old in sorted(self.run_dir.glob("checkpoint_*"))[:-1]:
                shutil.rmtree(old)
        segment = {"until_iteration": iteration, "seconds": time.perf_counter() - self.start}
        self.segments_file.write_text(json.dumps([*self.earlier, segment]))

    @property
    def wall_s(self) -> float:
        """Training wall time over every process that trained this run (resumed segments included)."""
        return sum(s["seconds"] for s in self.earlier) + time.perf_counter() - self.start


@dataclass
class Score:
    """One model (or teacher branch) on the whole val set and on its two halves."""

    name: str
    description: str
    full: dict[str, float]
    halves: tuple[dict[str, float], dict[str, float]]
    train_s: float = 0.0
    eval_s: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    segments: int = 1  # processes that trained it (> 1: killed and resumed; train_s then includes redone steps)
    interval: dict[str, list[float]] = field(default_factory=dict)  # metric -> 95 % bootstrap [low, high]
    replicates: str | None = None  # the file of its bootstrap replicates (msad.engine.bootstrap)


def intervals(metrics: dict[str, Any]) -> dict[str, list[float]]:
    """The 95 % bootstrap intervals an evaluation reported (its "<metric>_lo" / "<metric>_hi" keys)."""
    return {k: [metrics[f"{k}_lo"], metrics[f"{k}_hi"]] for k in METRICS if f"{k}_lo" in metrics}


def schedule_overrides(iterations: int, batch: int) -> list[str]:
    """The cpu_base schedule (300 it: warm-up 50, steps 200/260, KD ramp 50) scaled to `iterations` and `batch`."""
    steps = sorted({max(1, round(iterations * 2 / 3)), max(2, round(iterations * 0.87))})
    steps = [s for s in steps if s < iterations]
    warmup = max(1, round(iterations / 6))
    return [f"train.iterations={iterations}", f"train.batch_per_worker={batch}",
            f"train.base_lr={REFERENCE_LR * batch / REFERENCE_BATCH}", f"train.warmup_iters={warmup}",
            f"train.lr_steps={steps}", f"train.kd_warmup_iters={warmup}",
            f"train.checkpoint_period={min(CHECKPOINT_PERIOD, iterations)}", "train.eval_period=0",
            "train.log_period=10"]


def checkpoint_of(run_dir: Path, iterations: int) -> Path:
    return run_dir / f"checkpoint_{iterations:07d}" / CHECKPOINT_FILE


def rescore(val_set: CocoDetection, results_json: Path) -> tuple[dict[str, float], dict[str, float]]:
    """AP of saved detections on the even- and odd-indexed halves of the val images (no new inference)."""
    results = json.loads(results_json.read_text())
    ids = sorted(val_set.image_ids)
    return tuple(coco_evaluate(val_set.coco, results, image_ids=half) for half in (ids[0::2], ids[1::2]))


class Fidelity:
    """Runs the trainings in one process and scores them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.common = [*schedule_overrides(args.iterations, args.batch),
                       f"data.shapes.num_val={args.num_val}", f"data.num_workers={args.loader_workers}",
                       f"train.seed={args.seed}", *args.overrides]
        self.scores: list[Score] = []
        if args.include is not None:
            self.scores = load_scores(args.include)[1]
        base = load_config(BASE_CONFIG, self.common)
        self.paths: DataPaths = resolve_data_paths(base.data)  # generate the dataset once, before any timing

    def config(self, name: str, extra: list[str]) -> Config:
        return load_config(BASE_CONFIG, [*self.common, f"distributed.run_name={name}", *extra])

    def cached(self, run_dir: Path, key: str, cfg: Config) -> Score | None:
        """A score saved by an earlier process for the same config, unless --fresh."""
        path = run_dir / SCORE_FILE.format(key)
        if self.args.fresh or not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved["config"] != cfg.to_dict():
            return None
        score = Score(**{**saved["score"], "halves": tuple(saved["score"]["halves"])})
        print(f"[{score.name}] reusing the finished run's score: " + fmt(score.full), flush=True)
        self.scores.append(score)
        return score

    def keep(self, run_dir: Path, key: str, cfg: Config, score: Score) -> None:
        self.scores.append(score)
        path = run_dir / SCORE_FILE.format(key)
        path.write_text(json.dumps({"config": cfg.to_dict(), "score": score.__dict__}, indent=2))
        self.write()

    def train(self, name: str, description: str, extra: list[str]) -> tuple[Config, Path]:
        """Train one run in `out/name` (resuming an interrupted one of the same config); returns its config and
        final checkpoint."""
        cfg = self.config(name, extra)
        run_dir = self.out / name
        checkpoint = checkpoint_of(run_dir, cfg.train.iterations)
        if checkpoint.is_file() and self.cached(run_dir, "", cfg) is not None:
            return cfg, checkpoint
        config_file = run_dir / "config.json"
        if self.args.fresh or not config_file.is_file() or json.loads(config_file.read_text()) != cfg.to_dict():
            shutil.rmtree(run_dir, ignore_errors=True)  # LocalContext would resume from a stale checkpoint
            run_dir.mkdir(parents=True)
            config_file.write_text(json.dumps(cfg.to_dict()))
        ctx = PrintingContext(run_dir, name)
        run_training(cfg, self.paths, ctx)
        final = ctx.reports[-1]
        val_set = build_val_dataset(cfg, self.paths)
        halves = rescore(val_set, checkpoint.parent / RESULTS_FILE)
        losses = {k: float(v) for k, v in final.items() if k.startswith("loss")}
        score = Score(name, description, {k: final[k] for k in METRICS}, halves, ctx.wall_s, losses=losses,
                      segments=len(ctx.earlier) + 1, interval=intervals(final),
                      replicates=str(checkpoint.parent / BOOTSTRAP_FILE))
        print(f"[{name}] done, {ctx.wall_s:.0f} s training: " + fmt(score.full), flush=True)
        self.keep(run_dir, "", cfg, score)
        return cfg, checkpoint

    def teacher_branches(self, name: str, cfg: Config, checkpoint: Path) -> None:
        """Score the teacher's H-only and L-only branches (the loop already scored the fused one)."""
        run_dir = self.out / name
        todo = [b for b in ("high", "low") if self.cached(run_dir, f"_{b}", cfg) is None]
        if not todo:
            return
        model = build_model(cfg)
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
        val_set = build_val_dataset(cfg, self.paths)
        ctx = LocalContext(torch.device("cpu"))
        for branch in todo:
            results_json = run_dir / f"{branch}_{RESULTS_FILE}"
            bootstrap_json = run_dir / f"{branch}_{BOOTSTRAP_FILE}"
            start = time.perf_counter()
            full = evaluate(model, val_set, cfg, ctx, output_json=results_json, branch=branch,
                            bootstrap_json=bootstrap_json)
            elapsed = time.perf_counter() - start
            label = {"high": "H only", "low": "L only"}[branch]
            score = Score(f"{name}:{branch}", f"teacher branch {label}", {k: full[k] for k in METRICS},
                          rescore(val_set, results_json), eval_s=elapsed, interval=intervals(full),
                          replicates=str(bootstrap_json))
            print(f"[{name}:{branch}] eval {elapsed:.0f} s: " + fmt(score.full), flush=True)
            self.keep(run_dir, f"_{branch}", cfg, score)

    def run(self) -> None:
        teacher_tag = {"nearest": "", "antialias": "_aa"}
        runs = set(self.args.runs)
        for mode in self.args.low_res_modes:
            tag = teacher_tag[mode]
            mode_override = [f"data.low_res_mode={mode}"]
            if not {"teacher", "student", "student_nokd", "student_scratch"} & runs:
                continue
            teacher_iterations = self.args.teacher_iterations or self.args.iterations
            longer = (schedule_overrides(teacher_iterations, self.args.batch)
                      if teacher_iterations != self.args.iterations else [])
            cfg, teacher_ckpt = self.train(f"teacher{tag}", f"MSAD teacher, fused (L: {mode}; {teacher_iterations} it)",
                                           ["train.role=teacher", *mode_override, *longer])
            self.teacher_branches(f"teacher{tag}", cfg, teacher_ckpt)
            student = ["train.role=student", f"train.teacher_checkpoint={teacher_ckpt}", *mode_override]
            if "student_nokd" in runs and mode == "nearest":
                self.train("student_nokd", "student at L, no KD (alpha 0)", [*student, "train.kd_alpha=0"])
            if "student_scratch" in runs and mode == "nearest":
                self.train("student_scratch", "student at L, no KD, random init (not the teacher's)",
                           [*student, "train.kd_alpha=0", "train.init_from_teacher=false"])
            if "student" in runs:
                self.train(f"student{tag}", f"MSAD student at L (alpha 0.2, T 3; L: {mode})",
                           [*student, "train.kd_alpha=0.2", "train.kd_temperature=3.0"])
        baseline_iterations = self.args.baseline_iterations or self.args.iterations
        longer = (schedule_overrides(baseline_iterations, self.args.batch)
                  if baseline_iterations != self.args.iterations else [])
        if "fcos_h" in runs:
            self.train("fcos_h", f"plain FCOS at H (256; {baseline_iterations} it)", ["train.role=fcos", *longer])
        if "fcos_l" in runs:
            self.train("fcos_l", f"plain FCOS at L (128, resized directly; {baseline_iterations} it)",
                       ["train.role=fcos", "data.train_short_sides=[128]", "data.test_short_side=128",
                        "data.max_size=192", "data.size_divisibility=128", *longer])
        self.write()

    def write(self) -> None:
        args = {**vars(self.args), "include": str(self.args.include) if self.args.include else None}
        payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": args,
                   "overrides": self.common, "torch_threads": torch.get_num_threads(),
                   "scores": [s.__dict__ for s in self.scores]}
        (self.out / "results.json").write_text(json.dumps(payload, indent=2))
        (self.out / "results.md").write_text(markdown([(self.args.seed, self.scores)]))


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * metrics[k]:.1f}" for k in METRICS)


def load_scores(results_json: Path) -> tuple[int, list[Score]]:
    """The training seed and the scores of a results.json this script wrote."""
    saved = json.loads(results_json.read_text())
    return int(saved["args"]["seed"]), [Score(**{**s, "halves": tuple(s["halves"])}) for s in saved["scores"]]


def _gap_closed(s: float, low: float, high: float) -> str:
    return f"{(s - low) / (high - low):.2f}" if high != low else "n/a"


def _replicates(score: Score) -> Replicates | None:
    path = Path(score.replicates) if score.replicates else None
    return Replicates.from_dict(json.loads(path.read_text())) if path and path.is_file() else None


def claims(runs: list[tuple[int, list[Score]]]) -> Iterator[str]:
    """The paper's qualitative claims. With bootstrap replicates: the paired AP difference on the same resampled
    val images, averaged over the training seeds given (a t-interval over seeds plus shared image noise), called a
    difference only when its 95 % interval excludes zero. Without (older scores): the sign on the full set and on
    each val half."""
    seeds = [{s.name: s for s in scores} for _, scores in runs]

    def compare(a: str, b: str, claim: str) -> Iterator[str]:
        both = [by for by in seeds if a in by and b in by]
        if not both:
            return
        per_seed = [100 * (by[a].full["AP"] - by[b].full["AP"]) for by in both]
        pairs = [(_replicates(by[a]), _replicates(by[b])) for by in both]
        difference = (seed_averaged_difference(pairs, "AP")
                      if all(x is not None and y is not None for x, y in pairs) else None)
        if difference is not None:
            verdict = "holds" if difference.low > 0 else "fails" if difference.high < 0 else "within noise"
            seed_text = f"; per seed {' / '.join(f'{d:+.1f}' for d in per_seed)}" if len(both) > 1 else ""
            yield (f"- {claim}: {verdict} (AP difference {100 * difference.point:+.1f}, 95% CI "
                   f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] over {len(both)} seed(s) and the "
                   f"val images{seed_text})")
            return
        by = both[0]
        parts = [by[a].full, *by[a].halves], [by[b].full, *by[b].halves]
        diffs = [100 * (x["AP"] - y["AP"]) for x, y in zip(*parts, strict=True)]
        verdict = "holds" if diffs[0] > 0 else "fails"
        yield (f"- {claim}: {verdict} (AP difference {diffs[0]:+.1f}; on the val halves "
               f"{diffs[1]:+.1f} / {diffs[2]:+.1f}; no bootstrap replicates)")

    yield from compare("teacher", "teacher:high", "fused teacher beats its H-only branch")
    yield from compare("student", "student_nokd", "MSAD student beats the no-KD student")
    yield from compare("teacher", "student", "teacher (H & L) stays ahead of the MSAD student")
    yield from compare("student", "fcos_l", "MSAD student beats plain FCOS at L")
    yield from compare("student_nokd", "fcos_l", "no-KD student beats plain FCOS at L")
    yield from compare("student_scratch", "fcos_l", "L on P2..P6 (student layout, random init) beats plain FCOS at L")
    yield from compare("student_nokd", "student_scratch", "initialising the student from the teacher helps (no KD)")
    yield from compare("teacher_aa", "teacher", "antialias L beats nearest L (teacher, fused)")
    yield from compare("student_aa", "student", "antialias L beats nearest L (MSAD student)")

    def mean_ap(name: str) -> float | None:
        values = [by[name].full["AP"] for by in seeds if name in by]
        return sum(values) / len(values) if values else None

    for student, label in (("student", "the MSAD student"),
                           ("student_nokd", "the no-KD student (P2 of L, teacher init)")):
        s, low, high = mean_ap(student), mean_ap("fcos_l"), mean_ap("fcos_h")
        if None not in (s, low, high):
            yield f"- fraction of the FCOS_L -> FCOS_H AP gap closed by {label}: {_gap_closed(s, low, high)}"


def _cell(score: Score, metric: str) -> str:
    low_high = score.interval.get(metric)
    return f"[{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]" if low_high else "-"


def markdown(runs: list[tuple[int, list[Score]]]) -> str:
    """One row per model and training seed (AP with its 95 % bootstrap interval over the val images), then the
    claims."""
    lines = ["| run | model | seed | AP | 95% CI | AP50 | APs | AP val half A / B | train s | eval s |",
             "|-----|-------|-----:|---:|-------:|-----:|----:|------------------:|--------:|-------:|"]
    names = list(dict.fromkeys(s.name for _, scores in runs for s in scores))
    for name in names:
        for seed, scores in runs:
            for s in (s for s in scores if s.name == name):
                half = " / ".join(f"{100 * h['AP']:.1f}" for h in s.halves)
                lines.append(f"| {s.name} | {s.description} | {seed} | {100 * s.full['AP']:.1f} | {_cell(s, 'AP')} | "
                             f"{100 * s.full['AP50']:.1f} | {100 * s.full['APs']:.1f} | {half} | {s.train_s:.0f} | "
                             f"{s.eval_s:.0f} |")
    return "\n".join([*lines, "", *claims(runs), ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300, help="training iterations of every run")
    parser.add_argument("--batch", type=int, default=8, help="images per iteration (lr scales linearly from 8)")
    parser.add_argument("--out", default="runs/fidelity", help="output folder (run folders, results.json/.md)")
    parser.add_argument("--num-val", type=int, default=128, help="validation images of the built-in dataset")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes")
    parser.add_argument("--teacher-iterations", type=int, default=None,
                        help="train the teacher longer than the other runs (default: --iterations), so that it stays "
                        "ahead of students that start from it")
    parser.add_argument("--baseline-iterations", type=int, default=None,
                        help="train the plain FCOS baselines this long (default: --iterations); teacher + student "
                        "iterations compare the student with a baseline that had the same training budget")
    parser.add_argument("--seed", type=int, default=0, help="training seed (weights init and data order)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides for every run, e.g. model.fusion_init=original")
    parser.add_argument("--runs", nargs="+", default=["fcos_h", "fcos_l", "teacher", "student_nokd", "student"],
                        choices=["fcos_h", "fcos_l", "teacher", "student_nokd", "student", "student_scratch"],
                        help="which trainings to run (a student needs the teacher, which is then trained too)")
    parser.add_argument("--low-res-modes", nargs="+", default=["nearest"], choices=["nearest", "antialias"],
                        help="how L is made from H for teacher and students (antialias runs are tagged _aa)")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain everything; by default finished runs of the same config in --out are reused "
                        "and interrupted ones resume from their last checkpoint")
    parser.add_argument("--include", type=Path, default=None,
                        help="results.json of an earlier run whose scores join the table and the checks")
    parser.add_argument("--combine", nargs="+", type=Path, default=None, metavar="OUT",
                        help="train nothing: print the table and the claims of earlier --out folders together, one "
                        "per training seed (paired differences averaged over the seeds)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.combine:
        print(markdown([load_scores(folder / "results.json") for folder in args.combine]))
        return
    fidelity = Fidelity(args)
    fidelity.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fidelity.run()
    elapsed = time.perf_counter() - start
    print(f"\n{markdown([(args.seed, fidelity.scores)])}\ntotal {elapsed:.0f} s; written to {fidelity.out}")


if __name__ == "__main__":
    main()
