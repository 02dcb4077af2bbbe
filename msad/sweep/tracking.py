"""Weights & Biases tracking for sweeps: one W&B run per Tune trial, grouped by experiment, never holding the key.

`WandbTrialLogger` is a Tune callback that logs from the sweep driver with wandb's public API (`wandb.init` with
`reinit="create_new"`, one run object per trial). Logging from the driver, rather than from a Ray actor per trial
as Ray's `WandbLoggerCallback` does, keeps the key out of every Ray runtime environment (Ray's runtime-env agent
logs those) and out of Ray's private logging-actor API; the driver already receives every result.

- group = experiment name (with several seeds: "<experiment>:<trial without its seed>", so W&B keeps a trial's
  seed replicates together), job_type = role, name = the trial's name, tags = `tracking.tags` + [role,
  "w<width>", experiment name];
- the W&B config is the trial's msad config (`trial.config["msad"]`) with secret-looking keys removed;
- step = the msad iteration: a trial restarted from a checkpoint replays iterations it had already logged, and
  those are skipped, so its curve continues instead of being dropped or doubled;
- every run ends with the same summary keys (the fields of the trial's report row, None as NaN) and its
  `status`, whether it finished, was stopped by the scheduler, failed or was interrupted;
- runs are written under `EXPERIMENT_DIR/wandb/` (the local copy, for an object-store experiment: the sweep uploads
  each run's folder when its trial ends), so offline runs travel with the experiment;
- a trial run again after a failure (`--resume`) continues its first attempt's W&B run (`tracking_id`);
- when the sweep ends, one more run (job type "report", `log_report_run`) holds the sweep's report: the results
  table and the paired comparisons as `wandb.Table`s and the AP-vs-capacity plot as a `wandb.Image`, so the
  project's dashboard shows the comparison without panels built by hand.

The API key is never passed as an argument nor written anywhere by msad: wandb reads `WANDB_API_KEY` (or the
driver machine's `~/.netrc`, from `wandb login`) itself, in the driver process only.
"""

from __future__ import annotations

import dataclasses
import math
import netrc
import os
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ray.tune import Callback
from ray.tune.experiment import Trial

from msad.config import TrackingConfig
from msad.errors import UserError
from msad.sweep.experiment_files import ExperimentFiles
from msad.sweep.report import REPLICATE_KEYS, TrialSummary

MODES = ("online", "offline", "disabled")
LEGACY_MODES = {"dryrun": "offline", "run": "online"}  # values older wandb releases accept in WANDB_MODE
DEFAULT_HOST = "https://api.wandb.ai"
SECRET_KEY = re.compile(r"api[_-]?key|token|secret|passw(or)?d", re.IGNORECASE)


def wandb_api_key_available() -> bool:
    """Whether wandb will find an API key: `WANDB_API_KEY`, or a netrc entry for the W&B host (`wandb login`).

    The netrc file is `$NETRC` or `~/.netrc`, and the host comes from `WANDB_BASE_URL` (W&B server installs), as
    wandb itself resolves them. An unreadable netrc counts as no key.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(tracking_mode: str) -> str:
    """The wandb mode to run in: explicit modes pass through; "auto" picks one.

    "auto" follows `WANDB_MODE` when the environment sets it (so `WANDB_MODE=offline` keeps a machine offline
    whatever keys it holds), else "online" when an API key is available and "offline" otherwise: a sweep never
    fails, or prompts, for want of a key; offline runs are uploaded later with `sync_command`.

    Args:
        tracking_mode: `tracking.mode` from the config: "auto", "online", "offline" or "disabled".
    """
    if tracking_mode in MODES:
        return tracking_mode
    if tracking_mode != "auto":
        raise UserError(f"tracking.mode: invalid value {tracking_mode!r}; allowed: auto, {', '.join(MODES)}")
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    env_mode = LEGACY_MODES.get(env_mode, env_mode)
    if env_mode in MODES:
        return env_mode
    return "online" if wandb_api_key_available() else "offline"


def scrub_secrets(value: Any) -> Any:
    """A copy of `value` without mapping keys that look like credentials (*api_key*, *token*, *secret*, *password*).

    Args:
        value: a config tree of dicts, lists and scalars; keys are matched at every depth.
    """
    if isinstance(value, dict):
        return {k: scrub_secrets(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    return value


def _trial_value(trial: Trial, key: str) -> Any:
    try:
        return trial.config[key]
    except KeyError:
        raise KeyError(f"trial {trial}: its Tune config has no {key!r} (the sweep runner sets trial_name, role "
                       "and msad on every trial)") from None


# Tune's own bookkeeping in every result: not metrics of the model.
TUNE_KEYS = frozenset({"training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
                       "iterations_since_restore", "pid", "done", "should_checkpoint"})


def _history_values(result: dict[str, Any]) -> dict[str, float | int]:
    """The numbers of a result worth a point in W&B's history (bools and Tune's bookkeeping left out)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in TUNE_KEYS}


