"""Paired comparisons in a sweep's report: which trial is compared with which, over seeds, and what the report says.

Replicates here are built by hand (a base set of per-resample APs plus a per-model offset and noise), so the
expected verdicts are known: the numbers of a real evaluation are covered in test_bootstrap.py.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pytest

from msad.config import config_from_dict
from msad.engine.bootstrap import Replicates
from msad.sweep.compare import comparisons
from msad.sweep.report import write_report
from msad.sweep.trials import TrialSummary, write_trial_summary

SAMPLES = 300
BASE = np.random.default_rng(0).normal(0.30, 0.03, SAMPLES)  # image noise every model shares


def replicates(offset: float, noise: float = 0.0, seed: int = 1) -> dict:
    own = np.random.default_rng(seed).normal(0.0, noise, SAMPLES) if noise else 0.0
    values = BASE + offset + own
    point = 0.30 + offset  # the base set's mean: the replicates sit around the point value
    return Replicates(0, "digest-of-the-val-set", 64, {"AP": list(values), "AP50": list(values + 0.2),
                                                       "APs": list(values / 2)},
                      {"AP": point, "AP50": point + 0.2, "APs": point / 2}).to_dict()


def row(name: str, role: str, ap_offset: float, seed: int = 0, kd_alpha: float | None = None,
        resolution: str = "", noise: float = 0.0, h_offset: float | None = None, several_seeds: bool = False,
        kd_temperature: float = 3.0) -> TrialSummary:
    """A finished trial at width 0.25, H 256 / L 128, whose AP is the shared base + `ap_offset`."""
    train = {"role": role, "seed": seed, "kd_temperature": kd_temperature,
             **({"kd_alpha": kd_alpha} if kd_alpha is not None else {})}
    data = {"test_short_side": 128, "train_short_sides": [128], "max_size": 192, "size_divisibility": 128} if (
        resolution == "L") else {"test_short_side": 256, "train_short_sides": [256]}
    cfg = config_from_dict({"model": {"width": 0.25}, "train": train, "data": data})
    full = f"{name}-s{seed}" if several_seeds else name
    tune_config = {"trial_name": full, "resolution": resolution, "replicate_of": name}
    base = TrialSummary.for_trial(tune_config, cfg)
    own_noise = zlib.crc32(full.encode())  # every model its own noise on top of the shared image noise
    extra = {"replicates": replicates(ap_offset, noise, own_noise)}
    metrics = {"AP": 0.30 + ap_offset, "AP_lo": 0.25 + ap_offset, "AP_hi": 0.35 + ap_offset}
    if h_offset is not None:
        extra["H_replicates"] = replicates(h_offset, noise, own_noise + 1)
        metrics["H_AP"] = 0.30 + h_offset
    return base.finished(metrics, f"/runs/{full}/checkpoint.pt", extra)


def one_seed_sweep() -> list[TrialSummary]:
    return [
        row("teacher-w0.25-h256", "teacher", 0.08, h_offset=0.079),  # fusion adds 0.1 AP: noise-sized, but paired
        row("fcos-w0.25-l128", "fcos", -0.10, resolution="L", noise=0.01),
        row("student-w0.25-l128-kd0-t3", "student", 0.0, kd_alpha=0.0, noise=0.01),
        row("student-w0.25-l128-kd0.2-t3", "student", 0.002, kd_alpha=0.2, noise=0.01, seed=0),
    ]


def test_each_student_is_paired_with_its_baselines_and_teacher() -> None:
    found = {c.label: c for c in comparisons(one_seed_sweep())}
    assert list(found) == [
        "teacher w0.25 H256&L128: fused vs its H branch",
        "teacher w0.25 H256&L128 vs student w0.25 L128 KD 0",
        "teacher w0.25 H256&L128 vs student w0.25 L128 KD 0.2",
        "student w0.25 L128 KD 0 vs plain FCOS w0.25 L128",
        "student w0.25 L128 KD 0.2 vs plain FCOS w0.25 L128",
        "student w0.25 L128 KD 0.2 vs without KD",
    ]
    kd = found["student w0.25 L128 KD 0.2 vs without KD"]
    assert kd.seeds == 1 and kd.mean_a - kd.mean_b == pytest.approx(0.002)
    assert kd.difference.low < 0 < kd.difference.high and kd.real is False  # 0.2 AP inside independent noise
    fcos = found["student w0.25 L128 KD 0.2 vs plain FCOS w0.25 L128"]
    assert fcos.difference.low > 0.05 and fcos.real is True
    teacher = found["teacher w0.25 H256&L128 vs student w0.25 L128 KD 0.2"]
    assert teacher.real is True and teacher.difference.point == pytest.approx(0.078)


def test_students_of_one_kd_weight_and_several_temperatures_are_told_apart() -> None:
    """kd_weights.yaml crosses alpha with T: each distilled student gets its own, named comparison with no-KD."""
    sweep = [row("student-w0.25-l128-kd0-t3", "student", 0.0, kd_alpha=0.0, noise=0.01),
             row("student-w0.25-l128-kd0.2-t1", "student", 0.01, kd_alpha=0.2, kd_temperature=1.0, noise=0.01),
             row("student-w0.25-l128-kd0.2-t6", "student", -0.05, kd_alpha=0.2, kd_temperature=6.0, noise=0.01)]
    found = {c.label: c for c in comparisons(sweep)}
    assert list(found) == ["student w0.25 L128 KD 0.2 T 1 vs without KD", "student w0.25 L128 KD 0.2 T 6 vs without KD"]
    assert found["student w0.25 L128 KD 0.2 T 6 vs without KD"].real is True  # 5 AP below, outside the noise
    assert found["student w0.25 L128 KD 0.2 T 1 vs without KD"].mean_a - found[
        "student w0.25 L128 KD 0.2 T 1 vs without KD"].mean_b == pytest.approx(0.01)


def test_seed_replicates_are_compared_as_a_mean_over_seeds_with_seed_noise() -> None:
    rows = [row("student-w0.25-l128-kd0-t3", "student", 0.0, seed=s, kd_alpha=0.0, several_seeds=True)
            for s in (0, 1, 2)]
    # distillation helps by 3, 2.5 and 3.5 AP in the three seeds: consistently real
    rows += [row("student-w0.25-l128-kd0.2-t3", "student", gain, seed=s, kd_alpha=0.2, several_seeds=True)
             for s, gain in ((0, 0.03), (1, 0.025), (2, 0.035))]
    (kd,) = comparisons(rows)
    assert kd.seeds == 3 and kd.difference.point == pytest.approx(0.03) and kd.real is True
    # the same mean gain from +9, -1.5, +1.5 AP: the seeds disagree, so the interval must include zero
    rows[3:] = [dataclasses.replace(r, AP=0.30 + g, replicates=replicates(g, seed=r.seed + 1))
                for r, g in zip(rows[3:], (0.09, -0.015, 0.015), strict=True)]
    (kd,) = comparisons(rows)
    assert kd.difference.point == pytest.approx(0.03) and kd.difference.low < 0 < kd.difference.high
    assert kd.per_seed == pytest.approx((0.09, -0.015, 0.015)) and kd.interval_name == "t over 3 seeds"


def kd_over_seeds(gains: tuple[float, ...], noise: float = 0.0016) -> list[TrialSummary]:
    """No-KD and KD students over len(gains) seeds; KD ahead by gains[s] in seed s, each model with its own image
    noise (0.0016 each: one seed's paired interval +-0.45 AP, as on the fidelity run)."""
    rows = [row("student-w0.25-l128-kd0-t3", "student", 0.0, seed=s, kd_alpha=0.0, noise=noise, several_seeds=True)
            for s in range(len(gains))]
    return rows + [row("student-w0.25-l128-kd0.2-t3", "student", g, seed=s, kd_alpha=0.2, noise=noise,
                       several_seeds=True) for s, g in enumerate(gains)]


def test_the_fidelity_runs_kd_gain_is_not_called_real_from_three_seeds_that_disagree(tmp_path: Path) -> None:
    """The 900-iteration fidelity run's KD line: +0.8, +0.1, +1.1 AP over three seeds, each seed's own interval
    about +-0.45. The old two-level bootstrap called the mean real, [0.1, 1.2]; the t-interval over the seeds holds
    zero, and the table shows the three values it rests on. Negative control: the same three seeds' replicates
    through the old method still come out real, and three seeds that agree (+0.7 each) are real with the new one."""
    from msad.engine.bootstrap import seed_averaged_difference
    from msad.sweep.compare import TABLE_COLUMNS, table_rows
    from msad.sweep.report import comparisons_markdown

    rows = kd_over_seeds((0.008, 0.001, 0.011))
    (kd,) = comparisons(rows)
    assert kd.seeds == 3 and kd.per_seed == pytest.approx((0.008, 0.001, 0.011))
    d = kd.difference
    assert d.method == "t" and d.point == pytest.approx(0.00667, abs=1e-5) and not kd.real
    assert -0.0075 < d.low < -0.005 and 0.018 < d.high < 0.021  # t(2) over the seeds: about [-0.6, 1.9]
    pairs = [(Replicates.from_dict(a.replicates), Replicates.from_dict(b.replicates)) for a, b in zip(
        rows[3:], rows[:3], strict=True)]
    old = seed_averaged_difference(pairs, "AP", method="two-level")
    assert old.point == pytest.approx(d.point) and old.real and old.low > 0
    (agreeing,) = comparisons(kd_over_seeds((0.007, 0.007, 0.007)))
    assert agreeing.real and agreeing.difference.low > 0.003  # image noise alone: real

    table = comparisons_markdown([kd])
    header, _, line = table.splitlines()
    assert [c.strip() for c in header.split("|")[1:-1]] == list(TABLE_COLUMNS)
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1:] == ["3", "30.7", "30.0", "+0.7", "+0.8 / +0.1 / +1.1",
                         f"[{100 * d.low:.1f}, {100 * d.high:.1f}]", "t over 3 seeds", "no"]
    (data,) = table_rows([kd])  # what W&B's report run should log: the same numbers, unrounded
    assert data[:2] == [kd.label, 3] and data[4] == pytest.approx(0.00667, abs=1e-5)
    assert [float(v) for v in data[5].split()] == pytest.approx([0.008, 0.001, 0.011])
    assert [float(v) for v in data[6].split()] == pytest.approx([d.low, d.high], rel=1e-5)
    assert data[7:] == ["t over 3 seeds", False]


