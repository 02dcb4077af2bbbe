"""A sweep's record of its trials: one JSON summary per trial (`TrialSummary`), written by the sweep's driver
(`msad.sweep.callbacks`), read by the report (`msad.sweep.report`), the comparisons (`msad.sweep.compare`) and W&B
(`msad.sweep.tracking`).

Each finished, failed or stopped trial writes `EXPERIMENT_DIR/results/<trial name>.json`; `read_trial_summaries`
reads them all, so a report can be made at any time, from a sweep still running or one resumed.

Capacity follows the original README: backbone FLOPs relative to the width-1.0 backbone on an 800 x 1333 image,
summed over the inputs the role reads (teacher H and L, student L, FCOS baseline H). Two values are kept
(`msad.models.capacity` counts them):

- `capacity`: at the paper's sizes (H 800 x 1333, L 400 x 667), comparable with the published column; the
  Markdown table shows this one, so rows read like the README's.
- `capacity_at_run_resolution`: at the run's own sizes. H is the paper's 800 x 1333 box scaled to the run's short
  side (`data.test_short_side`), shrunk further if its long side passes `data.max_size` (as the resize does), and
  L is half of H (rounded up). Padding to `size_divisibility` is not counted, as the paper does not count it. The
  plot uses this one: it is what the run actually spent for its AP, so resolution sweeps spread out on the x axis.
  At 800 / 1333 the two are equal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msad import storage
from msad.checkpoint import ROLES
from msad.engine.evaluate import METRIC_NAMES
from msad.errors import UserError
from msad.models.capacity import HIGH_RESOLUTION, backbone_capacity, capacity_for

if TYPE_CHECKING:
    from msad.config import Config

RESULTS_DIR = "results"
RESOLUTIONS = {"teacher": "H & L", "student": "L", "fcos": "H"}  # the README's wording
FINAL_STATUSES = ("TERMINATED", "ERROR", "STOPPED")  # Tune's words; STOPPED = ended early by the scheduler (ASHA)
RUNNING = "RUNNING"  # a summary being filled in by its trial; never written
INTERVAL_KEYS = ("AP_lo", "AP_hi", "AP50_lo", "AP50_hi", "APs_lo", "APs_hi", "H_AP", "H_AP_lo", "H_AP_hi")
REPLICATE_KEYS = ("replicates", "H_replicates")  # long lists: kept in the JSON rows, not in CSV or W&B summaries
IMAGES_PER_1X = 90_000 * 16  # the 1x schedule: 90k iterations at batch 16 (about 12 COCO epochs)


def schedule_name(iterations: int, total_batch: int) -> str:
    """The README's "Sched": "1x", "2x", ... when the run sees a whole multiple of half a 1x schedule's images
    (90k x 16), else the iteration count, e.g. "300it".

    Args:
        iterations: training iterations.
        total_batch: images per iteration over all workers.
    """
    images = iterations * total_batch
    if images % (IMAGES_PER_1X // 2) == 0:
        return f"{images / IMAGES_PER_1X:g}x"
    return f"{iterations}it"


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class TrialSummary:
    """What a sweep keeps of one trial (one row of the report). Metrics are fractions in [0, 1], None when the
    trial never evaluated; kd_alpha / kd_temperature are None for teachers and FCOS baselines.
    """

    name: str
    role: str  # "teacher" | "student" | "fcos"
    width: float
    h_short_side: int
    l_short_side: int
    resolution: str  # "H & L" | "L" | "H"
    kd_alpha: float | None
    kd_temperature: float | None
    iterations: int
    sched: str  # "1x" or "300it" (see schedule_name)
    capacity: float  # relative to width 1.0 at 800 x 1333, at the paper's sizes
    capacity_at_run_resolution: float  # the same at the run's own sizes
    published_capacity: float | None
    gflops: float  # whole detector, at the run's sizes
    AP: float | None
    AP50: float | None
    AP75: float | None
    APs: float | None
    APm: float | None
    APl: float | None
    status: str  # "TERMINATED" | "ERROR" | "STOPPED" ("RUNNING" only while the trial fills it in)
    error: str | None
    checkpoint: str | None
    teacher_checkpoint: str | None
    trial_id: str | None
    started_at: float | None = None  # driver clock (time.time()) when Tune started the trial
    ended_at: float | None = None  # ... and when it ended (completed, stopped or failed)
    seed: int = 0  # train.seed
    replicate_of: str | None = None  # the trial's name without its seed suffix (None: the sweep has one seed)
    # 95 % bootstrap intervals over the validation images (msad.engine.bootstrap), fractions
    AP_lo: float | None = None
    AP_hi: float | None = None
    AP50_lo: float | None = None
    AP50_hi: float | None = None
    APs_lo: float | None = None
    APs_hi: float | None = None
    H_AP: float | None = None  # a fusing teacher's H branch alone: what C-FF adds is AP - H_AP
    H_AP_lo: float | None = None
    H_AP_hi: float | None = None
    replicates: dict[str, Any] | None = None  # the final evaluation's per-resample metrics (Replicates.to_dict)
    H_replicates: dict[str, Any] | None = None  # the same for the teacher's H branch

    @classmethod
    def for_trial(cls, tune_config: dict[str, Any], cfg: Config, trial_id: str | None = None) -> TrialSummary:
        """Everything known before training (names, sizes, capacities), status RUNNING and no metrics yet.

        Args:
            tune_config: the trial's Tune config (its "trial_name" names the summary).
            cfg: the trial's msad config.
            trial_id: Tune's trial id, when known (`ray.tune.get_context().get_trial_id()`).
        """
        role, width, h = cfg.train.role, cfg.model.width, cfg.data.test_short_side
        at_run, published, gflops = capacity_for(role, width, h, cfg.data.max_size)
        student = role == "student"
        resolution = tune_config.get("resolution") or RESOLUTIONS[role]
        paper_capacity = backbone_capacity(role, width, *HIGH_RESOLUTION)
        sides = (h, h // 2)
        if role == "fcos" and resolution == "L":  # a baseline reading L: its own sizes are the L ones
            paper_capacity = backbone_capacity("student", width, *HIGH_RESOLUTION)
            sides = (2 * h, h)
        replicate_of = tune_config.get("replicate_of")
        return cls(
            name=str(tune_config["trial_name"]), role=role, width=width, h_short_side=sides[0],
            l_short_side=sides[1], resolution=resolution, kd_alpha=cfg.train.kd_alpha if student else None,
            kd_temperature=cfg.train.kd_temperature if student else None, iterations=cfg.train.iterations,
            sched=schedule_name(cfg.train.iterations, cfg.train.batch_per_worker * cfg.distributed.num_workers),
            capacity=paper_capacity, capacity_at_run_resolution=at_run, published_capacity=published, gflops=gflops,
            AP=None, AP50=None, AP75=None, APs=None, APm=None, APl=None, status=RUNNING, error=None,
            checkpoint=None, teacher_checkpoint=cfg.train.teacher_checkpoint if student else None,
            trial_id=trial_id, seed=cfg.train.seed,
            replicate_of=None if replicate_of in (None, tune_config["trial_name"]) else str(replicate_of),
        )

    def finished(self, metrics: dict[str, Any], checkpoint: str | Path | None,
                 replicates: dict[str, dict[str, Any] | None] | None = None) -> TrialSummary:
        """This summary for a trial that ran to the end: its last metrics and its (best) checkpoint.

        Args:
            metrics: the trial's final metrics; the keys of METRIC_NAMES and INTERVAL_KEYS it lacks stay None.
            checkpoint: the checkpoint file to use (students: the teacher file a later sweep names).
            replicates: {"replicates": ..., "H_replicates": ...} of the final evaluation, when it bootstrapped.
        """
        done = self._with_metrics(metrics, status="TERMINATED", checkpoint=checkpoint)
        return dataclasses.replace(done, **{k: v for k, v in (replicates or {}).items() if k in REPLICATE_KEYS})

    def stopped(self, metrics: dict[str, Any], checkpoint: str | Path | None = None) -> TrialSummary:
        """This summary for a trial the scheduler ended early; `metrics` are its last reported ones."""
        return self._with_metrics(metrics, status="STOPPED", checkpoint=checkpoint)

    def failed(self, error: str) -> TrialSummary:
        """This summary for a trial that raised; `error` is one line saying why."""
        return dataclasses.replace(self, status="ERROR", error=error)

    def _with_metrics(self, metrics: dict[str, Any], status: str, checkpoint: str | Path | None) -> TrialSummary:
        values = {key: _finite_or_none(metrics.get(key)) for key in (*METRIC_NAMES, *INTERVAL_KEYS)}
        return dataclasses.replace(self, **values, status=status,
                                   checkpoint=None if checkpoint is None else str(checkpoint))

    def to_json(self) -> str:
        """Strict JSON (no NaN): unmeasured metrics are null."""
        data = dataclasses.asdict(self)
        for key in (*METRIC_NAMES, *INTERVAL_KEYS):
            data[key] = _finite_or_none(data[key])
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrialSummary:
        """Parse `to_json`'s output; NaN metrics (from other writers) read as None.

        Raises:
            ValueError: not JSON, keys missing or unknown, or a role / status outside the allowed ones.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        required = [f.name for f in fields if f.default is dataclasses.MISSING]  # rows of older versions lack others
        missing, unknown = [n for n in required if n not in data], [k for k in data if k not in names]
        if missing or unknown:
            raise ValueError(f"missing keys {missing}, unknown keys {unknown}")
        if data["role"] not in ROLES or data["status"] not in FINAL_STATUSES:
            raise ValueError(f"role {data['role']!r} (allowed: {', '.join(ROLES)}) or status {data['status']!r} "
                             f"(allowed: {', '.join(FINAL_STATUSES)}) not allowed")
        for key in (*METRIC_NAMES, *INTERVAL_KEYS):
            data[key] = _finite_or_none(data.get(key))
        return cls(**data)