def summary_values(summary: TrialSummary) -> dict[str, Any]:
    """A run's final summary: every field of the trial's report row, `status` (TERMINATED, STOPPED, ERROR) and
    `error` included; None as NaN, so each column exists on every run. The bootstrap replicates stay out (long
    lists; their intervals are in)."""
    return {k: math.nan if v is None else v for k, v in dataclasses.asdict(summary).items()
            if k not in REPLICATE_KEYS}


class WandbTrialLogger(Callback):
    """One W&B run per trial, logged from the sweep driver (see the module docstring for what each run holds).

    `TrialSummaryCallback` calls `finish_trial` with the trial's report row when a trial ends, so W&B and the
    report show the same numbers; `on_experiment_end` closes runs still open after Ctrl-C.

    Args:
        tracking: the `tracking` config section (project, entity, tags).
        mode: "online" or "offline" (see `wandb_mode`).
        experiment_name: the sweep's name; every trial's run joins this W&B group.
        files: the experiment's files; wandb writes `<files.local>/wandb/`.
    """

    def __init__(self, tracking: TrackingConfig, mode: str, experiment_name: str, files: ExperimentFiles) -> None:
        self.tracking = tracking
        self.mode = mode
        self.experiment_name = experiment_name
        self.files = files
        self._runs: dict[str, Any] = {}  # trial id -> wandb Run
        self._last_step: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its callbacks with the experiment; open runs belong to this process only.
        return {**self.__dict__, "_runs": {}, "_last_step": {}}

    def setup(self, **info: Any) -> None:
        if self.mode == "online" and not wandb_api_key_available():
            raise UserError("tracking.mode: online needs a W&B API key (WANDB_API_KEY or `wandb login` on the "
                            "machine that runs the sweep); use offline or auto to log without one")
        self.files.local.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp when `dir` is missing

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.trial_id in self._runs:  # the same trial started again (Tune retry): its run goes on
            return
        import wandb

        role = str(_trial_value(trial, "role"))
        width = float(_trial_value(trial, "msad")["model"]["width"])
        name = str(_trial_value(trial, "trial_name"))
        replicate_of = str(trial.config.get("replicate_of") or name)
        # seed replicates of one trial share a W&B group (W&B averages a group's curves); the sweep is a tag
        group = self.experiment_name if replicate_of == name else f"{self.experiment_name}:{replicate_of}"
        run = wandb.init(
            project=self.tracking.project, entity=self.tracking.entity, group=group, job_type=role,
            name=name, tags=[*self.tracking.tags, role, f"w{width:g}", self.experiment_name],
            config=self.run_config(trial), dir=str(self.files.local), mode=self.mode,
            id=trial.config.get("tracking_id") or trial.trial_id, resume="allow",  # resumed and re-run: same run
            reinit="create_new",  # one run object per trial in this process, several open at once
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True),
        )
        self._runs[trial.trial_id] = run
        # a resumed online run's step counter stands one past its last logged step; a new run's at 0
        self._last_step[trial.trial_id] = max(int(run.step or 0) - 1, 0)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        run, step = self._runs.get(trial.trial_id), result.get("iteration")
        if run is None or not isinstance(step, int) or step <= self._last_step[trial.trial_id]:
            return  # not an msad report, or an iteration logged before a restart from an earlier checkpoint
        run.log(_history_values(result), step=step)
        self._last_step[trial.trial_id] = step

    def finish_trial(self, trial: Trial, summary: TrialSummary) -> str | None:
        """Write the trial's report row into its run's summary and close the run; returns the run's folder
        relative to the experiment (e.g. "wandb/offline-run-..."), or None if the trial had no open run."""
        run = self._runs.pop(trial.trial_id, None)
        if run is None:
            return None
        run.summary.update(summary_values(summary))
        folder = Path(run.dir).parent  # run.dir is the run's files/ folder
        run.finish(exit_code=1 if summary.status == "ERROR" else 0)
        try:
            return folder.relative_to(self.files.local).as_posix()
        except ValueError:  # wandb wrote elsewhere (WANDB_DIR set by the user): nothing of ours to upload
            return None

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial_id in list(self._runs):  # interrupted (Ctrl-C): keep what was logged, say so
            run = self._runs.pop(trial_id)
            run.summary.update({"status": "INTERRUPTED"})
            run.finish(exit_code=0)

    @staticmethod
    def run_config(trial: Trial) -> dict[str, Any]:
        """The W&B config of a trial's run: its msad config without credential-like keys."""
        return scrub_secrets(_trial_value(trial, "msad"))


