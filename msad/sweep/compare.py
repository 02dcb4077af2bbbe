"""Which differences in a sweep are real: paired comparisons of its trials, over seeds when it has several.

The comparisons a sweep answers without being asked:

- each distilled student against the same student without distillation (KD weight 0; same width, input, seed);
- each student against a plain FCOS that reads the same L image (a `baselines` trial at resolution L);
- each student against its teacher (H & L);
- each fusing teacher against its own H branch (what C-FF adds).

Every trial's final evaluation keeps its bootstrap replicates (`msad.engine.bootstrap`); trials scored on the same
validation images share their resamples, so a difference is computed per resample and its 95 % interval says
whether it could be image noise (one seed: it says nothing about another training run). With several seeds, each
seed's difference is shown and averaged, and the interval is a t-interval over the seeds that also counts the
image noise they share (`msad.engine.bootstrap.seed_t_interval`), so training noise widens it, with t tails for
few seeds. A difference is called real only when its interval excludes zero.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from msad.engine.bootstrap import Difference, Replicates, seed_averaged_difference
from msad.sweep.trials import TrialSummary, finished_with_ap

TABLE_COLUMNS = ("Comparison", "Seeds", "A", "B", "A - B", "Per seed", "95% CI", "Interval", "Real?")
INTERVAL_NAMES = {"images": "images, 1 seed", "t": "t over {n} seeds", "two-level": "bootstrap over {n} seeds"}


@dataclass(frozen=True)
class Comparison:
    """`a - b` in box AP: the label, the seeds both ran, their mean APs, each seed's difference and the paired
    difference with its interval (None: no bootstrap replicates to pair, e.g. `train.bootstrap_samples: 0`)."""

    label: str
    seeds: int
    mean_a: float
    mean_b: float
    difference: Difference | None
    per_seed: tuple[float, ...] = ()

    @property
    def interval_name(self) -> str | None:
        """How the interval was made, e.g. "images, 1 seed" or "t over 3 seeds"; None without an interval."""
        d = self.difference
        return None if d is None else INTERVAL_NAMES[d.method].format(n=d.seeds)

    @property
    def real(self) -> bool | None:
        return None if self.difference is None else self.difference.real


@dataclass(frozen=True)
class _Side:
    """One side of a comparison in one seed: AP and replicates (a trial, or a teacher's H branch)."""

    ap: float
    replicates: Replicates | None


def _group(s: TrialSummary) -> str:
    return s.replicate_of or s.name


def _side(s: TrialSummary, branch: str = "") -> _Side | None:
    ap = s.H_AP if branch == "H" else s.AP
    data = s.H_replicates if branch == "H" else s.replicates
    if ap is None:
        return None
    return _Side(ap, None if data is None else Replicates.from_dict(data))


def _describe(s: TrialSummary, with_temperature: bool = False) -> str:
    """How a comparison names a trial; students name their KD temperature too when the sweep varies it."""
    if s.role == "student":
        temperature = f" T {s.kd_temperature:g}" if with_temperature and s.kd_alpha else ""
        return f"student w{s.width:g} L{s.l_short_side} KD {s.kd_alpha:g}{temperature}"
    if s.role == "fcos":
        side = s.l_short_side if s.resolution == "L" else s.h_short_side
        return f"FCOS w{s.width:g} {s.resolution}{side}"
    return f"teacher w{s.width:g} H{s.h_short_side}&L{s.l_short_side}"


def _compare(label: str, pairs: list[tuple[_Side, _Side]]) -> Comparison:
    mean_a = statistics.fmean(a.ap for a, _ in pairs)
    mean_b = statistics.fmean(b.ap for _, b in pairs)
    usable = [(a.replicates, b.replicates) for a, b in pairs if a.replicates is not None and b.replicates is not None]
    difference = seed_averaged_difference(usable, "AP") if len(usable) == len(pairs) else None
    return Comparison(label, len(pairs), mean_a, mean_b, difference, tuple(a.ap - b.ap for a, b in pairs))


def comparisons(summaries: Sequence[TrialSummary]) -> list[Comparison]:
    """The sweep's paired comparisons (see the module docstring), seeds matched trial by trial."""
    done = finished_with_ap(summaries)
    found: dict[tuple[str, str, str], list[tuple[_Side, _Side]]] = defaultdict(list)  # (kind, a, b) -> per seed

    def add(kind: str, a: TrialSummary, b: TrialSummary, a_side: _Side | None, b_side: _Side | None) -> None:
        if a_side is not None and b_side is not None:
            found[(kind, _group(a), _group(b))].append((a_side, b_side))

    students = [s for s in done if s.role == "student"]
    for student in students:
        same_seed = [s for s in done if s.seed == student.seed and s.width == student.width]
        if student.kd_alpha:
            plain = [s for s in same_seed if s.role == "student" and s.kd_alpha == 0
                     and s.l_short_side == student.l_short_side and s.iterations == student.iterations]
            if plain:
                add("kd", student, plain[0], _side(student), _side(plain[0]))
        for fcos in (s for s in same_seed if s.role == "fcos" and s.resolution == "L"
                     and s.l_short_side == student.l_short_side):
            add("fcos", student, fcos, _side(student), _side(fcos))
        for teacher in (s for s in same_seed if s.role == "teacher" and s.l_short_side == student.l_short_side):
            add("teacher", teacher, student, _side(teacher), _side(student))
    for teacher in (s for s in done if s.role == "teacher" and s.H_AP is not None):
        add("fusion", teacher, teacher, _side(teacher), _side(teacher, "H"))

    by_name = {_group(s): s for s in done}
    temperatures = len({s.kd_temperature for s in students if s.kd_alpha}) > 1  # then labels name them

    def name(group: str) -> str:
        return _describe(by_name[group], temperatures)

    labels = {
        "kd": lambda a, b: f"{name(a)} vs without KD",
        "fcos": lambda a, b: f"{name(a)} vs plain {name(b)}",
        "teacher": lambda a, b: f"{name(a)} vs {name(b)}",
        "fusion": lambda a, b: f"{name(a)}: fused vs its H branch",
    }
    order = {"fusion": 0, "teacher": 1, "fcos": 2, "kd": 3}
    return [_compare(labels[kind](a, b), pairs)
            for (kind, a, b), pairs in sorted(found.items(), key=lambda item: (order[item[0][0]], item[0][1:]))]


def table_rows(items: Sequence[Comparison]) -> list[list[object]]:
    """The comparisons table's data, one row per comparison in `TABLE_COLUMNS` order, as numbers (AP fractions):
    label, seeds, mean A, mean B, A - B, each seed's difference ("0.008 0.001 0.011"), the interval ("low high"),
    how it was made and the verdict (None: no interval). `msad.sweep.report.comparisons_markdown` prints these;
    W&B's report run logs them."""
    def numbers(values: Sequence[float]) -> str:
        return " ".join(f"{v:.6g}" for v in values)

    return [[c.label, c.seeds, c.mean_a, c.mean_b, c.mean_a - c.mean_b, numbers(c.per_seed),
             None if c.difference is None else numbers((c.difference.low, c.difference.high)), c.interval_name,
             c.real] for c in items]
