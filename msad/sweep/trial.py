"""The trial body: what runs in each trial's Tune actor (one teacher, student or baseline training through
`msad.engine.trainer.fit`), and the reading back of what a finished trial left beside its checkpoints.

Apart from the driver's side (`msad.sweep.runner`, `msad.sweep.search`, `msad.sweep.callbacks`): this is the
code Tune ships to the trial's actor.
"""

from __future__ import annotations

import json
from typing import Any

from msad import storage
from msad.config import config_from_dict


class DependencyFailedError(RuntimeError):
    """A student whose teacher did not produce a checkpoint; the message names the teacher."""


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
