"""Tune callbacks of the sweep's driver: each ended trial's report row (and W&B summary), and the shared-storage
check of nodes that join during the sweep.

Apart from the entry point (`msad.sweep.runner`), which only builds them; they run on the driver, inside Tune's
loop, as trials start and end.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ray.tune import Callback

from msad import console, storage
from msad.config import config_from_dict
from msad.sweep.experiment_files import ExperimentFiles
from msad.sweep.tracking import WandbTrialLogger
from msad.sweep.trial import final_replicates
from msad.sweep.trials import TrialSummary, error_line, write_trial_summary


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

        from msad.engine.cluster import probe_shared_storage

        new = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in self.checked]
        if not new:
            return
        probe = probe_shared_storage(self.location, new, timeout=5.0)
        self.checked.update(node for node in new if node not in probe.silent)  # silent ones: ask again later
        for node in probe.blind.values():
            console.current().warn(f"distributed.storage_path: node {node} joined and cannot see "
                                   f"{storage.resolve(self.location)}; trials placed there cannot save checkpoints "
                                   "where the driver reads them: mount the shared storage on it")
