"""Ray Tune orchestration: teachers first, each width's students released as soon as that width's teachers end.

One Tune experiment holds every trial. A `Searcher` (Tune's public API for "what to run next") hands out the
teacher trials first and holds each student back until every teacher of its width has finished; it then fills in
the best of those teachers' checkpoints. So a fast width's students run while a slow width's teacher is still
training, instead of waiting at a two-stage barrier. Each trial is a function trainable that builds and fits a
`TorchTrainer` (the Train V2 pattern) with `TuneReportCallback`, so Train's metrics reach Tune and W&B.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

from msad import console, storage
from msad.config import config_from_dict
from msad.engine.placement import HEAD_NODE_RESOURCE, release_leftovers
from msad.errors import UserError
from msad.sweep.experiment_files import ExperimentFiles
from msad.sweep.report import REPORT_CSV, REPORT_MD, REPORT_PLOT, write_report
from msad.sweep.spec import Sweep, TrialSpec, load_sweep
from msad.sweep.tracking import (
    WandbTrialLogger,
    keep_analytics_messages_in,
    log_report_run,
    make_wandb_callback,
    sync_command,
)
from msad.sweep.trials import RESULTS_DIR, TrialSummary, error_line, read_trial_summaries, write_trial_summary


class SweepInterrupted(KeyboardInterrupt):
    """Tune returned with trials unfinished (Ctrl-C): the CLI says how to resume and exits 130."""


class DependencyFailedError(RuntimeError):
    """A student whose teacher did not produce a checkpoint; the message names the teacher."""


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


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one teacher or student training as a TorchTrainer (Train V2 pattern)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from msad.engine.trainer import fit

    if config.get("dependency_error"):
        raise DependencyFailedError(config["dependency_error"])
    cfg = config_from_dict(config["msad"])
    result = fit(cfg, callbacks=[TuneReportCallback()], check_storage=False)  # the sweep checked, and watches
    # the last result names the best checkpoint: the driver's TrialSummaryCallback turns it into the report row
    # (and W&B summary); a teacher's students get its sliced, weights-only file written beside it
    handoff = {}
    if cfg.train.role == "teacher" and result.best_checkpoint:
        from msad.deploy.teacher import publish_sliced_teacher

        handoff["teacher_file"] = publish_sliced_teacher(result.best_checkpoint)
    ray.tune.report({**result.metrics, "best_checkpoint": result.best_checkpoint,
                     "final_checkpoint": result.checkpoint, **handoff})


def final_replicates(result: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap replicates of a finished trial's final evaluation, read from beside its last checkpoint
    (`msad.engine.loop.BOOTSTRAP_FILE`): {"replicates": ..., "H_replicates": ...} as far as they exist."""
    from msad.engine.loop import BOOTSTRAP_FILE, branch_file

    final = result.get("final_checkpoint")
    if not final:
        return {}
    found = {}
    for key, name in (("replicates", BOOTSTRAP_FILE),
                      ("H_replicates", branch_file(BOOTSTRAP_FILE, "high"))):
        location = storage.sibling(str(final), name)  # a local path or an s3:// URI alike
        if storage.exists(location):
            found[key] = json.loads(storage.read_bytes(location))
    return found


def _summary_base(trial: Any) -> TrialSummary:
    return TrialSummary.for_trial(trial.config, config_from_dict(trial.config["msad"]), trial.trial_id)


class TrialSummaryCallback(Callback):
    """Writes each ended trial's row (results/<trial>.json) for the report, on the driver, and closes the trial's
    W&B run with the same row as its summary; both are uploaded to an object-store experiment right away.

    Args:
        files: the experiment's files (rows go to its results/).
        wandb: the sweep's W&B logger, if tracking is on.
    """

    def __init__(self, files: ExperimentFiles, wandb: WandbTrialLogger | None = None) -> None:
        self.files = files
        self.wandb = wandb
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.time())

    def _write(self, trial: Any, summary: TrialSummary) -> None:
        timed = dataclasses.replace(summary, started_at=self.started.get(trial.trial_id), ended_at=time.time())
        row = write_trial_summary(self.files.local, timed)
        uploads = [row.relative_to(self.files.local).as_posix()]
        if self.wandb is not None and (run_folder := self.wandb.finish_trial(trial, timed)):
            uploads.append(run_folder)
        self.files.upload(*uploads)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("best_checkpoint"):
            self._write(trial, _summary_base(trial).finished(result, result["best_checkpoint"],
                                                             final_replicates(result)))
        else:  # ended by the scheduler (ASHA) before its last iteration
            self._write(trial, _summary_base(trial).stopped(result, result.get("checkpoint_path")))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._write(trial, _summary_base(trial).failed(error_line(trial)))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # W&B runs still open were closed by the W&B logger, which comes first in the callbacks
        if self.wandb is not None and (self.files.local / "wandb").is_dir():
            self.files.upload("wandb")


