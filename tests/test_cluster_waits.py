"""Nothing waits forever on a cluster: a trial no node can hold is refused in one line, workers that cannot start fail
their run in one line, a stopped sweep leaves nothing reserved, and a second Ray on the machine does not keep a
stopped trial's CPUs.

The cluster tests run what cluster/README.md says, exactly: a `ray start` head (its own temp dir, token
authentication on) and `ray job submit --working-dir . -- python launch.py SWEEP --address auto`; what the cluster
keeps is read back with Ray's own `ray list` CLI, not with msad's code.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port, make_tiny_config, tiny_sweep
from ray_nodes import BIN, RayNode, ray_list, wait_for_dashboard

from msad.engine.placement import NodeShape, placeable_workers, still_to_add, unplaceable
from msad.errors import RunFailedError
from msad.sweep.trials import read_trial_summaries

REPO = Path(__file__).resolve().parents[1]
DRIVER = {"CPU": 0.05}  # a sweep's trial driver on the head (sweep default trial_resources)


def _head(cpus: float, gpus: float = 0) -> NodeShape:
    return NodeShape("head", {"CPU": cpus, "GPU": gpus, "node:__internal_head__": 1.0}, head=True)


def _node(cpus: float, gpus: float = 0, count: int | None = 1, autoscaled: bool = False) -> NodeShape:
    return NodeShape("worker", {"CPU": cpus, "GPU": gpus}, count, autoscaled=autoscaled)


# (nodes, workers, each worker's bundle, placeable): counted by hand, bundle by bundle as Ray places them
PLACEMENTS = [
    ([_head(2)], 1, {"CPU": 2}, 0),  # the issue's `ray up` head: 2 CPUs, 0.05 held by the trial driver
    ([_head(3)], 1, {"CPU": 2}, 1),
    ([_head(1), _node(2)], 1, {"CPU": 2}, 1),  # the node-loss test's cluster: training off the head
    ([_head(8), _node(16), _node(16)], 2, {"CPU": 16}, 2),
    ([_head(8), _node(16), _node(16)], 3, {"CPU": 16}, 2),  # 48 CPUs in all, but no node holds a third worker
    ([_head(4), _node(40, 8)], 8, {"CPU": 6, "GPU": 1}, 6),  # an 8-GPU server with 40 CPUs: CPUs run out first
    ([_head(4), _node(8, 1, count=None, autoscaled=True)], 8, {"CPU": 6, "GPU": 1}, 8),  # any number of nodes
    ([_head(4), _node(8, 1, count=3, autoscaled=True)], 8, {"CPU": 6, "GPU": 1}, 3),
    ([_head(64)], 2, {"CPU": 1, "GPU": 1}, 0),  # GPUs asked, none anywhere
]


@pytest.mark.parametrize(("shapes", "workers", "bundle", "expected"), PLACEMENTS)
def test_placeable_workers_are_counted_per_node(shapes: list[NodeShape], workers: int, bundle: dict[str, float],
                                                expected: int) -> None:
    assert placeable_workers(shapes, bundle, DRIVER, workers) == expected
    line = unplaceable("trial t", workers, bundle, DRIVER, shapes)
    assert (line is None) == (expected >= workers)


def test_nodes_up_are_not_counted_twice_with_the_autoscalers_types() -> None:
    """A type's maximum counts its nodes that are up (as Ray's own check reads it): the `ray up` head of 2 CPUs,
    whose type allows 1 node, adds nothing, so the worker of 2 CPUs is still refused."""
    head_type = NodeShape("node type head", {"CPU": 2.0, "GPU": 0.0}, 1, autoscaled=True)
    workers = _node(8, 1, count=3, autoscaled=True)
    shapes = [_head(2), _node(8, 1), *still_to_add([_head(2), _node(8, 1)], [head_type, workers])]
    assert [(s.name, s.count) for s in shapes if s.autoscaled] == [("worker", 2)]
    assert placeable_workers(shapes, {"CPU": 2}, DRIVER, 1) == 1  # on a GPU worker node
    assert unplaceable("t", 1, {"CPU": 2, "GPU": 0}, DRIVER, [_head(2), *still_to_add([_head(2)], [head_type])])
    assert still_to_add([], [dataclasses.replace(workers, count=None)])[0].count is None  # unlimited stays so
    # negative control: the types added on top of the nodes up would count the head twice and let it through
    assert unplaceable("t", 1, {"CPU": 2, "GPU": 0}, DRIVER, [_head(2), head_type]) is None


def test_the_unplaceable_line_names_the_trial_its_ask_and_the_largest_node() -> None:
    line = unplaceable("sweeps/s.yaml: trial teacher-w1-h800", 1, {"CPU": 2}, DRIVER, [_head(2)])
    assert line == ("sweeps/s.yaml: trial teacher-w1-h800: its 1 worker(s) of 2 CPU each cannot be placed on this "
                    "cluster (room for 0): its largest node has 2 CPU; the head (2 CPU) also holds 0.05 CPU for the "
                    "trial driver and no autoscaler adds nodes; lower distributed.cpus_per_worker / gpus_per_worker "
                    "/ num_workers, or add a node that holds a worker")
    assert "\n" not in line
    # Ray's own check adds up the cluster (2 CPUs >= 2): it would have let this trial wait forever
    assert sum(s.resources["CPU"] for s in [_head(2)]) >= 2


def test_workers_that_cannot_start_fail_the_run_in_one_line(ray_session: None, tmp_path: Path,
                                                            shapes_cache: Path) -> None:
    """The CPUs exist (the placement check passes) but another run holds them: the run fails after
    `distributed.worker_start_timeout_s`, with one line saying what it asked and what was free."""
    import ray

    from msad.engine.trainer import fit

    @ray.remote(num_cpus=3.5)
    class Holder:  # another run, holding the CPUs
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    cfg = make_tiny_config(tmp_path, shapes_cache, "teacher", "starved", "distributed.worker_start_timeout_s=6")
    started = time.monotonic()
    try:
        with pytest.raises(RunFailedError) as failed:
            fit(cfg)
    finally:
        ray.kill(holder)
    waited = time.monotonic() - started
    message = str(failed.value)
    assert "\n" not in message
    assert "its 2 worker(s) of 1 CPU each did not start within 6 s (distributed.worker_start_timeout_s)" in message
    assert "the cluster's 1 node(s) have 0.5 CPU free" in message
    assert 6 <= waited < 6 + 60, f"{waited:.1f} s"


def _submit(sweep: Path, dashboard: int, env: dict[str, str], job: str, *extra: str,
            wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`ray job submit` exactly as cluster/README.md writes it, from the checkout."""
    args = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
            "--submission-id", job, "--", "python", "launch.py", str(sweep), "--address", "auto", *extra]
    if wait:
        return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_node_smaller_than_a_trial_and_a_stopped_sweep(tmp_path: Path, shapes_cache: Path) -> None:
    """On a `ray start` head of 2 CPUs: a trial whose worker wants 2 CPUs (the driver holds 0.05 there) is refused in
    one line and the job ends; a sweep that fits, stopped with `ray job stop` while its teacher trains, leaves what
    Ray leaves; the next sweep releases it and runs to its end, and leaves nothing reserved either."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    gcs, dashboard = free_port(), free_port()
    head = RayNode(tmp_path, "head", env, ["--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                                           f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}"])
    try:
        wait_for_dashboard(dashboard, head)
        # 1. no node can hold the trial: one line, the job fails, nothing waits
        big = tiny_sweep(tmp_path, shapes_cache, "too_big", {"teachers": {"grid": {"model.width": [0.25]}}},
                         config={"distributed": {"cpus_per_worker": 2}})
        started = time.monotonic()
        refused = _submit(big, dashboard, env, "msad-too-big")
        assert refused.returncode != 0, refused.stdout[-3000:]
        named = [line for line in refused.stdout.splitlines() if "cannot be placed" in line]
        assert len(set(named)) == 1, refused.stdout[-3000:]  # `ray job submit` repeats the job's log when it fails
        assert "trial teacher-w0.25-h128: its 1 worker(s) of 2 CPU each" in named[0]
        assert "its largest node has 2 CPU; the head (2 CPU) also holds 0.05 CPU for the trial driver" in named[0]
        assert time.monotonic() - started < 150
        assert not [g for g in ray_list("placement-groups", dashboard, env) if g["state"] != "REMOVED"]

        # 2. a sweep that fits, stopped while its teacher trains
        body = {"teachers": {"grid": {"model.width": [0.25]}}}  # one trial: what a stop leaves is per trial
        fits = tiny_sweep(tmp_path, shapes_cache, "stopped", body, iterations=12,
                          config={"distributed": {"cpus_per_worker": 1}, "train": {"eval_period": 12}})
        job = _submit(fits, dashboard, env, "msad-stopped", wait=False)
        checkpoint = tmp_path / "runs" / "stopped" / "runs" / "teacher-w0.25-h128" / "checkpoint_0000002"
        deadline = time.monotonic() + 300
        while not checkpoint.is_dir():
            assert job.poll() is None and time.monotonic() < deadline, "the teacher did not start training"
            time.sleep(1)
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", f"http://127.0.0.1:{dashboard}",
                        "msad-stopped"], env=env, capture_output=True, timeout=120, check=True)
        job.wait(timeout=120)
        time.sleep(5)  # Ray's own clean-up of the ended job
        kept_groups = [g for g in ray_list("placement-groups", dashboard, env) if g["state"] != "REMOVED"]
        kept_cleaners = ray_list("actors", dashboard, env, "class_name=PlacementGroupCleaner", "state=ALIVE")
        print(f"after ray job stop: {len(kept_groups)} placement group(s), {len(kept_cleaners)} cleaner(s) kept")
        # what Ray 2.60 leaves behind varies from stop to stop (a cleaner that outlives its run, a placement group
        # placed after its job ended): plant one such cleaner for certain, from a job that then ends
        subprocess.run([sys.executable, "-c", PLANTED_CLEANER, f"127.0.0.1:{gcs}"], env=env, check=True,
                       timeout=120, capture_output=True)
        planted = ray_list("actors", dashboard, env, "class_name=PlacementGroupCleaner", "state=ALIVE")
        assert len(planted) == len(kept_cleaners) + 1

        # 3. the next sweep (the same one, resumed) releases it, runs to its end and leaves nothing either
        resumed = _submit(fits, dashboard, env, "msad-resumed", "--resume")
        assert resumed.returncode == 0, resumed.stdout[-3000:]
        released = [line for line in resumed.stdout.splitlines() if "released what stopped runs left" in line]
        assert len(released) == 1, resumed.stdout[-3000:]
        assert f"{len(kept_groups)} placement group(s), {len(planted)} Ray Train cleaner actor(s)" in released[0]
        rows = read_trial_summaries(tmp_path / "runs" / "stopped")
        assert {r.name: r.status for r in rows} == {"teacher-w0.25-h128": "TERMINATED"}
        time.sleep(5)
        assert not [g for g in ray_list("placement-groups", dashboard, env) if g["state"] != "REMOVED"]
        assert not ray_list("actors", dashboard, env, "class_name=PlacementGroupCleaner", "state=ALIVE")
    finally:
        head.kill()


PLANTED_CLEANER = textwrap.dedent("""
    import sys

    import ray

    ray.init(address=sys.argv[1], log_to_driver=False)  # this cluster's GCS: other Rays may run on the machine

    @ray.remote(num_cpus=0)
    class PlacementGroupCleaner:  # as Ray Train starts one: detached, on the head, outliving the job
        def ready(self):
            return True

    cleaner = PlacementGroupCleaner.options(lifetime="detached", resources={"node:__internal_head__": 0.001}).remote()
    ray.get(cleaner.ready.remote())
