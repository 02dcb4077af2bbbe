"""The sweep's live view: one line per trial event (start, evaluation, end, failure) and, on a terminal, a status
block redrawn in place with each running trial's progress and the sweep's ETA.

A Tune `Callback` on the driver: Tune hands it every result the trials report, so nothing is parsed. ETAs are
rough on purpose: a trial's from its own iterations per second; the sweep's from the remaining iterations of every
unfinished trial at the speed measured for trials of the same role and width, spread over the trials that can run
at once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from msad import console, storage
from msad.console import Pace, ap_text, duration
from msad.sweep.trials import error_line

HEARTBEAT_S = 60.0  # off a terminal, a running trial's progress line comes at most this often


@dataclass
class PlannedTrial:
    """What the view knows of a trial before it starts."""

    name: str
    kind: str  # (role, width): trials of one kind run at about the same speed
    label: str  # "teacher w0.25 H128+L64", "student w0.25 L64 kd0.2 T3", "FCOS w0.25 L64"
    iterations: int


def planned_trial(tune_config: dict[str, Any]) -> PlannedTrial:
    """A trial's label and length out of its Tune config (`msad.sweep.spec.TrialSpec.tune_config`)."""
    role, width = tune_config["role"], tune_config["width"]
    cfg = tune_config["msad"]
    h = cfg["data"]["test_short_side"]
    if role == "teacher":
        label = f"teacher w{width:g} H{h}+L{h // 2}"
    elif role == "student":
        label = f"student w{width:g} L{h // 2} kd{tune_config['kd_alpha']:g} T{tune_config['kd_temperature']:g}"
    else:
        label = f"FCOS w{width:g} {tune_config.get('resolution') or 'H'}{h}"
    return PlannedTrial(tune_config["trial_name"], f"{role}-{width:g}", label, int(cfg["train"]["iterations"]))


@dataclass
class TrialProgress:
    """A running trial: its pace, latest loss and evaluation, and when it last had a line off a terminal."""

    plan: PlannedTrial
    pace: Pace
    loss: float | None = None
    evaluated: dict[str, Any] = field(default_factory=dict)  # the latest evaluation's metrics
    said: tuple[float, int] = (0.0, 0)  # (time, tenth of the run) of its latest line off a terminal

    @classmethod
    def starting(cls, plan: PlannedTrial) -> TrialProgress:
        return cls(plan, Pace(plan.iterations), said=(time.time(), 0))

    def record(self, result: dict[str, Any]) -> None:
        self.pace.record(int(result.get("iteration", 0)))
        if isinstance(result.get("loss_total"), (int, float)):
            self.loss = float(result["loss_total"])
        if "AP" in result:
            self.evaluated = result


def short_reason(line: str) -> str:
    """An error line without the run's path and module prefixes: 'rank 0: NonFiniteLossError: non-finite ...'."""
    line = re.sub(r"^[\w.]*RunFailedError: run \S+ failed: ", "", line)
    return re.sub(r"\b(?:[a-z_]\w*\.)+([A-Z]\w*(?:Error|Exception))\b", r"\1", line)


