"""What a sweep runs next, and what it stops early: the teacher-first searcher and the students-only ASHA.

Tune's search and scheduling policy, apart from the trial body (`msad.sweep.trial`) and the driver's callbacks
(`msad.sweep.callbacks`): it decides, on the driver, which trial starts and which stops; it trains nothing.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

from msad.sweep.spec import Sweep, TrialSpec


class TeacherFirstSearcher(Searcher):
    """Hands out every teacher first, then each width's students once all teachers of that width have ended.

    The released students get the best (by AP) of their width's teachers, as the sliced, weights-only file written
    beside its best checkpoint (`msad.deploy.publish_sliced_teacher`); if every teacher of the width
    failed, they are released with a `dependency_error` naming the teacher(s), so they fail with that message while
    other widths go on. Its state is saved with the experiment. When a sweep is resumed (`restore`), the trials that
    failed are handed out again: a failed teacher first (its Train run continues from its last checkpoint), and the
    students of its width wait for it again, then train from the new checkpoint. Being handed out by the searcher,
    re-runs count against `max_concurrent_trials` like every other trial.

    "Width" above is the teacher group: the width, and the seed when a sweep has several (`TrialSpec.teacher_group`).
    Plain FCOS baselines depend on nothing: they are handed out after the teachers, before any student.

    Args:
        teachers: teacher trials, in order.
        students: student trials; those with a given teacher checkpoint are ready at once.
        baselines: plain FCOS trials.
    """

    def __init__(self, teachers: list[TrialSpec], students: list[TrialSpec],
                 baselines: list[TrialSpec] | None = None) -> None:
        super().__init__(metric=None, mode=None)
        baselines = baselines or []
        self.planned = {t.name: t.tune_config() for t in [*teachers, *baselines, *students]}  # as first handed out
        self.pending_teachers = [t.name for t in teachers]
        self.ready: list[dict[str, Any]] = [self.planned[b.name] for b in baselines]
        self.waiting: dict[str, list[str]] = defaultdict(list)
        for s in students:
            if s.teacher_checkpoint:
                self.ready.append(self.planned[s.name])
            else:
                self.waiting[s.teacher_group].append(s.name)
        self.teachers_left: dict[str, int] = defaultdict(int)
        for t in teachers:
            self.teachers_left[t.teacher_group] += 1
        self.handed_out: dict[str, str] = {}  # trial id -> trial name, until the trial ends
        self.tracking_ids: dict[str, str] = {}  # trial name -> its first trial id (a re-run keeps its W&B run)
        self.attempts: dict[str, int] = defaultdict(int)
        self.finished: dict[str, list[tuple[float, str, str]]] = defaultdict(list)  # (AP, checkpoint, name)
        self.failed: dict[str, list[str]] = defaultdict(list)  # failed teachers per group
        self.to_rerun: list[str] = []  # trials that failed, handed out again when the sweep is resumed

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.pending_teachers:  # teachers gate everything else: start them first
            config = self.planned[self.pending_teachers.pop(0)]
        elif self.ready:
            config = self.ready.pop(0)
        elif any(self.waiting.values()):
            return None  # a teacher is still running; Tune asks again later
        else:
            return Searcher.FINISHED
        name = config["trial_name"]
        self.handed_out[trial_id] = name
        self.tracking_ids.setdefault(name, trial_id)
        attempt = self.attempts[name]
        self.attempts[name] += 1
        return {**config, "attempt": attempt, "tracking_id": self.tracking_ids[name]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        name = self.handed_out.pop(trial_id, None)
        if name is None:
            return
        checkpoint = (result or {}).get("teacher_file") or (result or {}).get("best_checkpoint")
        if error:
            self.to_rerun.append(name)
        if self.planned[name]["role"] != "teacher":
            return
        group = self.planned[name]["teacher_group"]
        if error or not checkpoint:
            self.failed[group].append(name)
        else:
            self.finished[group].append((float(result.get("AP", -1.0)), str(checkpoint), name))
        self.teachers_left[group] -= 1
        if self.teachers_left[group] == 0:
            self.ready.extend(self._released(name) for name in self.waiting.pop(group, []))

    def _released(self, student: str) -> dict[str, Any]:
        """A waiting student's config once all its width's teachers have ended: with the best teacher's
        checkpoint, or with the error that names the failed teachers."""
        config = self.planned[student]
        group = config["teacher_group"]
        if not self.finished[group]:
            which = f"width {config['width']:g}" + (f", seed {config['seed']}" if "-s" in group else "")
            reason = f"teacher {', '.join(self.failed[group])} ({which}) failed; its students were not run"
            return {**config, "dependency_error": reason}
        _, checkpoint, teacher = max(self.finished[group])
        msad = {**config["msad"], "train": {**config["msad"]["train"], "teacher_checkpoint": checkpoint}}
        return {**config, "msad": msad, "teacher_name": teacher}

    def requeue_failed(self) -> None:
        """Hand out the failed trials again: teachers first; students of a re-run teacher's width wait for it."""
        failed, self.to_rerun = self.to_rerun, []
        for name in failed:
            config = self.planned[name]
            if config["role"] == "teacher":
                self.failed[config["teacher_group"]].remove(name)
                self.teachers_left[config["teacher_group"]] += 1
                self.pending_teachers.append(name)
        for name in failed:
            config = self.planned[name]
            if config["role"] == "teacher":
                continue
            if config["role"] == "fcos" or config["msad"]["train"]["teacher_checkpoint"]:  # depends on no trial
                self.ready.append(config)
            elif self.teachers_left[config["teacher_group"]] > 0:
                self.waiting[config["teacher_group"]].append(name)
            else:
                self.ready.append(self._released(name))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        """Tune calls this only when a sweep is resumed: the failed trials are run again."""
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self.requeue_failed()