class SharedStorageWatch(Callback):
    """Checks nodes that join during the sweep (autoscaling) for the shared storage, as the sweep checked the first.

    A node that cannot see `distributed.storage_path` is named in one line: trials placed there would write
    checkpoints the driver and other nodes never see. Each look waits at most 5 s for new nodes' answers (those
    that do not answer yet are asked again next time), so Tune's loop is held up rarely and briefly.

    Args:
        location: distributed.storage_path.
        checked: node ids already checked (the sweep's start).
        period_s: how often to look for new nodes.
    """

    def __init__(self, location: str, checked: list[str], period_s: float = 30.0) -> None:
        self.location, self.checked, self.period_s = location, set(checked), period_s
        self._next = time.monotonic() + period_s

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "checked": set(), "_next": 0.0}  # a resumed sweep: another process, another cluster

    def on_step(self, iteration: int, trials: list, **info: Any) -> None:
        if storage.is_uri(self.location) or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.period_s
        import ray

        from msad.engine.trainer import probe_shared_storage

        new = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in self.checked]
        if not new:
            return
        probe = probe_shared_storage(self.location, new, timeout=5.0)
        self.checked.update(node for node in new if node not in probe.silent)  # silent ones: ask again later
        for node in probe.blind.values():
            console.current().warn(f"distributed.storage_path: node {node} joined and cannot see "
                                   f"{storage.resolve(self.location)}; trials placed there cannot save checkpoints "
                                   "where the driver reads them: mount the shared storage on it")


def _progress_reporter() -> Any:
    from ray.tune import CLIReporter

    return CLIReporter(
        parameter_columns={"role": "role", "width": "width", "h_short_side": "H", "kd_alpha": "kd",
                           "kd_temperature": "T"},
        metric_columns={"iteration": "iter", "loss_total": "loss", "latest_AP": "AP"},
        max_report_frequency=30,
    )


def trial_driver_resources(sweep: Sweep) -> dict[str, float]:
    """What each trial's driver actor holds: the sweep's `trial_resources`, on the head node.

    A trial's driver (its Tune actor, which owns the Train controller) is where a trial lives: if its node goes
    away, the trial errors even though its Train run could go on from a checkpoint. The head cannot be lost
    without losing the cluster, and GPU nodes are often spot or autoscaled, so drivers stay on the head while their
    Train workers go wherever the GPUs are; a lost worker node only restarts the workers (distributed.max_failures).
    """
    return {**sweep.spec.trial_resources, HEAD_NODE_RESOURCE: 0.001}


def check_head_fits_trial_drivers(sweep: Sweep) -> None:
    """Refuse, in one line, `trial_resources` that the Ray head cannot hold: the trial drivers would wait forever
    (while autoscaled GPU nodes sit idle). A KubeRay head with `num-cpus: "0"` is the usual way to get there."""
    import ray

    heads = [n for n in ray.nodes() if n.get("Alive") and HEAD_NODE_RESOURCE in n.get("Resources", {})]
    if not heads:  # an unusual cluster without Ray's head marker: nothing to compare with
        return
    has = heads[0]["Resources"]
    for name, amount in sweep.spec.trial_resources.items():
        if has.get(name, 0.0) < amount:
            raise UserError(f"{sweep.spec_path}: trial_resources: {name}={amount:g} does not fit the Ray head, which "
                            f"has {has.get(name, 0.0):g} {name}; every trial's driver runs on the head (it must "
                            "outlive GPU nodes): give the head that much (ray start --num-cpus) or ask for less")


def check_trials_placeable(sweep: Sweep) -> None:
    """Refuse, in one line naming the first such trial, a sweep with a trial whose Train workers no node of the
    cluster (nor of its autoscaler's node types) can ever hold, the trial driver's share of the head counted:
    Ray would wait for them forever (`msad.engine.placement`)."""
    from msad.engine.trainer import check_workers_placeable

    seen = set()
    for trial in sweep.trials:
        d = config_from_dict(trial.config).distributed
        shape = (d.num_workers, d.cpus_per_worker, d.use_gpu and d.gpus_per_worker)
        if shape not in seen:
            seen.add(shape)
            check_workers_placeable(f"{sweep.spec_path}: trial {trial.name}", d, sweep.spec.trial_resources)


def _make_search(sweep: Sweep) -> ResumableSearch:
    """The teacher-first searcher under Tune's concurrency limit (applied here, so re-runs count too)."""
    searcher = TeacherFirstSearcher(sweep.teachers, sweep.students, sweep.baselines)
    return ResumableSearch(ConcurrencyLimiter(searcher, max_concurrent=sweep.spec.max_concurrent_trials))


def _trial_dirname(trial: Any) -> str:
    attempt = trial.config.get("attempt", 0)
    return trial.config["trial_name"] + (f"-rerun{attempt}" if attempt else "")


SWEEP_LOG = "sweep.log"  # in the experiment's (local) folder: everything the live view does not show


