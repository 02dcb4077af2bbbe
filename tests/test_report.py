"""Sweep report: trial summaries on disk, capacities at a run's resolution, the Markdown/CSV table and the plot."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from msad.config import config_from_dict
from msad.errors import UserError
from msad.models.capacity import capacity_for, capacity_rows, detector_flops, run_image_sizes
from msad.sweep.report import CSV_EXTRA, TABLE_COLUMNS, pareto_front, write_report
from msad.sweep.trials import TrialSummary, read_trial_summaries, schedule_name, write_trial_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def summary(name: str, role: str, width: float, ap: float | None, kd_alpha: float | None = None,
            status: str = "TERMINATED", h: int = 256, **extra: object) -> TrialSummary:
    """A summary with distinct, checkable numbers (no FLOP counting: the report only reads them)."""
    student = role == "student"
    capacity = {"teacher": 1.25, "student": 0.25}[role] * width ** 2
    values = dict(
        name=name, role=role, width=width, h_short_side=h, l_short_side=h // 2,
        resolution="L" if student else "H & L", kd_alpha=kd_alpha, kd_temperature=3.0 if student else None,
        iterations=300, sched="300it", capacity=capacity, capacity_at_run_resolution=capacity * (h / 800) ** 2,
        published_capacity=None, gflops=12.5 * width, AP=ap, AP50=None if ap is None else ap + 0.2, AP75=None,
        APs=None if ap is None else ap / 3, APm=None, APl=None, status=status, error=None,
        checkpoint=f"/runs/{name}/model.pt" if ap is not None else None,
        teacher_checkpoint="/runs/teacher-w1-h256/model.pt" if student else None, trial_id=f"id_{name}",
    )
    values.update(extra)
    return TrialSummary(**values)


SUMMARIES = [  # deliberately out of order
    summary("student-w0.25-l128-kd0.2-t3", "student", 0.25, 0.1234, kd_alpha=0.2),
    summary("teacher-w1-h256", "teacher", 1.0, 0.3012),
    summary("student-w1-l128-kd0.5-t3", "student", 1.0, 0.2391, kd_alpha=0.5),
    summary("student-w1-l128-kd0.2-t3", "student", 1.0, 0.2467, kd_alpha=0.2),
    summary("teacher-w0.25-h256", "teacher", 0.25, 0.1511),
    summary("student-w0.25-l128-kd0.5-t3", "student", 0.25, None, kd_alpha=0.5, status="ERROR",
            error="RunFailedError: loss became NaN at iteration 40"),
]
EXPECTED_ORDER = ["teacher-w1-h256", "student-w1-l128-kd0.2-t3", "student-w1-l128-kd0.5-t3", "teacher-w0.25-h256",
                  "student-w0.25-l128-kd0.2-t3", "student-w0.25-l128-kd0.5-t3"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    experiment_dir = tmp_path_factory.mktemp("sweeps") / "quickstart"
    for s in SUMMARIES:
        write_trial_summary(experiment_dir, s)
    return experiment_dir, write_report(experiment_dir)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


# ---------------------------------------------------------------------------------------------------------------------
# Summaries on disk
# ---------------------------------------------------------------------------------------------------------------------


def test_summary_json_round_trips_with_missing_metrics_as_null(tmp_path: Path) -> None:
    failed = SUMMARIES[-1]
    path = write_trial_summary(tmp_path, failed)
    assert path == tmp_path / "results" / "student-w0.25-l128-kd0.5-t3.json"
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data["AP"] is None and data["status"] == "ERROR"  # strict JSON, for any reader
    assert TrialSummary.from_json(path.read_text()) == failed
    assert [p.name for p in (tmp_path / "results").iterdir()] == [path.name]  # the temp file was renamed away

    nan_ap = failed.to_json().replace('"AP": null', '"AP": NaN')  # another writer's NaN reads as "not measured"
    assert TrialSummary.from_json(nan_ap).AP is None


def test_summary_files_are_checked_when_read(tmp_path: Path) -> None:
    write_trial_summary(tmp_path, SUMMARIES[0])
    bad = tmp_path / "results" / "broken.json"
    bad.write_text(SUMMARIES[1].to_json().replace('"gflops"', '"gflop"'))
    with pytest.raises(UserError, match=r"broken.json: not a trial summary: missing keys \['gflops'\], unknown "):
        read_trial_summaries(tmp_path)
    bad.write_text(SUMMARIES[1].to_json().replace('"TERMINATED"', '"DONE"'))
    with pytest.raises(UserError, match="broken.json: not a trial summary: .*status 'DONE'"):
        read_trial_summaries(tmp_path)


def test_only_final_summaries_are_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not final"):
        write_trial_summary(tmp_path, dataclasses.replace(SUMMARIES[0], status="RUNNING"))


def test_summary_for_a_trial_from_its_config_then_finished_or_failed() -> None:
    cfg = config_from_dict({"model": {"width": 0.5}, "train": {"role": "student", "iterations": 300, "kd_alpha": 0.5,
                                                               "kd_temperature": 2.0, "teacher_checkpoint": "/t.pt"},
                            "data": {"test_short_side": 256, "train_short_sides": [256]}})
    running = TrialSummary.for_trial({"trial_name": "student-w0.5-l128-kd0.5-t2"}, cfg, trial_id="abc_00001")
    rows = {(r.width, r.role): r for r in capacity_rows([0.5])}
    assert (running.name, running.role, running.resolution, running.status) == (
        "student-w0.5-l128-kd0.5-t2", "student", "L", "RUNNING")
    assert (running.h_short_side, running.l_short_side, running.sched, running.trial_id) == (256, 128, "300it",
                                                                                              "abc_00001")
    assert (running.kd_alpha, running.kd_temperature, running.teacher_checkpoint) == (0.5, 2.0, "/t.pt")
    assert running.capacity == pytest.approx(rows[0.5, "student"].capacity, rel=1e-12)
    assert running.published_capacity == 0.06
    assert running.capacity_at_run_resolution < running.capacity / 8  # 128 vs 400 short side: ~ (0.32)^2

    done = running.finished({"AP": 0.31, "AP50": 0.5, "APs": float("nan"), "loss_total": 1.0}, Path("/ck/m.pt"))
    assert (done.status, done.AP, done.AP50, done.APs, done.AP75, done.checkpoint) == (
        "TERMINATED", 0.31, 0.5, None, None, "/ck/m.pt")
    failed = running.failed("teacher teacher-w0.5-h256 (width 0.5) failed")
    assert (failed.status, failed.error, failed.AP) == ("ERROR", "teacher teacher-w0.5-h256 (width 0.5) failed", None)
    assert running.stopped({"AP": 0.2}).status == "STOPPED"


# ---------------------------------------------------------------------------------------------------------------------
# Capacity at the run's resolution
# ---------------------------------------------------------------------------------------------------------------------


def test_run_image_sizes_scale_the_paper_box_and_respect_max_size() -> None:
    assert run_image_sizes(800, 1333) == ((800, 1333), (400, 667))  # msad.models.capacity's sizes
    assert run_image_sizes(256, 1333) == ((256, 427), (128, 214))
    assert run_image_sizes(1000, 1333) == ((800, 1333), (400, 667))  # long side capped: the whole box shrinks
    assert run_image_sizes(512, 600) == ((360, 600), (180, 300))


def test_capacity_at_the_paper_resolution_matches_the_capacity_table() -> None:
    rows = {(r.width, r.role): r for r in capacity_rows([0.25])}
    for role in ("teacher", "student"):
        capacity, published, gflops = capacity_for(role, 0.25, 800, 1333)
        assert capacity == pytest.approx(rows[0.25, role].capacity, rel=1e-12)
        assert published == rows[0.25, role].published_capacity
        assert gflops == pytest.approx(detector_flops(0.25, role) / 1e9, rel=1e-12)


def test_capacity_at_a_lower_resolution_and_for_the_fcos_baseline() -> None:
    student, _, student_gflops = capacity_for("student", 0.25, 800, 1333)
    half, _, half_gflops = capacity_for("student", 0.25, 400, 1333)  # L of 200 x 334 instead of 400 x 667
    assert half / student == pytest.approx(0.25, rel=0.05)  # convolutions scale with pixels
    assert half_gflops / student_gflops == pytest.approx(0.25, rel=0.05)
    teacher, _, teacher_gflops = capacity_for("teacher", 0.25, 800, 1333)
    fcos, published, fcos_gflops = capacity_for("fcos", 0.25, 800, 1333)
    assert published is None  # the paper lists no FCOS-baseline row
    assert fcos == pytest.approx(teacher - student, rel=1e-12)  # the baseline reads H only
    assert student_gflops < fcos_gflops < teacher_gflops
    with pytest.raises(ValueError, match="role must be one of"):
        capacity_for("distiller", 0.25, 800, 1333)


def test_schedule_names_follow_the_1x_image_budget() -> None:
    assert schedule_name(90_000, 16) == "1x"  # teacher 1x
    assert schedule_name(45_000, 32) == "1x"  # student 1x at batch 32
    assert schedule_name(180_000, 8) == "1x"  # widths 0.5/0.75: twice the iterations at half the batch
    assert schedule_name(180_000, 16) == "2x"
    assert schedule_name(300, 8) == "300it"


# ---------------------------------------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------------------------------------


def test_pareto_front_keeps_points_no_cheaper_point_beats() -> None:
    points = [(0.5, 30.0), (0.1, 20.0), (0.2, 18.0), (0.3, 25.0), (0.3, 26.0), (1.0, 29.0), (0.05, 20.0)]
    assert pareto_front(points) == [(0.05, 20.0), (0.3, 26.0), (0.5, 30.0)]
    assert pareto_front([]) == []
    assert pareto_front([(0.2, 10.0)]) == [(0.2, 10.0)]
    assert pareto_front([(0.1, 5.0), (0.2, 5.0)]) == [(0.1, 5.0)]  # equal AP at more cost is not better


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


def test_markdown_table_rows_columns_and_order(experiment: tuple[Path, str]) -> None:
    experiment_dir, table = experiment
    lines = table.split("\n\n")[0].splitlines()  # the results table; comparisons follow it
    assert _cells(lines[0]) == list(TABLE_COLUMNS)
    assert _cells(lines[1])[2].endswith(":") and not _cells(lines[1])[0].endswith(":")  # numbers right-aligned
    rows = [_cells(line) for line in lines[2:]]
    assert len(rows) == len(SUMMARIES) and all(len(r) == len(TABLE_COLUMNS) for r in rows)
    by_name = {s.name: s for s in SUMMARIES}
    order = [by_name[name] for name in EXPECTED_ORDER]
    assert [(r[4], r[5], r[11]) for r in rows] == [(f"{s.width:.2f}", s.role.capitalize(), "-" if s.kd_alpha is None
                                                    else f"{s.kd_alpha:g}") for s in order]
    assert rows[0] == ["FCOS", "Slimmable-R50", "1.250x", "300it", "1.00", "Teacher", "H & L (256/128)", "30.1",
                       "-", "50.1", "10.0", "-", "-"]  # no bootstrap replicates in these rows: no interval
    assert rows[1] == ["FCOS", "Slimmable-R50", "0.250x", "300it", "1.00", "Student", "L (128)", "24.7", "-",
                       "44.7", "8.2", "0.2", "3"]
    assert rows[3][2] == "0.078x"  # 1.25 x 0.25^2, three decimals
    assert rows[5][7:10] == ["ERROR", "-", "-"]  # failed: status instead of AP
    report = (experiment_dir / "report.md").read_text()
    assert table in report and "![AP vs capacity](ap_vs_capacity.png)" in report
    assert "`student-w0.25-l128-kd0.5-t3`: ERROR: RunFailedError: loss became NaN at iteration 40" in report


def test_csv_holds_the_raw_numbers(experiment: tuple[Path, str]) -> None:
    experiment_dir, _ = experiment
    with (experiment_dir / "report.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*TABLE_COLUMNS, *CSV_EXTRA]
    assert [r["name"] for r in rows] == EXPECTED_ORDER

    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    by_name = {s.name: s for s in SUMMARIES}
    for row in rows:
        s = by_name[row["name"]]
        assert row["status"] == s.status and row["Resolution"] == s.resolution and row["Sched"] == s.sched
        for column, field in (("Capacity", "capacity"), ("Width", "width"), ("BoxAP", "AP"), ("AP50", "AP50"),
                              ("APs", "APs"), ("KD alpha", "kd_alpha"), ("T", "kd_temperature"), ("gflops", "gflops"),
                              ("capacity_at_run_resolution", "capacity_at_run_resolution"), ("AP75", "AP75")):
            assert number(row[column]) == getattr(s, field), (row["name"], column)  # exact: floats round-trip
        assert int(row["h_short_side"]) == s.h_short_side and row["error"] == (s.error or "")


def test_plot_is_a_png(experiment: tuple[Path, str]) -> None:
    experiment_dir, _ = experiment
    data = (experiment_dir / "ap_vs_capacity.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (900, 600)  # 7.5 x 5 inches at 120 dpi


def test_report_of_only_failed_trials_still_writes_every_file(tmp_path: Path) -> None:
    write_trial_summary(tmp_path, SUMMARIES[-1])
    table = write_report(tmp_path)
    assert _cells(table.splitlines()[2])[7] == "ERROR"
    assert (tmp_path / "ap_vs_capacity.png").read_bytes().startswith(PNG_SIGNATURE)


def test_empty_experiment_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"^{tmp_path}: no trial results yet \\(results/\\*.json\\)$"):
        write_report(tmp_path)
    (tmp_path / "results").mkdir()
    with pytest.raises(UserError, match="no trial results yet"):
        write_report(tmp_path)
