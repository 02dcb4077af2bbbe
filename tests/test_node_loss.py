"""A sweep submitted to a real two-node Ray as cluster/README.md says survives losing the node its teacher trains on
and an S3 outage as its student starts, keeps its results with the experiment in S3, and leaves the W&B key nowhere.

The cluster is started with the `ray start` CLI, token authentication on: a head (1 CPU: room for one trial driver,
no Train worker) and a worker node (2 CPUs), each with its own working and temp directory, as two machines would
have. Storage is a bucket on a local S3 server (moto). The sweep goes in with `ray job submit --working-dir . --
python launch.py SWEEP --address auto`. The W&B key is the head's, in its `~/.netrc` (`wandb login` there), and
nowhere else. While the teacher trains on the worker node, that node is SIGKILLed (its raylet and every process
under it, as when a machine disappears), and a replacement node joins, as an autoscaler would add one.

The trial drivers live on the head (`trial_driver_resources`), so the teacher's trial outlives its workers; Ray Train
restarts them on the new node from the last checkpoint (`distributed.max_failures`); the student then trains from
the teacher's final checkpoint; the rows, report and W&B runs are in the experiment's S3 location, and
`launch.py report s3://...` rebuilds the report from there; the teacher's W&B history holds every iteration once,
in order; no file of the experiment, of wandb or of either node's Ray session (logs, the job's working directory,
the runtime-env agent's log) holds the key, and no process's command line does. The key is really loaded: W&B is
online (`tracking.mode: auto` finds the head's key), its server a local one that answers 503, which receives the
key, so the sweep's runs fall back to offline runs in the experiment, as when W&B is down.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import free_port, tiny_sweep, train_undisturbed, wandb_steps, weights_difference
from ray_nodes import RayNode, ray_list, wait_for_dashboard
from tcp_proxy import SwitchableProxy, through
from wandb_servers import CommandLines, FailingServer, write_netrc

from msad import storage
from msad.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint
from msad.sweep.trials import read_trial_summaries

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEACHER_ITERATIONS = 16
OUTAGE_S = 25.0  # well past the S3 client's own retries (6 s), which would hide a short cut
CANARY = "msadcanary" + "0123456789abcdef0123456789abcd"  # 40 characters, like a real key


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@dataclass
class ClusterRun:
    location: str  # the experiment's S3 URI
    copy: Path  # everything under it, downloaded after the sweep
    searched: list[Path]  # what the canary search covers besides the copy
    output: str  # the job's output (ray job submit streams it)
    report_output: str
    registered: int  # the teacher's last checkpoint that Ray Train had registered when its node was killed
    head: str  # the head's node id
    code: dict[str, list[str]]  # per worker node: where its Train workers' msad came from ("msad code: ..." lines)
    key_sent: int  # requests to the W&B server that carried the key
    command_lines: CommandLines  # every process's command line, watched while the job ran


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory, shapes_cache: Path, s3_bucket: str) -> Iterator[ClusterRun]:
    tmp = tmp_path_factory.mktemp("node_loss")
    proxy = SwitchableProxy(int(s3_bucket.rsplit(":", 1)[1]))  # the cluster reaches S3 through it: an outage later
    proxy.on()
    prefix = secrets.token_hex(4)
    storage_path = storage.join(through(s3_bucket, proxy.port), prefix)
    sweep_file = tiny_sweep(tmp, shapes_cache, "node_loss", {
        "teachers": {"grid": {"model.width": [0.25]}},
        "students": {"config": {"train": {"iterations": 2, "lr_steps": [1], "eval_period": 2}}},
        "max_concurrent_trials": 1,
    }, iterations=TEACHER_ITERATIONS, config={
        "model": {"width_list": [0.25]},  # 12 MB checkpoints through S3
        # 2 CPUs per worker: only a worker node has them (the head has 1), so training runs off the head
        "distributed": {"storage_path": storage_path, "num_workers": 1, "cpus_per_worker": 2, "max_failures": 2},
        "tracking": {"mode": "auto"},
    })
    location = storage.join(storage_path, "node_loss")

    wandb_server = FailingServer("503").__enter__()  # W&B down: online runs fall back to offline ones
    token = secrets.token_hex(16)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    base_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline",
                    PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # `python` in the job's command is this one
    head_home, wandb_home = tmp / "head-home", tmp / "wandb-home"
    head_home.mkdir()
    write_netrc(head_home, wandb_server.url, CANARY)  # `wandb login --host URL` on the head
    head_env = {**{k: v for k, v in base_env.items() if k != "WANDB_MODE"}, "HOME": str(head_home),
                "WANDB_BASE_URL": wandb_server.url, "WANDB_CONFIG_DIR": str(wandb_home / "config"),
                "WANDB_CACHE_DIR": str(wandb_home / "cache"), "WANDB_DATA_DIR": str(wandb_home / "data")}
    gcs, dashboard = free_port(), free_port()
    head_args = ["--head", f"--port={gcs}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}"]
    nodes = [RayNode(tmp, "head", head_env, head_args)]
    join = ["--address", f"127.0.0.1:{gcs}", "--num-cpus=2"]
    command_lines = CommandLines(CANARY).__enter__()
    try:
        wait_for_dashboard(dashboard, nodes[0])
        with pytest.raises(urllib.error.HTTPError, match="401"):  # token authentication is on: no token, no jobs
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=10)
        nodes.append(RayNode(tmp, "worker", base_env, join))
        # exactly as cluster/README.md submits, from the checkout
        job = subprocess.Popen(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
             "--submission-id", "msad-node-loss", "--", "python", "launch.py", str(sweep_file), "--address", "auto"],
            cwd=REPO, env=base_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        checkpoint = storage.join(location, "runs", "teacher-w0.25-h128", "checkpoint_0000004", "checkpoint.pt")
        deadline = time.monotonic() + 300
        while not storage.exists(checkpoint):
            assert job.poll() is None, f"the job ended before the teacher's checkpoint 4:\n{job.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the teacher saved no checkpoint 4 in 300 s"
            time.sleep(0.5)
        nodes[1].kill()  # the machine the teacher trains on disappears
        time.sleep(2)  # what the controller (on the head) got before the kill is registered by now
        snapshot = json.loads(storage.read_bytes(storage.join(location, "runs", "teacher-w0.25-h128",
                                                              "checkpoint_manager_snapshot.json")))
        registered = int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].rsplit("_", 1)[1])
        (head,) = [n["node_id"] for n in ray_list("nodes", dashboard, base_env) if n["is_head_node"]]
        nodes.append(RayNode(tmp, "replacement", base_env, join))
        # S3 goes down as the teacher ends (its row is uploaded) and the student starts, for longer than the S3
        # client's own retries (6 s)
        row = storage.join(s3_bucket, prefix, "node_loss", "results", "teacher-w0.25-h128.json")  # behind the proxy
        deadline = time.monotonic() + 400
        while not storage.exists(row):
            assert job.poll() is None and time.monotonic() < deadline, "the teacher's row never reached S3"
            time.sleep(0.2)
        proxy.off()
        time.sleep(OUTAGE_S)
        proxy.on()
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-4000:]
        report = subprocess.run([sys.executable, str(REPO / "launch.py"), "report", location], cwd=tmp,
                                env=base_env, capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr[-3000:]
        copy = tmp / "experiment-copy"
        fs, path = storage.filesystem(location)
        pafs.copy_files(path, str(copy), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        code = {name: [line.split("msad code: ", 1)[1].strip()
                       for log in node.temp_dir.glob("session_*/logs/worker-*.out")
                       for line in log.read_text(errors="replace").splitlines() if "msad code: " in line]
                for name, node in (("first", nodes[1]), ("replacement", nodes[2]))}
        command_lines.__exit__()
        yield ClusterRun(location, copy, [wandb_home, *(n.temp_dir for n in nodes), tmp / "head"], output,
                         report.stdout + report.stderr, registered, head, code,
                         len([r for r in wandb_server.requests if r.holds(CANARY)]), command_lines)
    finally:
        command_lines.__exit__()
        wandb_server.__exit__()
        for node in reversed(nodes):
            if node.proc.poll() is None:
                node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        proxy.off()


def test_teacher_resumes_on_a_replacement_node_and_its_student_trains(cluster_run: ClusterRun) -> None:
    rows = {row.name: row for row in read_trial_summaries(cluster_run.copy)}  # the rows as stored in S3
    teacher, student = rows["teacher-w0.25-h128"], rows["student-w0.25-l64-kd0.2-t3"]
    assert (teacher.status, student.status) == ("TERMINATED", "TERMINATED"), (teacher.error, student.error)
    assert teacher.checkpoint.startswith("s3://") and "endpoint_override=" in teacher.checkpoint
    # the student got the teacher's sliced file, written beside its best checkpoint in S3 with its digest, read it
    # from S3 (the driver's check and the worker on one node: downloaded once, the cache verified by digest) and
    # wrote its own checkpoints there (read back, digest checked)
    assert student.teacher_checkpoint == storage.sibling(teacher.checkpoint, "teacher_sliced.pt")
    assert load_checkpoint(student.teacher_checkpoint)["kind"] == "sliced"
    assert student.checkpoint.startswith(cluster_run.location.partition("?")[0])
    student_state = load_checkpoint(student.checkpoint)
    assert student_state["role"] == "student"
    assert student_state["config"]["train"]["teacher_checkpoint"] == student.teacher_checkpoint
    state = load_checkpoint(teacher.checkpoint)
    assert state["iteration"] == TEACHER_ITERATIONS
    # restarted from the last checkpoint Ray Train had registered before the kill (read from its own snapshot; one
    # in S3 may not be registered yet: measured, checkpoint 4 in S3 while 2 was the last registered), not from 0
    assert cluster_run.registered >= 2 and state["resumed_from"] == [cluster_run.registered], \
        (cluster_run.registered, state["resumed_from"])
    # where rank 0 trained, report by report: the first worker node, then the replacement, never the head; the
    # replacement's first report is the iteration after that checkpoint
    results = [json.loads(line) for line in
               (cluster_run.copy / "teacher-w0.25-h128" / "result.json").read_text().splitlines()]
    reports = [(r["node_id"], r["iteration"]) for r in results if "node_id" in r]
    nodes = [node for node, _ in reports]
    first, last = nodes[0], nodes[-1]
    assert first != last and nodes == [first] * nodes.index(last) + [last] * (len(nodes) - nodes.index(last))
    assert cluster_run.head not in nodes
    assert reports[nodes.index(last)][1] == cluster_run.registered + 1


def test_the_resumed_teacher_ends_with_the_weights_of_an_undisturbed_run(cluster_run: ClusterRun,
                                                                       tmp_path: Path) -> None:
    """The same config trained without a fault (one process, the plain loop): the teacher that lost its node and
    resumed on another ends with the same weights, to the bit."""
    run = cluster_run.copy / "runs" / "teacher-w0.25-h128"
    train_undisturbed(run / CONFIG_FILE, tmp_path)
    undisturbed = tmp_path / f"checkpoint_{TEACHER_ITERATIONS:07d}" / CHECKPOINT_FILE
    resumed = run / f"checkpoint_{TEACHER_ITERATIONS:07d}" / CHECKPOINT_FILE
    assert weights_difference(resumed, undisturbed) == 0.0
    # negative control: the comparison sees the steps since the checkpoint it resumed from
    assert weights_difference(resumed, tmp_path / f"checkpoint_{cluster_run.registered:07d}" / CHECKPOINT_FILE) > 1e-6


def test_workers_run_the_jobs_working_directory_not_the_installed_checkout(cluster_run: ClusterRun) -> None:
    """`ray job submit --working-dir .` ships the code: each node's workers import msad from the job's package in
    that node's own temp dir, not from the checkout this environment has installed (editable)."""
    assert cluster_run.code["first"] and cluster_run.code["replacement"], cluster_run.code
    for node, paths in cluster_run.code.items():
        for path in paths:
            assert "/runtime_resources/working_dir_files/" in path and not path.startswith(str(REPO)), (node, path)


