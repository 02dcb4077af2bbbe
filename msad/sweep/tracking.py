"""Weights & Biases tracking for sweeps: one W&B run per Tune trial, grouped by experiment, never holding the key.

Ray's `WandbLoggerCallback` does the plumbing (one logging actor per trial, results forwarded as they arrive). The
subclass here only changes what each trial's run looks like:

- group = experiment name, job_type = role, name = the trial's name, tags = `tracking.tags` + [role, "w<width>"];
- the W&B config is the trial's msad config (`trial.config["msad"]`) with secret-looking keys removed;
- runs are written under the experiment directory (`EXPERIMENT_DIR/wandb/`), so offline runs travel with it;
- the summary keys the trial function reports last (role, width, capacity, AP, ... see `SUMMARY_KEYS`) all reach
  W&B's summary, strings included (Ray's logger keeps numbers only) and `None` as NaN, so every run has the same
  summary columns.

The API key is never passed as an argument and never logged: wandb reads `WANDB_API_KEY` (or `~/.netrc`) itself,
and Ray hands the variable to the logging actor through its runtime environment, not through any config.
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

from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor
from ray.tune import Callback
from ray.tune.experiment import Trial

from msad.config import TrackingConfig
from msad.errors import UserError
from msad.sweep.report import TrialSummary

MODES = ("online", "offline", "disabled")
LEGACY_MODES = {"dryrun": "offline", "run": "online"}  # values older wandb releases accept in WANDB_MODE
DEFAULT_HOST = "https://api.wandb.ai"
# Result keys kept in every run's summary even when they are strings or None (the fields of a trial summary).
SUMMARY_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialSummary))
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


class _MsadLoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging actor, keeping string and None summary values and waiting for wandb to write.

    Ray logs numbers and media only; a trial's role, schedule, status and checkpoint are strings, and a metric
    that was never measured is None. wandb keeps strings in history and summary, and NaN marks a missing number.
    """

    def run(self) -> None:
        try:
            super().run()
        finally:
            # Ray kills this actor (and with it the wandb-core process) as soon as run() returns, and wandb.finish()
            # returns before wandb-core has written the run's last records: without this wait the run-*.wandb file
            # can end up empty. teardown() is what wandb's atexit hook would do, and a killed actor never runs it.
            self._wandb.teardown()

    def _handle_result(self, result: dict) -> tuple[dict, dict]:
        log, config_update = super()._handle_result(result)
        for key in SUMMARY_KEYS:
            if key in result and key not in log and key not in self._exclude:
                value = result[key]
                if value is None:
                    log[key] = math.nan
                elif isinstance(value, str):
                    log[key] = value
        return log, config_update


class MsadWandbCallback(WandbLoggerCallback):
    """`WandbLoggerCallback` that names, groups, tags and configures each trial's run from the trial's config.

    Args:
        tracking: the `tracking` config section (project, entity, tags).
        mode: "online" or "offline" (see `wandb_mode`).
        experiment_name: the sweep's name; every trial's run joins this W&B group.
        experiment_dir: local experiment folder; wandb writes `experiment_dir/wandb/`.
    """

    _logger_actor_cls = _MsadLoggingActor

    def __init__(self, tracking: TrackingConfig, mode: str, experiment_name: str, experiment_dir: Path) -> None:
        # Per-trial values are added in log_trial_start. Ray's default excludes ("done", "should_checkpoint",
        # "config") stay; nothing the trial reports is dropped, so W&B's summary holds its last values.
        super().__init__(project=tracking.project, group=experiment_name, excludes=[], log_config=False,
                         upload_checkpoints=False)
        self.tracking = tracking
        self.mode = mode
        self.experiment_dir = Path(experiment_dir)
        # resume="allow": a resumed sweep continues a trial's run (same id, the trial id) instead of clashing.
        self._common_kwargs: dict[str, Any] = {"dir": str(self.experiment_dir), "mode": mode, "resume": "allow"}
        if tracking.entity:
            self._common_kwargs["entity"] = tracking.entity

    def setup(self, *args: Any, **kwargs: Any) -> None:
        # Ray's setup insists on a key unless WANDB_MODE is offline/disabled in the *environment*; our mode is an
        # init argument, so only an online run needs the check (it raises early, with Ray's message, without one).
        if self.mode == "online":
            super().setup(*args, **kwargs)
        self.experiment_dir.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp when `dir` is missing

    def log_trial_start(self, trial: Trial) -> None:
        # Ray's log_trial_start merges self.kwargs over its defaults into the wandb.init arguments, so setting them
        # per trial here customises each run without copying Ray's logic. Tune calls this from its single driver
        # loop, one trial at a time.
        role = str(_trial_value(trial, "role"))
        width = float(_trial_value(trial, "msad")["model"]["width"])
        self.kwargs = {
            **self._common_kwargs,
            "job_type": role,
            "name": str(_trial_value(trial, "trial_name")),
            "tags": [*self.tracking.tags, role, f"w{width}"],
            "config": self.run_config(trial),
        }
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        # Ray's logging actor writes result["config"] (Tune puts the whole trial config there) into the W&B config
        # on every result: keep it equal to the scrubbed msad config so nothing else, and no secret, leaks in.
        super().log_trial_result(iteration, trial, {**result, "config": self.run_config(trial)})

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # After Ctrl-C, trials still running never got log_trial_end, so Ray's cleanup would wait its whole upload
        # timeout (30 min) for their logging actors. End their runs cleanly first; W&B keeps what they logged.
        for trial in list(self._trial_queues):
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)

    @staticmethod
    def run_config(trial: Trial) -> dict[str, Any]:
        """The W&B config of a trial's run: its msad config without credential-like keys."""
        return scrub_secrets(_trial_value(trial, "msad"))


def make_wandb_callback(tracking: TrackingConfig, experiment_name: str, experiment_dir: Path) -> Callback | None:
    """The Tune callback that tracks a sweep in W&B, or None when `tracking.mode` resolves to "disabled".

    Put it in `ray.tune.RunConfig(callbacks=[...])` (a Tune callback: Train's RunConfig rejects it).

    Args:
        tracking: the `tracking` config section.
        experiment_name: the sweep's name (the W&B group).
        experiment_dir: the local experiment folder; runs land in `experiment_dir/wandb/`.
    """
    mode = wandb_mode(tracking.mode)
    if mode == "disabled":
        return None
    return MsadWandbCallback(tracking, mode, experiment_name, Path(experiment_dir))


def sync_command(experiment_dir: Path | str) -> str:
    """The shell line that uploads a sweep's offline W&B runs: `wandb sync EXPERIMENT_DIR/wandb/offline-run-*`.

    Args:
        experiment_dir: the experiment folder; quoted for the shell, the glob left for the shell to expand.
    """
    return f"wandb sync {shlex.quote(str(Path(experiment_dir)))}/wandb/offline-run-*"
