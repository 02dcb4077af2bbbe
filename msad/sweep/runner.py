"""The `sweep` command's entry point: `run_sweep` loads the sweep, checks the cluster, and runs one Tune experiment.

One Tune experiment holds every trial. A `Searcher` (Tune's public API for "what to run next") hands out the
teacher trials first and holds each student back until every teacher of its width has finished; it then fills in
the best of those teachers' checkpoints. So a fast width's students run while a slow width's teacher is still
training, instead of waiting at a two-stage barrier. Each trial is a function trainable that builds and fits a
`TorchTrainer` (the Train V2 pattern) with `TuneReportCallback`, so Train's metrics reach Tune and W&B.

The parts live beside it: the search and scheduling policy in `msad.sweep.search`, the trial body in
`msad.sweep.trial`, the driver's callbacks in `msad.sweep.callbacks`. Here: the checks that the cluster can hold
the trials, the Tune set-up, and the report at the end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from msad import console, storage
from msad.config import config_from_dict
from msad.engine.placement import HEAD_NODE_RESOURCE, release_leftovers
from msad.errors import UserError
from msad.sweep.callbacks import SharedStorageWatch, TrialSummaryCallback
from msad.sweep.experiment_files import ExperimentFiles
from msad.sweep.report import REPORT_CSV, REPORT_MD, REPORT_PLOT, write_report

# earlier sweeps' experiment state (tuner.pkl) names run_trial, the search, scheduler and callbacks msad.sweep.runner.X
from msad.sweep.search import ResumableSearch as ResumableSearch
from msad.sweep.search import SchedulerState, make_scheduler, make_search
from msad.sweep.search import StudentASHA as StudentASHA
from msad.sweep.search import TeacherFirstSearcher as TeacherFirstSearcher
from msad.sweep.spec import Sweep, load_sweep
from msad.sweep.tracking import (
    keep_analytics_messages_in,
    log_report_run,
    make_wandb_callback,
    sync_command,
)
from msad.sweep.trial import run_trial
from msad.sweep.trials import RESULTS_DIR, read_trial_summaries


class SweepInterrupted(KeyboardInterrupt):
    """Tune returned with trials unfinished (Ctrl-C): the CLI says how to resume and exits 130."""


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
    from msad.engine.cluster import check_workers_placeable

    seen = set()
    for trial in sweep.trials:
        d = config_from_dict(trial.config).distributed
        shape = (d.num_workers, d.cpus_per_worker, d.use_gpu and d.gpus_per_worker)
        if shape not in seen:
            seen.add(shape)
            check_workers_placeable(f"{sweep.spec_path}: trial {trial.name}", d, sweep.spec.trial_resources)


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
    from msad.engine.cluster import check_shared_storage, init_ray
    from msad.sweep.live import SweepView, planned_trial

    sweep = load_sweep(spec_path, overrides)
    storage.set_retry_window(sweep.base.distributed.storage_retry_s)
    experiment_dir = sweep.experiment_dir
    files = ExperimentFiles(experiment_dir)
    storage.check_reachable(experiment_dir)  # a wrong endpoint fails here in seconds, not after the retry window
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
        # a local or NFS experiment: Tune's state files are written whole (temp file + rename), so a driver killed
        # while Tune saves them leaves the previous state for --resume, not an empty file (object stores put whole)
        tune_fs = None if storage.is_uri(experiment_dir) else storage.ray_storage(experiment_dir)[1]
        if exists and tune.Tuner.can_restore(experiment_dir, storage_filesystem=tune_fs):
            files.pull(RESULTS_DIR)  # the rows so far, from wherever the experiment is stored
            # errored trials stay ERROR in Tune's list; the searcher hands them out again (TeacherFirstSearcher)
            tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=False,
                                       storage_filesystem=tune_fs)
        else:
            view = SweepView(sweep.spec.name, [planned_trial(t.tune_config()) for t in sweep.trials],
                             sweep.spec.max_concurrent_trials)
            scheduler = make_scheduler(sweep)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=make_search(sweep),
                    scheduler=scheduler,
                    num_samples=-1,  # the searcher says when the sweep is done (re-runs included)
                    trial_name_creator=lambda trial: trial.config["trial_name"],
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=sweep.spec.name, storage_path=storage.resolve(sweep.base.distributed.storage_path),
                    storage_filesystem=tune_fs,
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
