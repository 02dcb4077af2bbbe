"""Ray Tune sweeps on CPU: teacher -> student dependencies, early release per width, failures, W&B, report,
resume after an interruption, and ASHA over students."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import terminal_to_file, tiny_sweep, train_undisturbed, weights_difference

from msad.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint
from msad.sweep.runner import run_sweep
from msad.sweep.trials import read_trial_summaries

REPO = Path(__file__).resolve().parents[1]
CANARY = "msadcanary" + "fedcba9876543210fedcba98"  # W&B-key-like, searched for in every file a sweep writes


@pytest.fixture(scope="module")
def two_widths(ray_session: None, tmp_path_factory: pytest.TempPathFactory, shapes_cache: Path):
    """Width 0.25: a fast teacher, two students and a plain FCOS at L. Width 0.5: a slow teacher (no students: it
    only has to outlast the 0.25 one). Width 0.75: a teacher that diverges (lr 1e30) and one student, which must
    fail naming it."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = tiny_sweep(tmp, shapes_cache, "two_widths", {
        "teachers": {"variants": [
            {"model.width": 0.25},
            # slow enough to outlast the 0.25 teacher's end (H-branch evaluation, sliced export) and its students'
            # start; 12 iterations once ended 1 s too early
            {"model.width": 0.5, "train.iterations": 24, "train.lr_steps": [23], "train.eval_period": 24},
            {"model.width": 0.75, "train.base_lr": 1.0e30},
        ]},
        "baselines": {"grid": {"model.width": [0.25]}, "resolutions": ["L"]},
        "students": {"variants": [{"model.width": 0.25, "train.kd_alpha": 0.0},
                                  {"model.width": 0.25, "train.kd_alpha": 0.2}, {"model.width": 0.75}]},
        "max_concurrent_trials": 4,  # the three teachers and the baseline at once
        "trial_retries": 1,  # the diverging teacher is retried once (shown as a retry), then fails for good
    })
    with pytest.MonkeyPatch.context() as mp, terminal_to_file(tmp / "terminal.txt"):
        mp.setenv("WANDB_API_KEY", CANARY)  # in the driver's environment while the sweep runs: must be written nowhere
        home = run_sweep(path, [])
    return home, {s.name: s for s in read_trial_summaries(home)}


