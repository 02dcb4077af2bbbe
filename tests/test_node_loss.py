"""A sweep on a real multi-node Ray survives losing the node its teacher trains on, and leaves the W&B key nowhere.

A two-node Ray runs on this machine (separate raylets, its own temp dir); the sweep is launched with
`launch.py SWEEP --address ...` as on a cluster's head, with a canary W&B key in the launching shell only; the worker
node is SIGKILLed while the teacher trains there, and a replacement node joins as an autoscaler would add one.

The trial drivers live on the head (`trial_driver_resources`), so the teacher's trial outlives its workers; Ray Train
restarts them on the new node from the last checkpoint (`distributed.max_failures`); the student then trains from
the teacher's final checkpoint; the teacher's W&B history holds every iteration once, in order; and no file of the
experiment, of wandb or of Ray's session (its logs, the runtime-env agent's included) holds the key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from msad.engine.checkpoint import load_checkpoint
from msad.sweep.report import read_trial_summaries

REPO = Path(__file__).resolve().parents[1]
TEACHER_ITERATIONS = 24


def wandb_steps(run_dir: Path) -> list[int]:
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    records = [json.loads(line) for line in out.splitlines()]
    return [r["history"]["item"]["_step"] for r in records if r["type"] == "history"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the sweep ended before {path} appeared:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


CANARY = "msadcanary" + "0123456789abcdef0123456789ab"  # 40 characters, like a real key


@dataclass
class NodeLossRun:
    experiment: Path
    ray_tmp: Path
    wandb_home: Path
    output: str


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory: pytest.TempPathFactory, shapes_cache: Path) -> Iterator[NodeLossRun]:
    tmp = tmp_path_factory.mktemp("node_loss")
    spec = {
        "name": "node_loss", "base": str(REPO / "configs" / "cpu_base.yaml"),
        "config": {
            "model": {"fpn_channels": 32, "gn_groups": 8, "width_list": [0.25]},
            "data": {"shapes": {"num_train": 24, "num_val": 6, "image_size": [96, 128], "object_size": [8, 40],
                                "cache_dir": str(shapes_cache)},
                     "train_short_sides": [128], "test_short_side": 128, "num_workers": 0},
            "train": {"iterations": TEACHER_ITERATIONS, "batch_per_worker": 2, "lr_steps": [TEACHER_ITERATIONS - 1],
                      "warmup_iters": 1, "checkpoint_period": 2, "eval_period": TEACHER_ITERATIONS, "log_period": 1,
                      "kd_warmup_iters": 1},
            # 2 CPUs per worker: only a worker node has them (the head has 1), so training runs off the head
            "distributed": {"storage_path": str(tmp / "runs"), "num_workers": 1, "cpus_per_worker": 2,
                            "max_failures": 2},
            "tracking": {"mode": "auto"},
        },
        "teachers": {"grid": {"model.width": [0.25]}},
        "students": {"config": {"train": {"iterations": 2, "lr_steps": [1], "eval_period": 2}}},
        "max_concurrent_trials": 1,
    }
    path = tmp / "node_loss.yaml"
    path.write_text(yaml.safe_dump(spec))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    cluster_env["RAY_TMPDIR"] = str(ray_tmp)
    wandb_home = tmp / "wandb-home"
    driver_env = {**cluster_env, "WANDB_API_KEY": CANARY, "WANDB_MODE": "offline",
                  "WANDB_CONFIG_DIR": str(wandb_home / "config"), "WANDB_CACHE_DIR": str(wandb_home / "cache"),
                  "WANDB_DATA_DIR": str(wandb_home / "data")}
    holder = subprocess.Popen([sys.executable, str(REPO / "tests" / "data" / "two_node_cluster.py"),
                               "--head-cpus", "1", "--worker-nodes", "1"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cluster_env)
    experiment = tmp / "runs" / "node_loss"
    try:
        address = holder.stdout.readline().strip()
        assert address, "the two-node cluster did not start"
        sweep = subprocess.Popen([sys.executable, str(REPO / "launch.py"), str(path), "--address", address],
                                 cwd=tmp, env=driver_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(experiment / "runs" / "teacher-w0.25-h128" / "checkpoint_0000004" / "checkpoint.pt", sweep, 300)
        holder.stdin.write("kill-workers\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "killed"
        holder.stdin.write("add-worker\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "added"
        out, err = sweep.communicate(timeout=600)
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    assert sweep.returncode == 0, out[-3000:] + err[-3000:]
    try:
        yield NodeLossRun(experiment, ray_tmp, wandb_home, out + err)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_teacher_resumes_on_a_replacement_node_and_its_student_trains(node_loss: NodeLossRun) -> None:
    rows = {row.name: row for row in read_trial_summaries(node_loss.experiment)}
    teacher, student = rows["teacher-w0.25-h128"], rows["student-w0.25-l64-kd0.2-t3"]
    assert (teacher.status, student.status) == ("TERMINATED", "TERMINATED"), (teacher.error, student.error)
    state = load_checkpoint(teacher.checkpoint)
    assert state["iteration"] == TEACHER_ITERATIONS
    # restarted from a registered checkpoint (the one being written at the kill may not be), not from iteration 0
    assert state["resumed_from"] and state["resumed_from"][0] >= 2
    assert student.teacher_checkpoint == teacher.checkpoint
    assert "cannot see" not in node_loss.output  # the replacement node shares the storage: no warning
    # where rank 0 trained, report by report: the first worker node, then the replacement (never the head)
    results = (node_loss.experiment / "teacher-w0.25-h128" / "result.json").read_text().splitlines()
    nodes = [json.loads(line)["node_id"] for line in results if "node_id" in json.loads(line)]
    first, last = nodes[0], nodes[-1]
    assert first != last and nodes == [first] * nodes.index(last) + [last] * (len(nodes) - nodes.index(last))


def test_resumed_teachers_wandb_history_holds_every_iteration_once(node_loss: NodeLossRun) -> None:
    teacher = {row.name: row for row in read_trial_summaries(node_loss.experiment)}["teacher-w0.25-h128"]
    runs = (node_loss.experiment / "wandb").glob("offline-run-*")
    (run_dir,) = [d for d in runs if d.name.endswith(teacher.trial_id)]
    assert wandb_steps(run_dir) == list(range(1, TEACHER_ITERATIONS + 1))


def test_canary_key_appears_in_no_file(node_loss: NodeLossRun) -> None:
    sessions = list(node_loss.ray_tmp.glob("ray/session_*/logs"))  # RAY_TMPDIR/ray/session_<time>/logs
    assert sessions and any(p.name.startswith("runtime_env") for s in sessions for p in s.iterdir())
    searched = [node_loss.experiment, node_loss.wandb_home, node_loss.ray_tmp]
    assert sum(1 for root in searched for p in root.rglob("*") if p.is_file()) > 50  # really searched
    assert [p for root in searched for p in files_holding(root, CANARY.encode())] == []
    assert CANARY not in node_loss.output


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]
