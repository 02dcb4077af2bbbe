"""The sweep report, rendered from its trial summaries (`msad.sweep.trials`): Markdown, CSV, AP-vs-capacity plot.

`write_report` reads every `results/*.json` of an experiment, so a report can be made at any time, from a sweep
still running or one resumed. The numbers come from elsewhere: each trial's from its summary (capacities counted by
`msad.models.capacity`), the paired comparisons from `msad.sweep.compare`; this module only lays them out.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from msad import storage
from msad.sweep.compare import TABLE_COLUMNS as COMPARISON_COLUMNS
from msad.sweep.compare import Comparison, comparisons, table_rows
from msad.sweep.trials import TrialSummary, finished_with_ap, read_trial_summaries

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_PLOT = "ap_vs_capacity.png"

ROLE_NAMES = {"teacher": "Teacher", "student": "Student", "fcos": "Baseline"}
TABLE_COLUMNS = ("Method", "Backbone", "Capacity", "Sched", "Width", "Role", "Resolution", "BoxAP", "95% CI", "AP50",
                 "APs", "KD alpha", "T")
RIGHT_ALIGNED = {"Capacity", "Width", "BoxAP", "95% CI", "AP50", "APs", "KD alpha", "T"}
COMPARISON_RIGHT_ALIGNED = {"Seeds", "A", "B", "A - B", "Per seed", "95% CI"}
SEED_COLUMNS = ("Trial", "Seeds", "Mean AP", "SD", "Min", "Max")


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

    done = finished_with_ap(summaries)
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


# ---------------------------------------------------------------------------------------------------------------------
# The comparisons (`msad.sweep.compare`) and the seeds
# ---------------------------------------------------------------------------------------------------------------------


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def comparisons_markdown(items: Sequence[Comparison]) -> str:
    """The comparisons as a Markdown table (AP in percent; the data of `table_rows`): each seed's difference beside
    their mean when there are several, the interval and how it was made; "yes" only when it excludes zero."""
    rows = []
    for c, (label, seeds, mean_a, mean_b, difference, *_) in zip(items, table_rows(items), strict=True):
        d = c.difference
        real = "-" if c.real is None else ("**yes**" if c.real else "no")
        per_seed = " / ".join(_signed(v) for v in c.per_seed) if len(c.per_seed) > 1 else "-"
        rows.append([label, str(seeds), f"{100 * mean_a:.1f}", f"{100 * mean_b:.1f}", _signed(difference), per_seed,
                     "-" if d is None else interval_cell(d.low, d.high), c.interval_name or "-", real])
    return aligned_table(COMPARISON_COLUMNS, rows, COMPARISON_RIGHT_ALIGNED)


def seed_table(summaries: Sequence[TrialSummary]) -> str | None:
    """Mean, spread and range of AP over the seeds of each replicated trial; None when no trial has several."""
    groups: dict[str, list[float]] = defaultdict(list)
    for s in finished_with_ap(summaries):
        if s.replicate_of:
            groups[s.replicate_of].append(s.AP)
    rows = [[name, str(len(aps)), f"{100 * statistics.fmean(aps):.1f}",
             f"{100 * statistics.stdev(aps):.1f}" if len(aps) > 1 else "-", f"{100 * min(aps):.1f}",
             f"{100 * max(aps):.1f}"] for name, aps in groups.items()]
    return aligned_table(SEED_COLUMNS, rows, {"Seeds", "Mean AP", "SD", "Min", "Max"}) if rows else None


def comparison_notes(items: Sequence[Comparison]) -> str:
    """What the comparison table means, in two sentences, plus the count of real differences."""
    real = sum(1 for c in items if c.real)
    defined = sum(1 for c in items if c.real is not None)
    text = ("A - B: difference in box AP (points) on the same validation images, the mean over seeds when there "
            "are several (Per seed: each seed's own). 95% CI, by Interval: \"images, 1 seed\" is a paired bootstrap "
            "over those images, which says nothing about another training run; \"t over n seeds\" is a t-interval "
            "over the seeds' differences plus the image noise they share (it covered 95-98 % of known differences "
            "in simulation from 2 seeds on; benchmarks/interval_coverage.py). Real? yes only when the interval "
            "excludes 0.")
    return f"{text} {real} of {defined} comparisons are real." if defined else text


def write_report(experiment_dir: Path) -> str:
    """Write `report.md`, `report.csv` and `ap_vs_capacity.png` into the experiment folder from its trial
    summaries; returns the Markdown table (the CLI prints it).

    Args:
        experiment_dir: the sweep's experiment folder (holding `results/*.json`).

    Raises:
        UserError: no trial results yet, or an unreadable summary.
    """
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