""")


TWO_RAYS = textwrap.dedent("""
    import os, sys, time
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.state import list_placement_groups
    from msad.engine.cluster import start_local_ray

    if sys.argv[1] == "msad":
        start_local_ray(num_cpus=3, log_to_driver=False)
        address = None
    else:  # the negative control: a plain private Ray, as ray.init starts one
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        address = "http://" + ray.init(address="local", num_cpus=3, include_dashboard=True,
                                        dashboard_host="127.0.0.1", log_to_driver=False).dashboard_url
    marker = sys.argv[2]

    @ray.remote(num_cpus=0.1)
    class TrialDriver:
        def run(self, marker, storage):
            def loop(_):
                open(marker, "w").close()
                time.sleep(600)
            TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                         run_config=ray.train.RunConfig(name="t", storage_path=storage)).fit()

    def reserved():
        return [g for g in list_placement_groups(address=address) if g.state == "CREATED"]

    driver = TrialDriver.remote()
    driver.run.remote(marker, sys.argv[3])
    deadline = time.monotonic() + 180
    while not os.path.exists(marker):  # the workers train: Ray Train has registered their placement group
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert len(reserved()) == 1
    time.sleep(2)
    ray.kill(driver)  # as ASHA stops a trial
    stopped = time.monotonic()
    while reserved() and time.monotonic() - stopped < float(sys.argv[4]):
        time.sleep(0.5)
    print("RESERVED", len(reserved()), f"{time.monotonic() - stopped:.1f}")