def test_the_terminal_shows_a_concise_view_and_the_log_the_rest(two_widths) -> None:
    """Output to a file (not a terminal): a line per trial start, evaluation and end, a failure's reason in one
    line with its traceback's path, then the report; Tune's status tables and result dumps go to sweep.log."""
    home, rows = two_widths
    lines = (home.parents[1] / "terminal.txt").read_text().splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    for name, row in rows.items():
        starts = [line for line in lines if f"] start   {name}  (" in line]
        ends = [line for line in lines if f"] done    {name}  AP " in line or f"] FAILED  {name}: " in line]
        if row.status == "TERMINATED":
            assert len(starts) == 1 and len(ends) == 1 and f"AP {100 * row.AP:.1f} [" in ends[0], name
            evaluations = [line for line in lines if f"] eval    {name}  it " in line]
            # the final evaluation, with its interval (the two-widths trials evaluate only at their end)
            assert len(evaluations) == 1 and f"  AP {100 * row.AP:.1f} [" in evaluations[0]
    (failed,) = [line for line in lines if "] FAILED  teacher-w0.75-h128: " in line]
    assert "rank 0: NonFiniteLossError: non-finite loss at iteration 1" in failed and "(traceback: " in failed
    traceback = Path(failed.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert traceback.parent.parent == home and "msad.engine.loop.NonFiniteLossError" in traceback.read_text()
    assert any("] retry   teacher-w0.75-h128 (trial_retries): rank 0: NonFiniteLossError" in line for line in lines)
    assert any("] FAILED  student-w0.75-l64-kd0.2-t3: DependencyFailedError: teacher teacher-w0.75-h128 " in line
               for line in lines)
    assert sum(line.startswith("| FCOS ") for line in lines) == 7 and f"report: {home}" in lines
    assert "== Status ==" not in "\n".join(lines) and "Result for " not in "\n".join(lines)
    log = (home / "sweep.log").read_text()
    assert "== Status ==" in log and "Result for teacher-w0.25-h128" in log  # Tune's own output, kept
    assert all(line in log for line in lines)  # and what the terminal showed


def test_students_get_their_teachers_checkpoint_and_start_after_it(two_widths) -> None:
    _, rows = two_widths
    teacher = rows["teacher-w0.25-h128"]
    assert teacher.status == "TERMINATED" and teacher.checkpoint
    # the dependency, filled in by the searcher: the teacher's sliced, weights-only file beside its best checkpoint
    handed = str(Path(teacher.checkpoint).with_name("teacher_sliced.pt"))
    sliced = load_checkpoint(handed)
    assert (sliced["kind"], sliced["role"], "optimizer" in sliced) == ("sliced", "teacher", False)
    assert Path(handed).stat().st_size * 2 < Path(teacher.checkpoint).stat().st_size
    students = [rows["student-w0.25-l64-kd0-t3"], rows["student-w0.25-l64-kd0.2-t3"]]
    for student in students:
        assert student.status == "TERMINATED"
        assert student.teacher_checkpoint == handed
        assert student.started_at >= teacher.ended_at  # no student before its teacher ends
        run_cfg = load_checkpoint(student.checkpoint)["config"]
        assert run_cfg["train"]["teacher_checkpoint"] == handed  # and in the run's own config


def test_fast_width_students_start_before_the_slow_teacher_ends(two_widths) -> None:
    _, rows = two_widths
    slow = rows["teacher-w0.5-h128"]
    assert min(rows[n].started_at for n in ("student-w0.25-l64-kd0-t3", "student-w0.25-l64-kd0.2-t3")) \
        < slow.ended_at


def test_failed_teacher_fails_its_students_naming_it(two_widths) -> None:
    _, rows = two_widths
    assert rows["teacher-w0.75-h128"].status == "ERROR"
    assert "non-finite loss" in rows["teacher-w0.75-h128"].error
    orphan = rows["student-w0.75-l64-kd0.2-t3"]
    assert orphan.status == "ERROR"
    assert "teacher teacher-w0.75-h128 (width 0.75) failed; its students were not run" in orphan.error
    assert rows["teacher-w0.5-h128"].status == "TERMINATED"  # the other widths went on
    assert rows["student-w0.25-l64-kd0.2-t3"].status == "TERMINATED"


def test_canary_key_appears_in_no_file_of_the_sweep_or_of_ray(two_widths) -> None:
    """Local Ray: the experiment (rows, Tune's state, Train runs, W&B runs) and this Ray's session directory (logs of
    every process, the runtime-env agent's included). The cluster case is in tests/test_node_loss.py."""
    import ray

    home, _ = two_widths
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # the test session's own Ray
    files = [p for root in (home, session) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 100 and any(p.suffix == ".wandb" for p in files)
    assert any(p.name.startswith("runtime_env") for p in (session / "logs").iterdir())
    assert [p for p in files if CANARY.encode() in p.read_bytes()] == []


def test_report_and_wandb_match_the_trials(two_widths) -> None:
    from test_tracking import _read_wandb_run

    home, rows = two_widths
    table = (home / "report.md").read_text()
    assert table.count("| FCOS ") == len(rows) == 7
    assert (home / "ap_vs_capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = (home / "report.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(rows)
    runs = [_read_wandb_run(d) for d in sorted((home / "wandb").glob("offline-run-*"))]
    finished = {r["display_name"]: r for r in runs if r["summary"].get("status") == "TERMINATED"}
    assert set(finished) == {n for n, s in rows.items() if s.status == "TERMINATED"}
    student = finished["student-w0.25-l64-kd0.2-t3"]
    assert (student["run_group"], student["job_type"]) == ("two_widths", "student")
    assert student["config"]["train"]["teacher_checkpoint"] == str(
        Path(rows["teacher-w0.25-h128"].checkpoint).with_name("teacher_sliced.pt"))
    assert student["summary"]["capacity"] == pytest.approx(rows["student-w0.25-l64-kd0.2-t3"].capacity)
    assert student["summary"]["kd_alpha"] == 0.2 and "AP" in student["summary"]


def test_rows_keep_intervals_and_replicates_and_the_report_compares_them(two_widths) -> None:
    """Every finished trial's row holds its final evaluation's interval and bootstrap replicates (read by the driver
    from beside the last checkpoint); the teacher's H branch too; the report and W&B's report run compare them."""
    from test_tracking import _read_wandb_run

    from msad.engine.bootstrap import Replicates

    home, rows = two_widths
    baseline = rows["fcos-w0.25-l64"]
    assert (baseline.status, baseline.role, baseline.resolution, baseline.l_short_side) == ("TERMINATED", "fcos",
                                                                                          "L", 64)
    for name in ("teacher-w0.25-h128", "fcos-w0.25-l64", "student-w0.25-l64-kd0-t3", "student-w0.25-l64-kd0.2-t3"):
        row = rows[name]
        replicates = Replicates.from_dict(row.replicates)
        assert replicates.samples == 500 and replicates.num_images == 6
        assert row.AP_lo <= row.AP <= row.AP_hi
        assert replicates.pairs_with(Replicates.from_dict(rows["teacher-w0.25-h128"].replicates))
    teacher = rows["teacher-w0.25-h128"]
    assert teacher.H_AP is not None and Replicates.from_dict(teacher.H_replicates).samples == 500
    report = (home / "report.md").read_text()
    for label in ("teacher w0.25 H128&L64: fused vs its H branch", "student w0.25 L64 KD 0.2 vs without KD",
                  "student w0.25 L64 KD 0.2 vs plain FCOS w0.25 L64",
                  "teacher w0.25 H128&L64 vs student w0.25 L64 KD 0"):
        assert f"| {label} " in report
    runs = [_read_wandb_run(d) for d in sorted((home / "wandb").glob("offline-run-*"))]
    (report_run,) = [r for r in runs if r["job_type"] == "report"]
    assert (report_run["run_group"], report_run["summary"]["trials"]) == ("two_widths", 7)


def _crash_train_worker_after_checkpoint(run: Path, killed: list[int]) -> None:
    """Once Train has registered a checkpoint of `run`, SIGKILL the (one) Train worker process of this session's
    Ray, as a crash would; its pid goes to `killed`."""
    from ray.util.state import list_actors

    deadline = time.time() + 300
    snapshot = run / "checkpoint_manager_snapshot.json"
    while not (snapshot.is_file() and '"checkpoint_0' in snapshot.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
        killed.append(worker.pid)


def _launch(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, log: Path) -> None:
    """Until Train has registered a checkpoint of `run` (a checkpoint folder alone may not be registered yet)."""
    deadline = time.time() + 300
    snapshot = run / "checkpoint_manager_snapshot.json"
    while not (snapshot.is_file() and '"checkpoint_0' in snapshot.read_text()):
        assert proc.poll() is None, f"the sweep ended before {run.name} saved a checkpoint:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{run.name} saved no checkpoint in 300 s"
        time.sleep(0.2)


def test_failed_teacher_reruns_on_resume_then_its_student_and_ctrl_c_resumes(ray_session: None, tmp_path: Path,
                                                                             shapes_cache: Path) -> None:
    """A teacher whose worker crashes fails (no retries), and so does its student, naming it. `--resume` runs the
    teacher again from its own checkpoint, then the student from the new teacher checkpoint; Ctrl-C part-way
    through the student and another `--resume` continue the student from its checkpoint, the teacher untouched."""
    teacher_iters = 8
    path = tiny_sweep(tmp_path, shapes_cache, "resume", {
        "teachers": {"grid": {"model.width": [0.25]},
                     "config": {"train": {"iterations": teacher_iters, "lr_steps": [teacher_iters - 1],
                                          "eval_period": teacher_iters}}},
        "students": {"grid": {"model.width": [0.25]}, "config": {"train": {"iterations": 8, "lr_steps": [7],
                                                                           "eval_period": 8}}},
        "max_concurrent_trials": 1, "trial_retries": 0,
    })
    home, log = tmp_path / "runs" / "resume", tmp_path / "sweep.log"
    teacher_name, student_name = "teacher-w0.25-h128", "student-w0.25-l64-kd0.2-t3"

    killed: list[int] = []  # 1. the teacher's worker crashes after its first checkpoint
    crash = threading.Thread(target=_crash_train_worker_after_checkpoint, args=(home / "runs" / teacher_name, killed))
    crash.start()
    run_sweep(path, [])
    crash.join(timeout=60)
    assert len(killed) == 1
    rows = {s.name: s for s in read_trial_summaries(home)}
    assert rows[teacher_name].status == "ERROR"
    assert rows[student_name].status == "ERROR"
    assert f"teacher {teacher_name} (width 0.25) failed; its students were not run" in rows[student_name].error

    proc = _launch([str(path), "--resume", "--verbose"], tmp_path, log)  # 2. the teacher again, Ctrl-C mid-student
    try:
        _wait_for_checkpoint(home / "runs" / student_name, proc, log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "1 of 2 trials unfinished" in log.read_text()  # the student's row is still the first run's ERROR
    assert "== Status ==" in log.read_text() and "(RayTrainWorker pid=" in log.read_text()  # --verbose: all of it
    teacher = read_trial_summaries(home)[[s.name for s in read_trial_summaries(home)].index(teacher_name)]
    assert teacher.status == "TERMINATED"
    state = load_checkpoint(teacher.checkpoint)
    assert state["iteration"] == teacher_iters and state["resumed_from"]  # continued from its own checkpoint

    run_sweep(path, [], resume=True)  # 3. the student continues; the teacher is not run again
    rows = {s.name: s for s in read_trial_summaries(home)}
    assert rows[teacher_name].started_at == teacher.started_at
    student = rows[student_name]
    assert student.status == "TERMINATED" and student.started_at >= teacher.ended_at
    assert student.teacher_checkpoint == str(Path(teacher.checkpoint).with_name("teacher_sliced.pt"))
    state = load_checkpoint(student.checkpoint)
    assert state["iteration"] == 8 and state["resumed_from"]
    # stopped (Ctrl-C) and resumed, the student ends with the weights of its config trained without a stop
    reference = tmp_path / "undisturbed"
    train_undisturbed(home / "runs" / student_name / CONFIG_FILE, reference)
    assert weights_difference(student.checkpoint, reference / "checkpoint_0000008" / CHECKPOINT_FILE) == 0.0
    resumed_from = state["resumed_from"][0]  # negative control: the checkpoint it resumed from differs
    assert weights_difference(student.checkpoint, reference / f"checkpoint_{resumed_from:07d}" / CHECKPOINT_FILE) > 0
    # the teacher's re-run continued its first W&B run (two offline folders of one run id), as did the student's;
    # every launch that ended also logged the sweep's report run (the only runs with logged tables)
    folders = sorted((home / "wandb").glob("offline-run-*"))
    reports = [d for d in folders if (d / "files" / "media" / "table").is_dir()]
    run_ids = [d.name.rsplit("-", 1)[1] for d in folders if d not in reports]
    assert len(reports) == 3 and len(run_ids) == 5 and len(set(run_ids)) == 2


def test_asha_stops_a_clearly_worse_student(ray_session: None, tmp_path: Path, shapes_cache: Path,
                                            teacher_run) -> None:
    teacher = teacher_run[1].best_checkpoint  # a students-only sweep against a given teacher file
    path = tiny_sweep(tmp_path, shapes_cache, "asha", {
        # one student that learns, then one whose learning rate is too small to move: at the rung it is clearly
        # worse than the first one's recorded loss, so ASHA stops it
        "students": {"grid": {"train.base_lr": [0.02, 1.0e-7]},
                     "teacher_checkpoints": {0.25: teacher}},
        "scheduler": {"type": "asha", "metric": "loss_total", "mode": "min", "grace_period": 3,
                      "reduction_factor": 2},
        "max_concurrent_trials": 1,
    }, iterations=6)
    home = run_sweep(path, [])
    rows = {s.name: s for s in read_trial_summaries(home)}
    assert rows["student-w0.25-l64-kd0.2-t3"].status == "TERMINATED"  # lr 0.02, first in the grid
    assert rows["student-w0.25-l64-kd0.2-t3-2"].status == "STOPPED"  # lr 1e-7, stopped at the rung


def test_trial_drivers_that_do_not_fit_the_head_are_refused_at_once(ray_session: None, tmp_path: Path,
                                                                    shapes_cache: Path) -> None:
    """Trial drivers run on the head: resources it does not have would leave every trial pending forever."""
    from msad.errors import UserError

    path = tiny_sweep(tmp_path, shapes_cache, "too_big", {"teachers": {"grid": {"model.width": [0.25]}},
                                                          "trial_resources": {"CPU": 64}})
    with pytest.raises(UserError, match=r"trial_resources: CPU=64 does not fit the Ray head, which has 4 CPU"):
        run_sweep(path, [])
    assert not (tmp_path / "runs" / "too_big").exists()  # nothing started