def _error_file(trial: Any) -> str:
    """The failed trial's traceback in the experiment's trial folder (Tune's error.txt; a URI on object stores)."""
    return f"{trial.path}/error.txt"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class SweepView(Callback):
    """Prints the sweep's progress on `msad.console.current()` (looked up at each call: a resumed sweep's callbacks
    are unpickled in a new process, with a new console).

    Args:
        sweep_name: the sweep's name, for the header.
        planned: every trial of the sweep, by name.
        max_concurrent: the sweep's max_concurrent_trials (the sweep's ETA spreads the remaining work over them).
    """

    def __init__(self, sweep_name: str, planned: list[PlannedTrial], max_concurrent: int) -> None:
        self.sweep_name = sweep_name
        self.planned = {p.name: p for p in planned}
        self.max_concurrent = max(1, max_concurrent)
        self.running: dict[str, TrialProgress] = {}
        self.ended: dict[str, str] = {}  # name -> "done" | "stopped" | "failed"
        self.rates: dict[str, float] = {}  # kind -> seconds per iteration, latest measured
        self.precisions: set[str] = set()  # precision lines already shown
        self.outages_told: set[str] = set()  # object-store outages of other processes already shown
        self._outages_read = 0.0
        self.started = time.time()
        self._drawn = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # a resumed sweep: trials that were running start again; the clock restarts
        return {**self.__dict__, "running": {}, "started": time.time(), "_drawn": 0.0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"outages_told": set(), "_outages_read": 0.0, **state})  # views pickled before them

    # --- Tune's hooks -------------------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        plan = planned_trial(trial.config)
        self.planned.setdefault(plan.name, plan)
        self.running[plan.name] = TrialProgress.starting(plan)
        self.ended.pop(plan.name, None)  # a re-run
        self._say(f"start   {plan.name}  ({plan.label}, {plan.iterations} it)")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        progress = self.running.get(trial.config["trial_name"])
        if progress is None or "best_checkpoint" in result:  # the trial's closing result: reported at its end
            return
        progress.record(result)
        self._say_precision(result)
        self._say_outages()
        pace = progress.pace
        if (rate := pace.seconds_per_iteration()) is not None:
            self.rates[progress.plan.kind] = rate
        tenth = 10 * pace.iteration // max(1, pace.total)
        where = f"{progress.plan.name}  it {pace.iteration}/{pace.total}"
        when = f"trial ETA {duration(pace.eta())}  sweep ETA ~{duration(self.sweep_eta())}"
        if "AP" in result:
            self._say(f"eval    {where}  AP {ap_text(result)}  loss {_loss(progress.loss)}  {when}")
            progress.said = (time.time(), tenth)
        elif (not console.current().tty and tenth > progress.said[1]
              and time.time() - progress.said[0] >= HEARTBEAT_S):
            # off a terminal (no status block): a line per tenth of a long trial, at most one a minute
            self._say(f"running {where}  loss {_loss(progress.loss)}  {when}")
            progress.said = (time.time(), tenth)
        self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["trial_name"]
        progress = self.running.pop(name, None)
        result = trial.last_result or {}
        took = duration(time.time() - progress.pace.started) if progress else "?"
        self._say_outages()
        if result.get("best_checkpoint"):
            self.ended[name] = "done"
            self._say(f"done    {name}  AP {ap_text(result)} in {took}  ({self._counts()})")
        else:
            self.ended[name] = "stopped"
            self._say(f"stopped {name}  at it {result.get('iteration', '?')} by the scheduler (ASHA) in {took}  "
                      f"({self._counts()})")
        self._draw(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["trial_name"]
        self.running.pop(name, None)
        self.ended[name] = "failed"
        self._say(f"FAILED  {name}: {short_reason(error_line(trial))} (traceback: {_error_file(trial)})")
        self._draw(force=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["trial_name"]
        self.running.pop(name, None)
        self._say(f"retry   {name} (trial_retries): {short_reason(error_line(trial))}")

    def on_step(self, iteration: int, trials: list, **info: Any) -> None:
        self._draw()

    # --- what is shown ------------------------------------------------------------------------------------------
    def _counts(self) -> str:
        done = sum(1 for s in self.ended.values() if s != "failed")
        failed = len(self.ended) - done
        pending = len(self.planned) - len(self.ended) - len(self.running)
        return (f"{done}/{len(self.planned)} done, " + (f"{failed} failed, " if failed else "")
                + f"{len(self.running)} running, {pending} pending")

    def sweep_eta(self) -> float | None:
        """Seconds until every trial has ended, roughly; None before any speed is known."""
        if not self.rates:
            return None
        fallback = sum(self.rates.values()) / len(self.rates)
        work = 0.0
        for name, plan in self.planned.items():
            if name in self.ended:
                continue
            progress = self.running.get(name)
            rate = (progress.pace.seconds_per_iteration() if progress else None) or self.rates.get(plan.kind, fallback)
            work += rate * (plan.iterations - (progress.pace.iteration if progress else 0))
        unfinished = len(self.planned) - len(self.ended)
        return work / max(1, min(self.max_concurrent, unfinished))

    def status_lines(self) -> list[str]:
        lines = [f"sweep {self.sweep_name}: {self._counts()}; elapsed {duration(time.time() - self.started)}, "
                 f"ETA ~{duration(self.sweep_eta())}"]
        for progress in self.running.values():
            lines.append(f"  {progress.plan.name:<34} {progress.pace.bar(20)}  loss {_loss(progress.loss)}  "
                         f"AP {ap_text(progress.evaluated)}  ETA {duration(progress.pace.eta())}")
        return lines

    def _say_precision(self, result: dict[str, Any]) -> None:
        """What `train.amp` resolved to, once per sweep for each distinct answer (trials on other hardware may differ),
        with its warning (an explicit bf16 on a device that emulates it); a trial that compiles says so once too."""
        compiled = result.get("compile")
        for line in (result.get("precision"), compiled if str(compiled).startswith("torch.compile: on") else None):
            if isinstance(line, str) and line not in self.precisions:
                self.precisions.add(line)
                self._say(line)
                if line == result.get("precision") and isinstance(result.get("precision_warning"), str):
                    console.current().warn(result["precision_warning"])

    def _say_outages(self) -> None:
        """Object-store outages that other processes of the cluster came through during this sweep, once each."""
        if time.time() - self._outages_read < 1.0:
            return
        self._outages_read = time.time()
        for key, record in storage.published_outages().items():
            if key not in self.outages_told and float(record["start"]) >= self.started:
                self.outages_told.add(key)
                storage.notice_outage(record)

    def _say(self, text: str) -> None:
        console.current().event(f"[{console.stamp()}] {text}")

    def _draw(self, force: bool = False) -> None:
        if not console.current().tty or (not force and time.time() - self._drawn < 1.0):
            return
        self._drawn = time.time()
        console.current().status(self.status_lines())
