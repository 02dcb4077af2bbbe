"""Sweep results: one JSON summary per trial, and the report built from them (Markdown, CSV, AP-vs-capacity plot).

Each finished, failed or stopped trial writes `EXPERIMENT_DIR/results/<trial name>.json` (a `TrialSummary`);
`write_report` reads them all, so a report can be made at any time, from a sweep still running or one resumed.

Capacity follows the original README: backbone FLOPs relative to the width-1.0 backbone on an 800 x 1333 image,
summed over the inputs the role reads (teacher H and L, student L, FCOS baseline H). Two values are kept:

- `capacity`: at the paper's sizes (H 800 x 1333, L 400 x 667), comparable with the published column; the
  Markdown table shows this one, so rows read like the README's.
- `capacity_at_run_resolution`: at the run's own sizes. H is the paper's 800 x 1333 box scaled to the run's short
  side (`data.test_short_side`), shrunk further if its long side passes `data.max_size` (as the resize does), and
  L is half of H (rounded up). Padding to `size_divisibility` is not counted, as the paper does not count it. The
  plot uses this one: it is what the run actually spent for its AP, so resolution sweeps spread out on the x axis.
  At 800 / 1333 the two are equal.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msad.engine import storage
from msad.engine.evaluate import METRIC_NAMES
from msad.errors import UserError

if TYPE_CHECKING:
    from msad.config import Config

RESULTS_DIR = "results"
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_PLOT = "ap_vs_capacity.png"

ROLES = ("teacher", "fcos", "student")  # also the table's order within a width
RESOLUTIONS = {"teacher": "H & L", "student": "L", "fcos": "H"}  # the README's wording
ROLE_NAMES = {"teacher": "Teacher", "student": "Student", "fcos": "Baseline"}
FINAL_STATUSES = ("TERMINATED", "ERROR", "STOPPED")  # Tune's words; STOPPED = ended early by the scheduler (ASHA)
RUNNING = "RUNNING"  # a summary being filled in by its trial; never written
INTERVAL_KEYS = ("AP_lo", "AP_hi", "AP50_lo", "AP50_hi", "APs_lo", "APs_hi", "H_AP", "H_AP_lo", "H_AP_hi")
REPLICATE_KEYS = ("replicates", "H_replicates")  # long lists: kept in the JSON rows, not in CSV or W&B summaries
PAPER_SHORT_SIDE, PAPER_LONG_SIDE = 800, 1333
IMAGES_PER_1X = 90_000 * 16  # the 1x schedule: 90k iterations at batch 16 (about 12 COCO epochs)

TABLE_COLUMNS = ("Method", "Backbone", "Capacity", "Sched", "Width", "Role", "Resolution", "BoxAP", "95% CI", "AP50",
                 "APs", "KD alpha", "T")
RIGHT_ALIGNED = {"Capacity", "Width", "BoxAP", "95% CI", "AP50", "APs", "KD alpha", "T"}


# ---------------------------------------------------------------------------------------------------------------------
# Capacity at a run's resolution
# ---------------------------------------------------------------------------------------------------------------------


def run_image_sizes(h_short_side: int, max_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(H, L) image sizes, (height, width), for a run: the 800 x 1333 box scaled to `h_short_side`, capped by
    `max_size`, and L = H / 2 rounded up (as `msad.models.capacity.LOW_RESOLUTION`).

    Args:
        h_short_side: the run's H short side (`data.test_short_side`).
        max_size: the cap on H's long side (`data.max_size`).
    """
    long_side = h_short_side * PAPER_LONG_SIDE / PAPER_SHORT_SIDE
    scale = min(1.0, max_size / long_side)
    high = (round(h_short_side * scale), round(long_side * scale))
    return high, (math.ceil(high[0] / 2), math.ceil(high[1] / 2))


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def detector_gflops(width: float, role: str, high: tuple[int, int]) -> float:
    """GFLOPs of the whole detector of `role` for one H image of size `high` (and its half-size L): see
    `msad.models.capacity.detector_flops` (FPN and head at the paper's 256 channels and 80 classes).

    Args:
        width: backbone width multiplier.
        role: "teacher", "student" or "fcos".
        high: H image size (height, width).
    """
    from msad.models.capacity import detector_flops

    _check_role(role)
    return detector_flops(width, role, tuple(high)) / 1e9


