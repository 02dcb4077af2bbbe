"""ASHA's rungs survive `--resume`: the scheduler's state is kept with the experiment by a Tune callback.

Tune pickles the scheduler (in `TuneConfig`) and the callbacks (in `RunConfig`) together into the experiment's
`tuner.pkl` when a sweep starts, and saves each callback's `get_state()` as the sweep goes; `Tuner.restore`
unpickles the first and hands the second to `set_state`. This test does the same with Ray Tune's own ASHA code and
pickle, on trials stood in by their id and config (all ASHA reads of a trial), without a Ray cluster.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from msad.sweep.search import SchedulerState, StudentASHA


def _student(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"role": "student", "kd_alpha": 0.2})


def _asha() -> StudentASHA:
    return StudentASHA(time_attr="iteration", metric="AP", mode="max", max_t=100, grace_period=10,
                       reduction_factor=2, stop_last_trials=False)


def _started_sweep() -> tuple[bytes, SchedulerState]:
    """A sweep whose first student reached the first rung with AP 30; returns tuner.pkl's bytes and the callback."""
    scheduler = _asha()
    kept = SchedulerState(scheduler)
    tuner_pkl = pickle.dumps({"scheduler": scheduler, "callbacks": [kept]})  # as Tune writes it at the start
    first = _student("a")
    scheduler.on_trial_add(None, first)
    assert scheduler.on_trial_result(None, first, {"iteration": 10, "AP": 30.0}) == TrialScheduler.CONTINUE
    return tuner_pkl, kept


def _resumed(tuner_pkl: bytes, saved: dict | None) -> StudentASHA:
    restored = pickle.loads(tuner_pkl)
    if saved is not None:
        restored["callbacks"][0].set_state(pickle.loads(pickle.dumps(saved)))  # Tune pickles callback states too
    return restored["scheduler"]


def test_a_resumed_sweep_keeps_ashas_rungs() -> None:
    tuner_pkl, kept = _started_sweep()
    saved = kept.get_state()
    assert saved is not None
    scheduler = _resumed(tuner_pkl, saved)
    worse = _student("b")
    scheduler.on_trial_add(None, worse)
    # the rung remembers the first student's AP 30: a student at AP 5 is below the top half and stops
    assert scheduler.on_trial_result(None, worse, {"iteration": 10, "AP": 5.0}) == TrialScheduler.STOP


def test_without_the_kept_state_the_resumed_rungs_are_empty() -> None:
    """Negative control: Tune's own restore alone (the scheduler as first pickled) lets the worse student go on."""
    tuner_pkl, _ = _started_sweep()
    scheduler = _resumed(tuner_pkl, None)
    worse = _student("b")
    scheduler.on_trial_add(None, worse)
    assert scheduler.on_trial_result(None, worse, {"iteration": 10, "AP": 5.0}) == TrialScheduler.CONTINUE