""")


def test_a_second_ray_on_the_machine_does_not_keep_a_stopped_trials_cpus(tmp_path: Path) -> None:
    """Another Ray runs on this machine (a `ray start` head): a private Ray that msad starts still frees the CPUs
    of a trial stopped as ASHA stops one (its actor killed) within seconds; a plain `ray.init` Ray does not (Ray
    Train's cleaner: "Found multiple active Ray instances"), which is how the sweep used to wait forever."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    other = RayNode(tmp_path, "other", env,
                    ["--head", f"--port={free_port()}", "--num-cpus=1", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}"])
    try:
        time.sleep(5)
        assert other.proc.poll() is None
        env.update(PYTHONPATH=str(REPO))
        found = {}
        procs = {mode: subprocess.Popen([sys.executable, "-c", TWO_RAYS, mode, str(tmp_path / f"{mode}.started"),
                                         str(tmp_path / mode), str(patience)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for mode, patience in (("msad", 30), ("plain", 10))}  # side by side: three Rays on the machine
        for mode, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            lines = [line.split() for line in out.splitlines() if line.startswith("RESERVED")]
            assert lines, err[-3000:]
            found[mode] = (int(lines[0][1]), float(lines[0][2]))
        assert found["msad"][0] == 0 and found["msad"][1] < 10, found  # freed in seconds
        assert found["plain"][0] == 1, found  # negative control: still reserved after 10 s
    finally:
        other.kill()
