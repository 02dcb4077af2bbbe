"""The chaos benchmark's short version (`benchmarks/chaos.py --quick`): a teacher -> student sweep on a three-node
`ray start` cluster whose driver is SIGKILLed as the teacher's row is written and run again with `--resume`,
and whose student loses its node in the middle of its KD ramp, ends with the weights of the same configs trained
without Ray or faults, every W&B step once, and no placement group of the killed driver left behind."""

from __future__ import annotations

from pathlib import Path

from conftest import weights_difference

from benchmarks import chaos
from msad.checkpoint import CHECKPOINT_FILE


def test_killed_nodes_and_a_killed_driver_change_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    result = chaos.main(["--quick", "--reference", "in-process", "--out", str(out)])
    compared = {c["trial"]: c for c in result["compared"]}
    teacher, student = compared["teacher-w0.25-h128"], compared["student-w0.25-l64-kd0.2-t3"]
    for trial in (teacher, student):
        assert trial["status"] == "TERMINATED" and trial["difference"] == 0.0, trial
        assert trial["wandb_duplicates"] == 0 and trial["wandb_missing"] == [], trial
    # the teacher had ended when its driver died: if Tune had not saved that yet, --resume ran its trial again
    # (which ended at once from its last checkpoint) and continued the same W&B run in a second folder, without
    # logging a step twice; measured both ways
    assert teacher["wandb_folders"] in (1, 2) and teacher["wandb_steps"] == 24
    driver, node = result["kills"]
    assert driver["target"] == "driver" and result["driver"]["placement_groups_gone_s"] < 30
    (hit,) = node["hit"]  # the student's node, after its checkpoint 4: it resumed from there on another node
    assert node["target"].startswith("worker") and hit["trial"] == student["trial"]
    assert 0 < hit["recovery_s"] < 120 and hit["redone"] >= 0
    # negative control: the comparison sees training since a checkpoint (the reference's own checkpoint 4)
    final = out / "undisturbed" / student["trial"] / f"checkpoint_{16:07d}" / CHECKPOINT_FILE
    early = out / "undisturbed" / student["trial"] / f"checkpoint_{4:07d}" / CHECKPOINT_FILE
    assert weights_difference(final, early) > 1e-6