def backbone_capacity(role: str, width: float, h_short_side: int, max_size: int) -> float:
    """Backbone FLOPs of `role`'s inputs at the sizes `run_image_sizes` gives, relative to width 1.0 at 800 x 1333
    (the README's capacity); at (800, 1333) it equals `msad.models.capacity.capacity_rows`' value.

    Args:
        role: "teacher" (H and L), "student" (L) or "fcos" (H).
        width: backbone width multiplier.
        h_short_side: the run's H short side.
        max_size: the cap on H's long side.
    """
    from msad.models.capacity import backbone_flops

    _check_role(role)
    high, low = run_image_sizes(h_short_side, max_size)
    inputs = {"teacher": (high, low), "student": (low,), "fcos": (high,)}[role]
    reference = backbone_flops(1.0, PAPER_SHORT_SIDE, PAPER_LONG_SIDE)
    return sum(backbone_flops(width, *size) for size in inputs) / reference


def capacity_for(role: str, width: float, h_short_side: int, max_size: int) -> tuple[float, float | None, float]:
    """(capacity at the run's resolution, the paper's capacity or None, detector GFLOPs at the run's resolution).

    Args:
        role: "teacher", "student" or "fcos".
        width: backbone width multiplier.
        h_short_side: the run's H short side.
        max_size: the cap on H's long side.

    Returns:
        See `backbone_capacity` and `detector_gflops`. The published value is the paper's for this role and width
        (at 800 x 1333), None for the FCOS baseline and for widths the paper does not list.
    """
    from msad.models.capacity import PUBLISHED_CAPACITY

    capacity = backbone_capacity(role, width, h_short_side, max_size)
    published = PUBLISHED_CAPACITY.get(width)
    published_capacity = None if published is None or role == "fcos" else published[0 if role == "teacher" else 1]
    return capacity, published_capacity, detector_gflops(width, role, run_image_sizes(h_short_side, max_size)[0])


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


