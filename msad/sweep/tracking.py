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
  those are skipped, so its curve continues instead of being dropped or doubled (offline after a killed driver too:
  `persisted_step` reads where the run's earlier folders stop);
- every run ends with the same summary keys (the fields of the trial's report row, None as NaN) and its
  `status`, whether it finished, was stopped by the scheduler, failed or was interrupted;
- runs are written under `EXPERIMENT_DIR/wandb/` (the local copy, for an object-store experiment: the sweep uploads
  each run's folder when its trial ends), so offline runs travel with the experiment;
- a trial run again after a failure (`--resume`) continues its first attempt's W&B run (`tracking_id`);
- when the sweep ends, one more run (job type "report", `log_report_run`) holds the sweep's report: the results
  table and the paired comparisons as `wandb.Table`s and the AP-vs-capacity plot as a `wandb.Image`, so the
  project's dashboard shows the comparison without panels built by hand.

W&B is a side channel: its failure never stops a trial. A key wandb's client would reject as malformed is named in
one line when the mode is resolved (`wandb_mode`, before Ray starts) and the sweep logs offline. Online, wandb's
waits are bounded (`online_settings`: init and finish give up after seconds, not minutes); any failure of W&B
(unreachable, 5xx, no answer, a refused key, quota) at init, log or finish is named in one line the first time
(`report_problem`; the details go to the sweep's log) and the run goes on, or starts, offline in
`EXPERIMENT_DIR/wandb/` for `sync_command`; later runs of the sweep start offline without waiting, and try the server
again after `RETRY_ONLINE_AFTER_S`.

The API key is never passed as an argument nor written anywhere by msad: wandb reads `WANDB_API_KEY` (or the
driver machine's `~/.netrc`, from `wandb login`) itself, in the driver process only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import netrc
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ray.tune import Callback
from ray.tune.experiment import Trial

from msad import console
from msad.config import TrackingConfig
from msad.errors import UserError
from msad.sweep.experiment_files import ExperimentFiles
from msad.sweep.trials import REPLICATE_KEYS, TrialSummary

MODES = ("online", "offline", "disabled")
LEGACY_MODES = {"dryrun": "offline", "run": "online"}  # values older wandb releases accept in WANDB_MODE
DEFAULT_HOST = "https://api.wandb.ai"
SECRET_KEY = re.compile(r"api[_-]?key|token|secret|passw(or)?d", re.IGNORECASE)


def _wandb_server() -> str:
    """The W&B server wandb talks to: `WANDB_BASE_URL` (W&B server installs) or W&B's cloud."""
    return (os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).rstrip("/")


def _wandb_api_key() -> tuple[str, str] | None:
    """(where it comes from, the key) as wandb finds it: `WANDB_API_KEY`, else a netrc entry for the W&B host
    (`wandb login`). The netrc file is `$NETRC` or `~/.netrc`; an unreadable netrc counts as no key. The key stays
    in this process: callers only test it."""
    if key := os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY", key
    host = urlsplit(_wandb_server()).netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return (f"{path} (machine {host})", entry[2]) if entry and entry[2] else None


def wandb_api_key_available() -> bool:
    """Whether wandb will find an API key: `WANDB_API_KEY`, or a netrc entry for the W&B host (`wandb login`).

    The netrc file is `$NETRC` or `~/.netrc`, and the host comes from `WANDB_BASE_URL` (W&B server installs), as
    wandb itself resolves them. An unreadable netrc counts as no key.
    """
    return _wandb_api_key() is not None


def wandb_api_key_problem() -> str | None:
    """What is wrong with the API key's format, as wandb's client checks it before sending it (length, characters),
    e.g. "WANDB_API_KEY: API key must have 40+ characters, has 34."; None for a well-formed key or none at all.
    The text never holds the key."""
    found = _wandb_api_key()
    if found is None:
        return None
    try:
        from wandb.sdk.lib.wbauth.validation import check_api_key
    except ImportError:  # another wandb release: a malformed key then fails at wandb.init, and falls back there
        return None
    source, key = found
    problem = check_api_key(key)
    return f"{source}: {problem}" if problem else None


def wandb_mode(tracking_mode: str, experiment_dir: Path | str | None = None) -> str:
    """The wandb mode to run in: explicit modes pass through; "auto" picks one.

    "auto" follows `WANDB_MODE` when the environment sets it (so `WANDB_MODE=offline` keeps a machine offline
    whatever keys it holds), else "online" when an API key is available and "offline" otherwise: a sweep never
    fails, or prompts, for want of a key; offline runs are uploaded later with `sync_command`. Online (explicit or
    chosen) with a key wandb would reject as malformed is "offline", and the problem is named once
    (`report_problem`).

    Args:
        tracking_mode: `tracking.mode` from the config: "auto", "online", "offline" or "disabled".
        experiment_dir: the experiment's local folder, named in the problem's line (where the offline runs go).
    """
    if tracking_mode not in (*MODES, "auto"):
        raise UserError(f"tracking.mode: invalid value {tracking_mode!r}; allowed: auto, {', '.join(MODES)}")
    mode = tracking_mode
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        env_mode = LEGACY_MODES.get(env_mode, env_mode)
        mode = env_mode if env_mode in MODES else "online" if wandb_api_key_available() else "offline"
    if mode == "online" and (problem := wandb_api_key_problem()):
        report_problem(problem, experiment_dir)
        return "offline"
    return mode


# ---------------------------------------------------------------------------------------------------------------------
# W&B failures: bounded waits, one line, offline runs
# ---------------------------------------------------------------------------------------------------------------------

# wandb's defaults wait 90 s per wandb.init (retrying the server all along) and forever in run.finish: an outage cost
# minutes per trial and then the sweep. The waits measured with each failing server are in benchmarks/RESULTS.md.
INIT_TIMEOUT_S = 8.0
FINISH_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 5.0  # one HTTP request (GraphQL, file stream, file upload): a server that never answers
RETRY_ONLINE_AFTER_S = 600.0  # after a failure, runs start offline (no wait) this long, then try the server again
TRANSACTION_LOG_FLUSH_S = 1.0  # how often a run's .wandb file is written (wandb's default 15 s): what a kill loses

_problems: dict[str, tuple[str, float]] = {}  # W&B server -> (its problem, time.monotonic() when last seen)


def base_settings() -> Any:
    """wandb settings of every run: no console capture, no system stats, no git probing, no wandb chatter."""
    import wandb

    return wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                          x_transaction_log_flush_interval=TRANSACTION_LOG_FLUSH_S)


def online_settings() -> Any:
    """`base_settings` with W&B's waits bounded: `wandb.init` gives up after `INIT_TIMEOUT_S` (wandb's default 90 s),
    `run.finish` after `FINISH_TIMEOUT_S` (default: until uploaded) and raises, so the run is known to be unsynced;
    each request after `REQUEST_TIMEOUT_S`. Uploads that `run.log` queues are retried in wandb's background process
    as usual: they never hold a trial."""
    settings = base_settings()
    settings.update_from_dict({
        "init_timeout": INIT_TIMEOUT_S, "finish_timeout": FINISH_TIMEOUT_S, "finish_timeout_raises": True,
        "x_graphql_timeout_seconds": REQUEST_TIMEOUT_S, "x_file_stream_timeout_seconds": REQUEST_TIMEOUT_S,
        "x_file_transfer_timeout_seconds": REQUEST_TIMEOUT_S,
    })
    return settings


def wandb_failing() -> bool:
    """Whether W&B failed in this process less than `RETRY_ONLINE_AFTER_S` ago (runs then start offline at once)."""
    seen = _problems.get(_wandb_server())
    return seen is not None and time.monotonic() - seen[1] < RETRY_ONLINE_AFTER_S


def _one_line(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = " ".join(str(error).split()) or "no message"
    text = text.split(" Consider increasing the init_timeout")[0]  # wandb's advice: msad sets it short on purpose
    return f"{type(error).__name__}: {text}"[:300]


def report_problem(error: BaseException | str, experiment_dir: Path | str | None) -> None:
    """Name a W&B failure in one line, the first time in this process for this W&B server (later failures, and the
    traceback, go to the sweep's log only: standard error, which a sweep captures there); and mark the server
    failing, so runs start offline for `RETRY_ONLINE_AFTER_S`.

    Args:
        error: the exception wandb raised, or a sentence.
        experiment_dir: the experiment's local folder, whose wandb/ keeps the offline runs.
    """
    server = _wandb_server()
    line = _one_line(error)
    first = server not in _problems
    _problems[server] = (line, time.monotonic())
    detail = "".join(traceback.format_exception(error)) if isinstance(error, BaseException) else line
    print(f"W&B ({server}) failed; training goes on with offline W&B runs: {detail}", file=sys.stderr, flush=True)
    if first:
        where = sync_command(experiment_dir) if experiment_dir is not None else "wandb sync"
        console.current().warn(f"W&B ({server}): {line.rstrip('.')}; training goes on, W&B runs are kept offline: "
                               f"upload them later with: {where}")


def start_run(mode: str, experiment_dir: Path | str, **init_args: Any) -> Any | None:
    """`wandb.init(**init_args)` that never fails a trial: online with bounded waits, unless W&B is failing
    (`wandb_failing`); on any error, reported once (`report_problem`), the same run offline; None if even that
    fails (the trial goes on without a run).

    Args:
        mode: "online" or "offline".
        experiment_dir: the experiment's local folder (named in the line that reports a failure).
        init_args: wandb.init's arguments, except mode and settings.
    """
    import wandb

    if mode == "online" and not wandb_failing():
        started = time.monotonic()
        try:
            return wandb.init(mode="online", settings=online_settings(), **init_args)
        except Exception as err:  # W&B is a side channel: unreachable, 5xx, refused key, quota...
            print(f"W&B: wandb.init online gave up after {time.monotonic() - started:.1f} s", file=sys.stderr)
            report_problem(err, experiment_dir)
            if init_args.get("id"):  # wandb's service keeps the failed online run's id for this process
                init_args = {**init_args, "id": offline_run_id(str(init_args["id"]))}
    try:
        return wandb.init(mode="offline", settings=base_settings(), **init_args)
    except Exception as err:
        report_problem(err, experiment_dir)
        return None


def persisted_step(experiment_dir: Path, run_id: str, exclude: Path) -> int:
    """The last step this experiment's earlier offline folders of `run_id` hold (0: none), read by wandb's own reader
    of its transaction logs (`wandb leet inspect --summary --json`).

    A sweep resumed after its driver was killed replays each trial's iterations since its checkpoint. Online, W&B
    knows the run's last step; offline, a new process knows nothing, and the run's folders would hold those steps
    twice. What was logged but not yet written when the driver died (up to `TRANSACTION_LOG_FLUSH_S` of it) is not
    in the file, so the replay logs it again rather than skipping it: no step twice, and no gap where the replay
    covers it (it starts after the trial's last checkpoint).
    """
    step = 0
    for folder in sorted((experiment_dir / "wandb").glob(f"offline-run-*-{run_id}")):
        if folder == exclude:
            continue
        try:
            out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(folder)],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            step = max(step, int(json.loads(out).get("step") or 0))
        except (OSError, subprocess.SubprocessError, ValueError, AttributeError) as err:
            # the sweep's log only (standard error): a side channel's bookkeeping
            print(f"W&B: could not read the steps of {folder} ({err}); they may be logged again", file=sys.stderr)
    return step


OFFLINE_ID_SUFFIX = "-offline"


def offline_run_id(run_id: str) -> str:
    """The id of the offline run that stands in for a run whose online start failed: wandb's service process keeps
    the failed run's id taken until the process ends ("run ID ... is in use"), so the stand-in needs its own. It is
    synced later as a run of its own, with the trial's name, group and config."""
    return run_id + OFFLINE_ID_SUFFIX


def finish_run(run: Any, experiment_dir: Path | str, exit_code: int = 0) -> Path:
    """`run.finish` that never fails a trial; returns the run's folder.

    An online run that cannot upload within `FINISH_TIMEOUT_S` (or fails otherwise) is reported once and its folder
    renamed `offline-run-*`: wandb's transaction log in it holds everything the run logged, and `sync_command`
    uploads it with the offline runs (`wandb sync` of a run folder is how wandb recovers an unsynced online run)."""
    folder = Path(run.dir).parent  # run.dir is the run's files/ folder
    online = not run.offline
    try:
        run.finish(exit_code=exit_code)
        return folder
    except Exception as err:
        report_problem(err, experiment_dir)
    if online and folder.name.startswith("run-"):
        moved = folder.with_name(f"offline-{folder.name}")
        try:
            folder.rename(moved)
            return moved
        except OSError as err:
            print(f"W&B: could not rename {folder} to {moved.name}: {err}", file=sys.stderr, flush=True)
    return folder


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


ONLINE_NEEDS_KEY = ("tracking.mode: online needs a W&B API key (WANDB_API_KEY or `wandb login` on the machine that "
                    "runs the sweep); use offline or auto to log without one")


class WandbTrialLogger(Callback):
    """One W&B run per trial, logged from the sweep driver (see the module docstring for what each run holds).

    `TrialSummaryCallback` calls `finish_trial` with the trial's report row when a trial ends, so W&B and the
    report show the same numbers; `on_experiment_end` closes runs still open after Ctrl-C.

    Args:
        tracking: the `tracking` config section (project, entity, tags).
        mode: "online" or "offline" (see `wandb_mode`); online runs fall back to offline (`start_run`).
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
        self._init_args: dict[str, dict[str, Any]] = {}  # trial id -> its wandb.init arguments (to reopen offline)
        self._setup_logged: set[str] = set()  # trial ids whose resolved precision and compile are in their config

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its callbacks with the experiment; open runs belong to this process only.
        return {**self.__dict__, "_runs": {}, "_last_step": {}, "_init_args": {}, "_setup_logged": set()}

    def setup(self, **info: Any) -> None:
        if self.mode == "online" and not wandb_api_key_available():
            raise UserError(ONLINE_NEEDS_KEY)
        self.files.local.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp when `dir` is missing

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.trial_id in self._runs:  # the same trial started again (Tune retry): its run goes on
            return

        role = str(_trial_value(trial, "role"))
        width = float(_trial_value(trial, "msad")["model"]["width"])
        name = str(_trial_value(trial, "trial_name"))
        replicate_of = str(trial.config.get("replicate_of") or name)
        # seed replicates of one trial share a W&B group (W&B averages a group's curves); the sweep is a tag
        group = self.experiment_name if replicate_of == name else f"{self.experiment_name}:{replicate_of}"
        init_args = dict(
            project=self.tracking.project, entity=self.tracking.entity, group=group, job_type=role,
            name=name, tags=[*self.tracking.tags, role, f"w{width:g}", self.experiment_name],
            config=self.run_config(trial), dir=str(self.files.local),
            id=trial.config.get("tracking_id") or trial.trial_id, resume="allow",  # resumed and re-run: same run
            reinit="create_new",  # one run object per trial in this process, several open at once
        )
        run = start_run(self.mode, self.files.local, **init_args)
        if run is None:  # W&B cannot even write offline (reported): the trial trains on without a run
            return
        self._runs[trial.trial_id] = run
        self._init_args[trial.trial_id] = init_args
        # a resumed online run's step counter stands one past its last logged step; a new run's at 0, and an offline
        # one's too: its earlier folders in this experiment (a killed driver's) say where it stopped
        self._last_step[trial.trial_id] = max(int(run.step or 0) - 1,
                                              persisted_step(self.files.local, run.id, Path(run.dir).parent))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        run, step = self._runs.get(trial.trial_id), result.get("iteration")
        if run is None or not isinstance(step, int) or step <= self._last_step[trial.trial_id]:
            return  # not an msad report, or an iteration logged before a restart from an earlier checkpoint
        try:
            self._log_setup(trial.trial_id, run, result)
            # committed now: with a step given, wandb holds the row until a later step or finish (a killed driver
            # would lose it)
            run.log(_history_values(result), step=step, commit=True)
        except Exception as err:  # W&B's process failed: the run goes on offline
            report_problem(err, self.files.local)
            init_args = self._init_args[trial.trial_id]
            if not run.offline:  # an online run's id stays taken in wandb's service if its finish fails
                init_args = self._init_args[trial.trial_id] = {**init_args, "id": offline_run_id(init_args["id"])}
            finish_run(run, self.files.local)
            run = self._runs[trial.trial_id] = start_run("offline", self.files.local, **init_args)
            if run is None:
                del self._runs[trial.trial_id]
                return
            try:
                run.log(_history_values(result), step=step, commit=True)
            except Exception as again:
                report_problem(again, self.files.local)
        self._last_step[trial.trial_id] = step

    def _log_setup(self, trial_id: str, run: Any, result: dict) -> None:
        """What the workers resolved (`train.amp: auto`'s precision, `train.compile`), into the run's config under
        "resolved" once: the trial's config says "auto", its W&B run says what that meant on its hardware."""
        if trial_id in self._setup_logged or not isinstance(result.get("precision"), str):
            return
        resolved = {key: result[key] for key in ("precision", "compile", "precision_warning") if key in result}
        run.config.update({"resolved": resolved}, allow_val_change=True)
        self._setup_logged.add(trial_id)

    def finish_trial(self, trial: Trial, summary: TrialSummary) -> str | None:
        """Write the trial's report row into its run's summary and close the run; returns the run's folder
        relative to the experiment (e.g. "wandb/offline-run-..."), or None if the trial had no open run."""
        run = self._runs.pop(trial.trial_id, None)
        self._init_args.pop(trial.trial_id, None)
        if run is None:
            return None
        try:
            run.summary.update(summary_values(summary))
        except Exception as err:
            report_problem(err, self.files.local)
        folder = finish_run(run, self.files.local, exit_code=1 if summary.status == "ERROR" else 0)
        try:
            return folder.relative_to(self.files.local).as_posix()
        except ValueError:  # wandb wrote elsewhere (WANDB_DIR set by the user): nothing of ours to upload
            return None

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial_id in list(self._runs):  # interrupted (Ctrl-C): keep what was logged, say so
            run = self._runs.pop(trial_id)
            try:
                run.summary.update({"status": "INTERRUPTED"})
            except Exception as err:
                report_problem(err, self.files.local)
            finish_run(run, self.files.local)

    @staticmethod
    def run_config(trial: Trial) -> dict[str, Any]:
        """The W&B config of a trial's run: its msad config without credential-like keys."""
        return scrub_secrets(_trial_value(trial, "msad"))


def make_wandb_callback(tracking: TrackingConfig, experiment_name: str,
                        files: ExperimentFiles) -> WandbTrialLogger | None:
    """The Tune callback that tracks a sweep in W&B, or None when `tracking.mode` resolves to "disabled".

    Put it in `ray.tune.RunConfig(callbacks=[...])` (a Tune callback: Train's RunConfig rejects it). Call it
    before Ray starts: a malformed key is named here, in one line (see `wandb_mode`), and online mode without a
    key is refused here.

    Args:
        tracking: the `tracking` config section.
        experiment_name: the sweep's name (the W&B group).
        files: the experiment's files; runs land in `<files.local>/wandb/`.
    """
    mode = wandb_mode(tracking.mode, files.local)
    if mode == "disabled":
        return None
    if mode == "online" and not wandb_api_key_available():
        raise UserError(ONLINE_NEEDS_KEY)
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
    mode = wandb_mode(tracking.mode, files.local)
    if mode == "disabled":
        return None
    import wandb

    from msad.sweep.compare import TABLE_COLUMNS, comparisons, table_rows
    from msad.sweep.report import REPORT_PLOT, raw_table
    from msad.sweep.trials import read_trial_summaries

    summaries = read_trial_summaries(files.local)
    columns, rows = raw_table(summaries)
    found = comparisons(summaries)
    run = start_run(mode, files.local, project=tracking.project, entity=tracking.entity, group=experiment_name,
                    job_type=REPORT_JOB_TYPE, name=f"{experiment_name}-report",
                    tags=[*tracking.tags, REPORT_JOB_TYPE, experiment_name], dir=str(files.local),
                    reinit="create_new")
    if run is None:  # reported: the report's files stand on their own
        return None
    try:
        run.log({"report": wandb.Table(columns=columns, data=rows),
                 "comparisons": wandb.Table(columns=list(TABLE_COLUMNS), data=table_rows(found)),  # the report's
                 "ap_vs_capacity": wandb.Image(str(files.local / REPORT_PLOT))})
        run.summary.update({"trials": len(summaries), "comparisons": len(found),
                            "real_differences": sum(1 for c in found if c.real)})
    except Exception as err:  # W&B's process failed; what was logged stays in the run's folder
        report_problem(err, files.local)
    folder = finish_run(run, files.local)
    try:
        return folder.relative_to(files.local).as_posix()
    except ValueError:  # WANDB_DIR set by the user: wandb wrote elsewhere
        return None


ANALYTICS_LOGGER = "opentelemetry"  # wandb sends its own usage analytics to the W&B server with OpenTelemetry


class _AnalyticsLog(logging.FileHandler):
    """The sweep log's handler of wandb's analytics exporter (a class of its own, so a later sweep replaces it)."""


def keep_analytics_messages_in(log: Path) -> None:
    """Send the messages of wandb's analytics exporter to the sweep's log, not the terminal.

    wandb reports its own errors to the W&B server through OpenTelemetry; against a failing server the exporter
    retries and says so ("Transient error Service Unavailable encountered while exporting metrics batch") through
    Python logging, from a background thread until the process exits: after the sweep's capture of the terminal has
    ended. Nothing is turned off: the lines only change place.

    Args:
        log: the sweep's log file (appended to).
    """
    logger = logging.getLogger(ANALYTICS_LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, _AnalyticsLog)]:
        logger.removeHandler(old)
        old.close()
    handler = _AnalyticsLog(log, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def sync_command(experiment_dir: Path | str) -> str:
    """The shell line that uploads a sweep's offline W&B runs: `wandb sync EXPERIMENT_DIR/wandb/offline-run-*`.

    Args:
        experiment_dir: the experiment folder; quoted for the shell, the glob left for the shell to expand.
    """
    return f"wandb sync {shlex.quote(str(Path(experiment_dir)))}/wandb/offline-run-*"