def test_report_prints_intervals_comparisons_and_the_seed_table(tmp_path: Path) -> None:
    for summary in one_seed_sweep():
        write_trial_summary(tmp_path, summary)
    text = write_report(tmp_path)
    table, _, rest = text.partition("\n\nComparisons:\n\n")
    assert "| [33.0, 43.0] |" in table  # the teacher's interval, in percent
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in rest.splitlines()
             if line.startswith("| ") and "---" not in line}
    assert lines["student w0.25 L128 KD 0.2 vs plain FCOS w0.25 L128"][-1] == "**yes**"
    assert lines["student w0.25 L128 KD 0.2 vs without KD"][-1] == "no"
    assert lines["student w0.25 L128 KD 0.2 vs without KD"][:5] == ["1", "30.2", "30.0", "+0.2", "-"]
    assert lines["student w0.25 L128 KD 0.2 vs without KD"][-2] == "images, 1 seed"  # one seed: image noise only
    assert "comparisons are real" in text and "Across seeds" not in text
    report = (tmp_path / "report.md").read_text()
    assert rest.splitlines()[2] in report  # the printed comparisons are the report's


def test_rows_written_before_intervals_existed_still_read(tmp_path: Path) -> None:
    import json

    from msad.sweep.trials import INTERVAL_KEYS, REPLICATE_KEYS, read_trial_summaries

    data = json.loads(one_seed_sweep()[1].to_json())
    for key in (*INTERVAL_KEYS, *REPLICATE_KEYS, "seed", "replicate_of"):
        del data[key]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.json").write_text(json.dumps(data))
    (old,) = read_trial_summaries(tmp_path)
    assert (old.AP, old.AP_lo, old.replicates, old.seed) == (pytest.approx(0.2), None, None, 0)
    cells = [c.strip() for c in write_report(tmp_path).splitlines()[2].split("|")]
    assert cells[8:10] == ["20.0", "-"]  # BoxAP, and no interval to show