# ---------------------------------------------------------------------------------------------------------------------
# One trial's summary: written by the runner, read by the report
# ---------------------------------------------------------------------------------------------------------------------


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
        paper_capacity = backbone_capacity(role, width, PAPER_SHORT_SIDE, PAPER_LONG_SIDE)
        sides = (h, h // 2)
        if role == "fcos" and resolution == "L":  # a baseline reading L: its own sizes are the L ones
            paper_capacity = backbone_capacity("student", width, PAPER_SHORT_SIDE, PAPER_LONG_SIDE)
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


def report_order(s: TrialSummary) -> tuple:
    """Widest first (the README's order); within a width teachers, then baselines, then students by KD weight and
    temperature; then larger inputs first."""
    return (-s.width, ROLES.index(s.role), s.kd_alpha if s.kd_alpha is not None else -1.0,
            s.kd_temperature if s.kd_temperature is not None else -1.0, -s.h_short_side, s.name)


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (capacity, AP) points no cheaper-or-equal point matches: each has a higher AP than every point of lower
    or equal capacity. Sorted by capacity, so AP rises along it; drawn as a step it is "the best AP for a capacity
    of at most x".

    Args:
        points: (capacity, AP) pairs, both finite.
    """
    front: list[tuple[float, float]] = []
    for capacity, ap in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or ap > front[-1][1]:
            front.append((capacity, ap))
    return front


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _box_ap_cell(s: TrialSummary) -> str:
    if s.status == "TERMINATED":
        return _percent(s.AP)
    return s.status if s.AP is None else f"{s.status} ({_percent(s.AP)})"


def _resolution_cell(s: TrialSummary) -> str:
    if s.role == "teacher":
        sides = f"{s.h_short_side}/{s.l_short_side}"
    else:
        sides = f"{s.l_short_side if s.resolution == 'L' else s.h_short_side}"
    return f"{s.resolution} ({sides})"


def interval_cell(low: float | None, high: float | None) -> str:
    """A 95 % interval in percent, e.g. "[10.1, 14.5]"; "-" when there is none."""
    return "-" if low is None or high is None else f"[{100 * low:.1f}, {100 * high:.1f}]"


def _table_row(s: TrialSummary) -> list[str]:
    return ["FCOS", "Slimmable-R50", f"{s.capacity:.3f}x", s.sched, f"{s.width:.2f}", ROLE_NAMES[s.role],
            _resolution_cell(s), _box_ap_cell(s), interval_cell(s.AP_lo, s.AP_hi), _percent(s.AP50),
            _percent(s.APs), _number(s.kd_alpha), _number(s.kd_temperature)]


def markdown_table(summaries: Sequence[TrialSummary]) -> str:
    """The README-style results table, one row per summary in the given order (AP columns in percent)."""
    return aligned_table(TABLE_COLUMNS, [_table_row(s) for s in summaries], RIGHT_ALIGNED)


def aligned_table(columns: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: set[str]) -> str:
    """A Markdown table padded so that it also reads well as plain text (the CLI prints it)."""
    rows = [list(columns), *(list(row) for row in rows)]
    sizes = [max(3, *(len(row[i]) for row in rows)) for i in range(len(columns))]  # a rule needs 3 dashes
    rule = [("-" * (n - 1) + ":") if col in right_aligned else "-" * n for col, n in zip(columns, sizes, strict=True)]
    lines = [[cell.rjust(n) if col in right_aligned else cell.ljust(n)
              for col, cell, n in zip(columns, row, sizes, strict=True)] for row in rows]
    lines.insert(1, rule)
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


CSV_EXTRA = ("name", "status", "h_short_side", "l_short_side", "capacity_at_run_resolution", "published_capacity",
             "gflops", "AP75", "APm", "APl", "iterations", "error", "checkpoint", "teacher_checkpoint", "trial_id",
             "seed", "replicate_of", "AP_lo", "AP_hi", "AP50_lo", "AP50_hi", "APs_lo", "APs_hi", "H_AP", "H_AP_lo",
             "H_AP_hi")


def _raw_row(s: TrialSummary) -> list[Any]:
    ci = None if s.AP_lo is None or s.AP_hi is None else f"{s.AP_lo:.6g} {s.AP_hi:.6g}"
    table = ["FCOS", "Slimmable-R50", s.capacity, s.sched, s.width, ROLE_NAMES[s.role], s.resolution, s.AP, ci,
             s.AP50, s.APs, s.kd_alpha, s.kd_temperature]
    return [*table, *(getattr(s, key) for key in CSV_EXTRA)]


def raw_table(summaries: Sequence[TrialSummary]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): the table's columns with raw values (metrics as fractions, capacity as a ratio, None =
    none), followed by the remaining summary fields (the CSV's and the W&B report table's content)."""
    return [*TABLE_COLUMNS, *CSV_EXTRA], [_raw_row(s) for s in summaries]


def write_csv(summaries: Sequence[TrialSummary], path: Path) -> None:
    """`raw_table` as CSV (empty = none), so spreadsheets get every number."""
    columns, rows = raw_table(summaries)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([("" if v is None else v) for v in row] for row in rows)


def short_name(s: TrialSummary) -> str:
    """A plot label: the trial name with its role as one letter, e.g. "S-w0.25-l128-kd0.2-t3"."""
    return f"{s.role[0].upper()}-{s.name.removeprefix(s.role + '-')}"


def plot_ap_vs_capacity(summaries: Sequence[TrialSummary], path: Path, title: str) -> None:
    """AP against capacity at each run's resolution (log x) for the trials that finished with an AP; students'
    Pareto front as a step line. Uses matplotlib's Agg canvas directly, so no global backend is touched.

    Args:
        summaries: all trials; failed, stopped and unevaluated ones are left out.
        path: the PNG to write.
        title: the plot's title (the experiment's name).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    done = [s for s in summaries if s.status == "TERMINATED" and s.AP is not None]
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"student": ("o", "C0", "student (L)"), "teacher": ("^", "C1", "teacher (H & L)"),
              "fcos": ("s", "C2", "plain FCOS baseline")}
    for role, (marker, color, label) in styles.items():
        group = [s for s in done if s.role == role]
        if group:
            ax.scatter([s.capacity_at_run_resolution for s in group], [100 * s.AP for s in group], marker=marker,
                       color=color, s=40, label=label, zorder=3)
            bars = [s for s in group if s.AP_lo is not None and s.AP_hi is not None]
            if bars:  # the 95 % bootstrap interval of each AP
                ax.errorbar([s.capacity_at_run_resolution for s in bars], [100 * s.AP for s in bars],
                            yerr=[[100 * max(0.0, s.AP - s.AP_lo) for s in bars],
                                  [100 * max(0.0, s.AP_hi - s.AP) for s in bars]],
                            fmt="none", ecolor=color, alpha=0.5, capsize=2, zorder=2)
    for s in done:
        ax.annotate(short_name(s), (s.capacity_at_run_resolution, 100 * s.AP), xytext=(4, 4),
                    textcoords="offset points", fontsize=7)
    students = [(s.capacity_at_run_resolution, 100 * s.AP) for s in done if s.role == "student"]
    if students:
        front = pareto_front(students)
        right = max(c for c, _ in students)
        ax.step([c for c, _ in front] + [right], [a for _, a in front] + [front[-1][1]], where="post", color="C0",
                alpha=0.6, label="students' Pareto front")
    if done:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))  # 0.01x rather than 10^-2
        ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no finished trials with an AP yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("backbone capacity at the run's input sizes (x width-1.0 backbone at 800 x 1333)")
    ax.set_ylabel("box AP (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120)


def _notes(summaries: Sequence[TrialSummary]) -> str:
    lines = [
        "BoxAP, AP50, APs: COCO box AP (%) on the validation set at the end of each trial; 95% CI: bootstrap "
        "interval of BoxAP over the validation images (train.bootstrap_samples resamples). Capacity: backbone "
        "FLOPs relative to width 1.0 at 800 x 1333, for the role's inputs at the paper's sizes (H 800 x 1333, "
        "L 400 x 667), as in the original README. Resolution: the inputs and their short sides in this run. The "
        "plot uses capacity at each run's own input sizes.",
    ]
    problems = [s for s in summaries if s.status != "TERMINATED"]
    if problems:
        lines.append("\nTrials that did not finish:\n")
        lines.extend(f"- `{s.name}`: {s.status}" + (f": {' '.join(s.error.split())}" if s.error else "")
                     for s in problems)
    return "\n".join(lines)


def write_report(experiment_dir: Path) -> str:
    """Write `report.md`, `report.csv` and `ap_vs_capacity.png` into the experiment folder from its trial
    summaries; returns the Markdown table (the CLI prints it).

    Args:
        experiment_dir: the sweep's experiment folder (holding `results/*.json`).

    Raises:
        UserError: no trial results yet, or an unreadable summary.
    """
    from msad.sweep.compare import comparison_notes, comparisons, comparisons_markdown, seed_table

    experiment_dir = Path(experiment_dir)
    summaries = read_trial_summaries(experiment_dir)
    table = markdown_table(summaries)
    found = comparisons(summaries)
    if found:
        table += f"\n\nComparisons:\n\n{comparisons_markdown(found)}\n\n{comparison_notes(found)}"
    seeds = seed_table(summaries)
    if seeds:
        table += f"\n\nAcross seeds (box AP, %):\n\n{seeds}"
    write_csv(summaries, experiment_dir / REPORT_CSV)
    plot_ap_vs_capacity(summaries, experiment_dir / REPORT_PLOT, title=experiment_dir.name)
    markdown = (f"# {experiment_dir.name}\n\n{table}\n\n{_notes(summaries)}\n\n"
                f"![AP vs capacity]({REPORT_PLOT})\n")
    storage.write_bytes(str(experiment_dir / REPORT_MD), markdown.encode())
    return table