def run_sweep(spec_path: Path, overrides: list[str], address: str | None = None, resume: bool = False,
              verbose: bool = False) -> Path:
    """Run (or resume) the sweep in `spec_path`; returns the local folder holding its report.

    The terminal shows the live view (`msad.sweep.live.SweepView`) and the report; Ray's, Tune's and W&B's
    messages go to `sweep.log` in the experiment's folder. `verbose`: everything on the terminal, as they print it.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table shows our role/width/kd columns
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # AP arrives only at evaluations
    import ray
    from ray import tune

    from msad.build import resolve_data_paths
    from msad.engine.trainer import check_shared_storage, init_ray
    from msad.sweep.live import SweepView, planned_trial

    sweep = load_sweep(spec_path, overrides)
    experiment_dir = sweep.experiment_dir
    files = ExperimentFiles(experiment_dir)
    exists = storage.exists(experiment_dir)
    if exists and not resume:
        raise UserError(f"{experiment_dir}: experiment exists; add --resume to continue it, or set a new name "
                        "in the sweep file (nothing was overwritten)")
    if resume and not exists:
        raise UserError(f"{experiment_dir}: no experiment to resume; run without --resume to start it")
    if files.remote and not exists and (files.local / RESULTS_DIR).is_dir():
        raise UserError(f"{files.local}: holds the results of an earlier experiment named {sweep.spec.name!r} "
                        f"(the local copy of {experiment_dir}); move it away, or set a new name in the sweep file")
    with console.capture(verbose) as con:
        # W&B's mode, before Ray starts: a malformed key is named in one line here and the runs go offline
        wandb = make_wandb_callback(sweep.base.tracking, sweep.spec.name, files)
        resolve_data_paths(sweep.base.data)  # generate the built-in dataset once, before trials race for it
        init_ray(address)
        check_head_fits_trial_drivers(sweep)
        check_trials_placeable(sweep)
        if address and (released := release_leftovers()):  # a sweep stopped before (ray job stop, a killed driver)
            con.event(released)
        checked_nodes = check_shared_storage(sweep.base.distributed.storage_path)
        log = console.keep_log(files.local / SWEEP_LOG)
        if log and wandb:
            keep_analytics_messages_in(log)
        count = len(sweep.trials)
        con.event(f"sweep {sweep.spec.name}: {count} trial{'s' if count != 1 else ''}, experiment {experiment_dir}"
                  + (f"; Ray's, Tune's and W&B's messages: {log}" if log else ""))

        trainable = tune.with_resources(run_trial, trial_driver_resources(sweep))
        if exists and tune.Tuner.can_restore(experiment_dir):
            files.pull(RESULTS_DIR)  # the rows so far, from wherever the experiment is stored
            # errored trials stay ERROR in Tune's list; the searcher hands them out again (TeacherFirstSearcher)
            tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=False)
        else:
            view = SweepView(sweep.spec.name, [planned_trial(t.tune_config()) for t in sweep.trials],
                             sweep.spec.max_concurrent_trials)
            scheduler = make_scheduler(sweep)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=_make_search(sweep),
                    scheduler=scheduler,
                    num_samples=-1,  # the searcher says when the sweep is done (re-runs included)
                    trial_name_creator=lambda trial: trial.config["trial_name"],
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=sweep.spec.name, storage_path=storage.resolve(sweep.base.distributed.storage_path),
                    failure_config=tune.FailureConfig(max_failures=sweep.spec.trial_retries),
                    callbacks=[*([wandb] if wandb else []), TrialSummaryCallback(files, wandb),
                               SharedStorageWatch(sweep.base.distributed.storage_path, checked_nodes), view,
                               SchedulerState(scheduler)],
                    progress_reporter=_progress_reporter()),
            )
        started = time.time()
        try:
            tuner.fit()  # on Ctrl-C Tune saves the experiment's state and returns early
        finally:
            if address and (released := release_leftovers(ray.get_runtime_context().get_job_id())):
                con.event(released)
        names = {t.name for t in sweep.trials}
        rows = read_trial_summaries(files.local) if (files.local / RESULTS_DIR).is_dir() else []
        # an ERROR row from before this run belongs to a trial the resumed searcher handed out again: not ended yet
        ended = len(names & {r.name for r in rows if r.status != "ERROR" or (r.ended_at or 0.0) >= started})
        if rows:
            con.result(write_report(files.local))
            files.upload(REPORT_MD, REPORT_CSV, REPORT_PLOT)
            if report_run := log_report_run(sweep.base.tracking, sweep.spec.name, files):
                files.upload(report_run)
        con.result(f"\nexperiment: {experiment_dir}\nreport: {files.describe()}\n"
                   f"W&B offline runs, to upload: {sync_command(files.local)}"
                   + (f"\nlog: {files.local / SWEEP_LOG}" if log else ""))
        if not files.upload(*([SWEEP_LOG] if log else [])):
            con.warn(f"some files are only in {files.local}; upload them to {experiment_dir} (e.g. aws s3 sync) "
                     "or run launch.py report on the local copy")
    if ended < len(names):
        raise SweepInterrupted(f"sweep stopped with {len(names) - ended} of {len(names)} trials unfinished; "
                               f"continue it with: launch.py {spec_path} --resume")
    return files.local