def test_an_s3_outage_as_the_student_starts_costs_no_iteration_and_one_line(cluster_run: ClusterRun) -> None:
    """S3 was down for 25 s from the teacher's end: the student waited for it (its teacher file, Ray Train's
    storage), never restarted, and every file still reached S3 (the other tests here read them from there); the
    job's output says so in one warning line."""
    student = {row.name: row for row in read_trial_summaries(cluster_run.copy)}["student-w0.25-l64-kd0.2-t3"]
    assert load_checkpoint(student.checkpoint)["resumed_from"] == []
    warnings = [line for line in cluster_run.output.splitlines() if "warning:" in line and "W&B (" not in line]
    assert len(warnings) == 1 and "the object store failed" in warnings[0], warnings
    assert "Traceback" not in cluster_run.output


def test_report_lives_with_the_experiment_and_report_reads_it_from_s3(cluster_run: ClusterRun) -> None:
    table = (cluster_run.copy / "report.md").read_text()  # uploaded by the sweep itself
    assert table.count("| FCOS ") == 2 and "| ERROR |" not in table
    assert (cluster_run.copy / "report.csv").is_file() and (cluster_run.copy / "ap_vs_capacity.png").is_file()
    assert cluster_run.report_output.count("| FCOS ") == 2  # launch.py report s3://... from another machine
    assert f"report: {cluster_run.location} (local copy: " in cluster_run.report_output