def write_trial_summary(experiment_dir: str | Path, summary: TrialSummary) -> Path:
    """Write `summary` to `experiment_dir/results/<name>.json` atomically (temp file, then rename), so a report
    never reads half a file; a re-run trial replaces its summary.

    Args:
        experiment_dir: the sweep's experiment folder.
        summary: a final summary (status TERMINATED, ERROR or STOPPED).
    """
    if summary.status not in FINAL_STATUSES:
        raise ValueError(f"trial {summary.name}: status {summary.status!r} is not final ({', '.join(FINAL_STATUSES)})")
    if not summary.name or "/" in summary.name or summary.name.startswith("."):
        raise ValueError(f"trial name {summary.name!r} cannot be a file name")
    path = Path(experiment_dir) / RESULTS_DIR / f"{summary.name}.json"
    storage.write_bytes(str(path), summary.to_json().encode())  # temp file + rename: readers never see half a row
    return path


def read_trial_summaries(experiment_dir: str | Path) -> list[TrialSummary]:
    """Every `results/*.json` of an experiment, in the report's order (see `report_order`).

    Raises:
        UserError: the folder holds no results yet, or a file is not a trial summary.
    """
    experiment_dir = Path(experiment_dir)
    paths = sorted((experiment_dir / RESULTS_DIR).glob("*.json"))
    if not paths:
        raise UserError(f"{experiment_dir}: no trial results yet ({RESULTS_DIR}/*.json)")
    summaries = []
    for path in paths:
        try:
            summaries.append(TrialSummary.from_json(path.read_text()))
        except (ValueError, TypeError) as err:
            raise UserError(f"{path}: not a trial summary: {' '.join(str(err).split())}") from None
    return sorted(summaries, key=report_order)


def finished_with_ap(summaries: Sequence[TrialSummary]) -> list[TrialSummary]:
    """The trials that ran to the end and have an AP: what the comparisons, the seed table and the plot use."""
    return [s for s in summaries if s.status == "TERMINATED" and s.AP is not None]


def report_order(s: TrialSummary) -> tuple:
    """Widest first (the README's order); within a width teachers, then baselines, then students by KD weight and
    temperature; then larger inputs first."""
    return (-s.width, ROLES.index(s.role), s.kd_alpha if s.kd_alpha is not None else -1.0,
            s.kd_temperature if s.kd_temperature is not None else -1.0, -s.h_short_side, s.name)


def error_line(trial: Any) -> str:
    """The trial's own exception line (e.g. 'DependencyFailedError: teacher ... failed') out of Tune's text."""
    local = Path(trial.error_file) if trial.error_file else None  # written on the driver before callbacks run
    text = local.read_text() if local is not None and local.is_file() else str(trial.get_error() or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return (named or lines or ["unknown error"])[-1][:500]