class ResumableSearch(SearchGenerator):
    """Tune's `SearchGenerator`, except that a resumed sweep asks its searcher again for trials.

    Tune records that the searcher said FINISHED and, on restore, would never ask it again; but a resumed sweep's
    searcher has the failed trials to hand out again (`TeacherFirstSearcher.restore`). It answers FINISHED again at
    once when there are none.
    """

    def set_state(self, state: dict) -> None:
        super().set_state({**state, "finished": False})


class StudentASHA(AsyncHyperBandScheduler):
    """ASHA over students only: teachers and baselines are never stopped early and never enter the students' rungs.
    A student without distillation (`kd_alpha: 0`) enters the rungs (students behind it are stopped) but is never
    stopped itself: the report compares every student with it, so it must reach the end."""

    # Every hook that touches ASHA's brackets skips teachers and baselines: they never enter them.
    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if _is_student(trial):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not _is_student(trial):
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if trial.config.get("kd_alpha") == 0 else decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if _is_student(trial):
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        if _is_student(trial):
            super().on_trial_remove(tune_controller, trial)


class SchedulerState(Callback):
    """Keeps the scheduler's state (ASHA's rungs: which students reached which iteration with which AP) with the
    experiment, so `--resume` goes on with them.

    Tune saves its searcher and callbacks with the experiment, but restores the scheduler as it was first built:
    a resumed ASHA sweep forgot every rung and judged the students still running against nobody. This callback is
    saved with the others and hands its state back to the scheduler when the experiment is restored (the scheduler
    and the callback come back from the same pickle, so they are still the same objects).

    Args:
        scheduler: the sweep's scheduler (the one in `TuneConfig`).
    """

    def __init__(self, scheduler: TrialScheduler) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any] | None:
        if not isinstance(self.scheduler, AsyncHyperBandScheduler):
            return None  # FIFO: nothing to keep
        return {"scheduler": dict(self.scheduler.__dict__)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.__dict__.update(state["scheduler"])


def _is_student(trial: Any) -> bool:
    return trial.config.get("role") == "student"


def make_scheduler(sweep: Sweep) -> TrialScheduler:
    s = sweep.spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = max((st.config["train"]["iterations"] for st in sweep.students), default=1)
    # stop_last_trials=False: a student that reaches its last iteration ends by itself, with its final evaluation
    return StudentASHA(time_attr=s.time_attr, metric=s.metric, mode=s.mode, max_t=max_t,
                       grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False)


def make_search(sweep: Sweep) -> ResumableSearch:
    """The teacher-first searcher under Tune's concurrency limit (applied here, so re-runs count too)."""
    searcher = TeacherFirstSearcher(sweep.teachers, sweep.students, sweep.baselines)
    return ResumableSearch(ConcurrencyLimiter(searcher, max_concurrent=sweep.spec.max_concurrent_trials))