def make_wandb_callback(tracking: TrackingConfig, experiment_name: str,
                        files: ExperimentFiles) -> WandbTrialLogger | None:
    """The Tune callback that tracks a sweep in W&B, or None when `tracking.mode` resolves to "disabled".

    Put it in `ray.tune.RunConfig(callbacks=[...])` (a Tune callback: Train's RunConfig rejects it).

    Args:
        tracking: the `tracking` config section.
        experiment_name: the sweep's name (the W&B group).
        files: the experiment's files; runs land in `<files.local>/wandb/`.
    """
    mode = wandb_mode(tracking.mode)
    if mode == "disabled":
        return None
    return WandbTrialLogger(tracking, mode, experiment_name, files)


REPORT_JOB_TYPE = "report"


def log_report_run(tracking: TrackingConfig, experiment_name: str, files: ExperimentFiles) -> str | None:
    """Log the sweep's report (written by `msad.sweep.report.write_report` into `files.local`) as one W&B run.

    Returns the run's folder relative to the experiment (to upload with the experiment), or None when tracking is
    disabled.

    Args:
        tracking: the `tracking` config section.
        experiment_name: the sweep's name (the W&B group; the run is "<name>-report").
        files: the experiment's files, holding results/*.json and the plot.
    """
    mode = wandb_mode(tracking.mode)
    if mode == "disabled":
        return None
    import wandb

    from msad.sweep.compare import COLUMNS, comparisons
    from msad.sweep.report import REPORT_PLOT, raw_table, read_trial_summaries

    summaries = read_trial_summaries(files.local)
    columns, rows = raw_table(summaries)
    found = comparisons(summaries)
    comparison_rows = [[c.label, c.seeds, c.mean_a, c.mean_b, c.mean_a - c.mean_b,
                        None if c.difference is None else f"{c.difference.low:.6g} {c.difference.high:.6g}",
                        None if c.real is None else bool(c.real)] for c in found]
    run = wandb.init(
        project=tracking.project, entity=tracking.entity, group=experiment_name, job_type=REPORT_JOB_TYPE,
        name=f"{experiment_name}-report", tags=[*tracking.tags, REPORT_JOB_TYPE, experiment_name],
        dir=str(files.local), mode=mode, reinit="create_new",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True),
    )
    try:
        run.log({"report": wandb.Table(columns=columns, data=rows),
                 "comparisons": wandb.Table(columns=list(COLUMNS), data=comparison_rows),
                 "ap_vs_capacity": wandb.Image(str(files.local / REPORT_PLOT))})
        run.summary.update({"trials": len(summaries), "comparisons": len(found),
                            "real_differences": sum(1 for c in found if c.real)})
        folder = Path(run.dir).parent
    finally:
        run.finish()
    try:
        return folder.relative_to(files.local).as_posix()
    except ValueError:  # WANDB_DIR set by the user: wandb wrote elsewhere
        return None


def sync_command(experiment_dir: Path | str) -> str:
    """The shell line that uploads a sweep's offline W&B runs: `wandb sync EXPERIMENT_DIR/wandb/offline-run-*`.

    Args:
        experiment_dir: the experiment folder; quoted for the shell, the glob left for the shell to expand.
    """
    return f"wandb sync {shlex.quote(str(Path(experiment_dir)))}/wandb/offline-run-*"