def test_resumed_teachers_wandb_history_holds_every_iteration_once(cluster_run: ClusterRun) -> None:
    teacher = {row.name: row for row in read_trial_summaries(cluster_run.copy)}["teacher-w0.25-h128"]
    runs = (cluster_run.copy / "wandb").glob("offline-run-*")  # uploaded as each trial ended
    # its online start failed (W&B answered 503), so its offline stand-in has an id of its own
    (run_dir,) = [d for d in runs if d.name.endswith(f"{teacher.trial_id}-offline")]
    assert wandb_steps(run_dir) == list(range(1, TEACHER_ITERATIONS + 1))


def test_the_key_was_loaded_and_sent_to_wandb_and_wandb_down_is_one_line(cluster_run: ClusterRun) -> None:
    assert cluster_run.key_sent > 0  # online for real: the driver read the head's netrc and sent the key to W&B
    assert cluster_run.command_lines.looks > 10 and cluster_run.command_lines.found == set()
    named = [line for line in cluster_run.output.splitlines() if "W&B (http://127.0.0.1:" in line]
    assert len(named) == 1 and "training goes on, W&B runs are kept offline" in named[0], named


def test_canary_key_appears_in_no_file(cluster_run: ClusterRun) -> None:
    sessions = [s for root in cluster_run.searched for s in root.glob("session_*/logs")]
    assert len(sessions) >= 3 and any(p.name.startswith("runtime_env") for s in sessions for p in s.iterdir())
    roots = [cluster_run.copy, *cluster_run.searched]
    assert sum(1 for root in roots for p in root.rglob("*") if p.is_file()) > 50  # really searched
    assert [p for root in roots for p in files_holding(root, CANARY.encode())] == []
    assert CANARY not in cluster_run.output
