"""Whether a run's workers can ever be placed on the cluster, and why they are not placed now.

Ray waits for resources without end: a placement group that no node can hold stays pending, and Ray Train retries
its worker group's start forever (each start times out after 60 s, then it tries again). Ray's own check before it
waits (`get_max_resources_from_cluster_config`) adds up resources over the whole cluster, and only when an
autoscaler is configured: it passes a worker of {"CPU": 2} on a 2-CPU head whose trial driver already holds
0.05 CPU. Here the check is per node, as Ray places bundles: on the nodes that are up (their total resources, not
what is free now) and on the node types the autoscaler may add, with whatever else the run keeps on the head (a
sweep's trial drivers) taken off the head first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from msad.config import DistributedConfig

HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node (1.0 there, absent elsewhere)
# the resources a placement group may ask for that msad sets; others (memory, custom) are not checked
CHECKED = ("CPU", "GPU")


def worker_resources(distributed: DistributedConfig) -> dict[str, float]:
    """What each Train worker of a run reserves: `cpus_per_worker` CPUs, and `gpus_per_worker` GPUs when
    `use_gpu`."""
    d = distributed
    return {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.use_gpu else {})}


@dataclass(frozen=True)
class NodeShape:
    """A node that is up, or a node type the autoscaler may start `count` times (None: as many as needed)."""

    name: str
    resources: dict[str, float]
    count: int | None = 1
    head: bool = False
    autoscaled: bool = False


def cluster_shapes() -> list[NodeShape]:
    """The nodes of the connected Ray cluster (alive, with their total resources), then the node types its
    autoscaler may add (from the cluster config Ray's autoscaler publishes; none without an autoscaler)."""
    import ray

    shapes = [NodeShape(f"{n['NodeManagerAddress']} ({n['NodeID'][:12]})", dict(n.get("Resources", {})),
                        head=HEAD_NODE_RESOURCE in n.get("Resources", {}))
              for n in ray.nodes() if n.get("Alive")]
    return shapes + still_to_add(shapes, autoscaled_shapes())


def still_to_add(up: list[NodeShape], types: list[NodeShape]) -> list[NodeShape]:
    """The autoscaler's node types less the nodes of each type already up (a type's maximum counts them too, as
    Ray's own check reads it): a node up is matched to the first type with the same CPUs and GPUs."""
    left = {i: t.count for i, t in enumerate(types)}
    for node in up:
        for i, t in enumerate(types):
            same = all(node.resources.get(r, 0.0) == t.resources.get(r, 0.0) for r in CHECKED)
            if same and left[i] != 0:
                left[i] = None if left[i] is None else left[i] - 1
                break
    return [dataclasses.replace(t, count=left[i]) for i, t in enumerate(types) if left[i] != 0]


def autoscaled_shapes() -> list[NodeShape]:
    """The node types of the autoscaler's cluster config, each with its maximum count; [] when there is none.

    Read with Ray's `GlobalState.get_cluster_config` (the call Ray Train makes for its own check), which is not a
    public API: any failure counts as "no autoscaler known", so the check then stays with the nodes that are up.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without it: nodes only
        return []
    groups = getattr(config, "node_group_configs", None) or [] if config is not None else []
    shapes = []
    for group in groups:
        count = int(getattr(group, "max_count", 0))
        if count == 0:
            continue
        shapes.append(NodeShape(f"node type {getattr(group, 'name', '?')}", dict(group.resources),
                                None if count < 0 else count, autoscaled=True))
    return shapes


def workers_per_node(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles of `bundle` fit in a node with `resources` (its total), one resource at a time."""
    fits = [math.floor(resources.get(name, 0.0) / need + 1e-9) for name, need in bundle.items() if need > 0]
    return min(fits) if fits else 0


def placeable_workers(shapes: list[NodeShape], bundle: dict[str, float], on_head: dict[str, float],
                      wanted: int) -> int:
    """How many workers of `bundle` the cluster can hold at most (capped at `wanted`), with `on_head` (what the run
    keeps on the head: a sweep's trial driver) taken off the head node first."""
    total = 0
    for shape in shapes:
        resources = dict(shape.resources)
        if shape.head:
            for name, amount in on_head.items():
                resources[name] = resources.get(name, 0.0) - amount
        per_node = workers_per_node(resources, bundle)
        total += per_node * (wanted if shape.count is None else shape.count)
        if total >= wanted:
            return wanted
    return total


def describe(resources: dict[str, float]) -> str:
    """{"CPU": 2.0, "GPU": 1.0} -> "2 CPU, 1 GPU" (checked resources only, in a fixed order)."""
    parts = [f"{resources[name]:g} {name}" for name in CHECKED if resources.get(name)]
    return ", ".join(parts) or "no CPU or GPU"


def largest_node(shapes: list[NodeShape]) -> NodeShape | None:
    """The node (or node type) with the most GPUs, then CPUs."""
    return max(shapes, key=lambda s: (s.resources.get("GPU", 0.0), s.resources.get("CPU", 0.0)), default=None)


def unplaceable(what: str, num_workers: int, bundle: dict[str, float], on_head: dict[str, float],
                shapes: list[NodeShape]) -> str | None:
    """The one line that says why `num_workers` workers of `bundle` can never be placed on `shapes`, or None when
    they can.

    Args:
        what: the run or trial, as the line names it.
        num_workers: distributed.num_workers.
        bundle: each worker's resources (`worker_resources`).
        on_head: what the run keeps on the head besides its workers.
        shapes: the cluster's nodes and node types (`cluster_shapes`).
    """
    if not shapes:
        return None
    placeable = placeable_workers(shapes, bundle, on_head, num_workers)
    if placeable >= num_workers:
        return None
    big = largest_node(shapes)
    assert big is not None
    head = next((s for s in shapes if s.head), None)
    kept = (f"; the head ({describe(head.resources)}) also holds {describe(on_head)} for the trial driver"
            if head is not None and any(on_head.get(n) for n in CHECKED) else "")
    scaled = "" if any(s.autoscaled for s in shapes) else " and no autoscaler adds nodes"
    return (f"{what}: its {num_workers} worker(s) of {describe(bundle)} each cannot be placed on this cluster "
            f"(room for {placeable}): its largest node has {describe(big.resources)}{kept}{scaled}; lower "
            "distributed.cpus_per_worker / gpus_per_worker / num_workers, or add a node that holds a worker")


def waiting_line(num_workers: int, bundle: dict[str, float], timeout_s: float) -> str:
    """Why a run's workers did not start in `timeout_s`: what they asked, and what the cluster had free then."""
    import ray

    try:
        free = ray.available_resources()
        shapes = cluster_shapes()
    except Exception:  # the cluster itself is going away: say what was asked
        free, shapes = {}, []
    autoscaled = any(s.autoscaled for s in shapes)
    nodes = [s for s in shapes if not s.autoscaled]
    return (f"its {num_workers} worker(s) of {describe(bundle)} each did not start within {timeout_s:g} s "
            f"(distributed.worker_start_timeout_s): the cluster's {len(nodes)} node(s) have "
            f"{describe(free) if free else 'nothing'} free"
            + ("; the autoscaler did not add a node that holds them in that time (`ray status` says why)"
               if autoscaled else "; other runs hold the rest (`ray status`)"))


# ---------------------------------------------------------------------------------------------------------------------
# What ended runs leave reserved on a cluster
# ---------------------------------------------------------------------------------------------------------------------

CLEANER_CLASS = "PlacementGroupCleaner"  # Ray Train's detached actor that frees a run's placement group
LIVE_JOB = ("PENDING", "RUNNING")
STATE_API_TIMEOUT_S = 10


@dataclass
class Leftovers:
    """Placement groups and Ray Train cleaner actors that runs whose jobs have ended left on the cluster."""

    placement_groups: list[str]  # ids
    cleaners: list[tuple[str, str, int]]  # (actor id, node id, pid)

    def __bool__(self) -> bool:
        return bool(self.placement_groups or self.cleaners)


def _ended_jobs() -> set[str]:
    """Ids of the cluster's jobs that have ended (a job id counts as live while any of its entries runs)."""
    from ray.util.state import list_jobs

    status: dict[str, bool] = {}
    for job in list_jobs(timeout=STATE_API_TIMEOUT_S, raise_on_missing_output=False):
        if job.job_id:
            status[job.job_id] = status.get(job.job_id, False) or str(job.status).split(".")[-1] in LIVE_JOB
    return {job for job, live in status.items() if not live}


def find_leftovers(own_job: str | None = None) -> Leftovers:
    """What ended jobs left: their placement groups still reserved (not detached), and the Ray Train placement-group
    cleaners still alive. Ray removes a job's placement groups when it ends, but a group that was still being
    placed then can come up afterwards with nothing in it (seen after `ray job stop`); and each cleaner, whose
    thread calls `ray.actor.exit_actor()` outside an actor task, outlives its run, holding 0.001 of the head's
    `node:__internal_head__` (the resource every trial driver asks for) until the cluster goes down.

    Args:
        own_job: this process's job id: its cleaners count too once none of its Train controllers is alive (a sweep
            at its end, Ctrl-C included).
    """
    from ray.util.state import list_actors, list_placement_groups

    ended = _ended_jobs()
    if own_job and not list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE"),
                                            ("job_id", "=", own_job)], timeout=STATE_API_TIMEOUT_S,
                                   raise_on_missing_output=False):
        ended_cleaners = ended | {own_job}
    else:
        ended_cleaners = ended
    groups = [g.placement_group_id for g in list_placement_groups(
        detail=True, timeout=STATE_API_TIMEOUT_S, raise_on_missing_output=False)
        if g.state in ("PENDING", "CREATED", "RESCHEDULING") and not g.is_detached and g.creator_job_id in ended]
    cleaners = [(a.actor_id, a.node_id, int(a.pid)) for a in list_actors(
        filters=[("class_name", "=", CLEANER_CLASS), ("state", "=", "ALIVE")], detail=True,
        timeout=STATE_API_TIMEOUT_S, raise_on_missing_output=False) if a.job_id in ended_cleaners and a.pid]
    return Leftovers(groups, cleaners)


def release_leftovers(own_job: str | None = None) -> str | None:
    """Remove the leftovers of ended jobs (`find_leftovers`) from the connected cluster; returns a one-line account
    for the console, or None when there were none. Never raises: a cluster whose State API does not answer keeps
    its leftovers, and the line says so.

    Args:
        own_job: see `find_leftovers`.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        found = find_leftovers(own_job)
    except Exception as err:  # the State API (the dashboard) is not up, or refuses us
        return f"could not look for what stopped runs left reserved on the cluster ({type(err).__name__}: {err})"
    if not found:
        return None
    try:
        for group in found.placement_groups:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
        ended = _end_cleaners(found.cleaners)
    except Exception as err:  # a node went away meanwhile, or the cluster is shutting down
        return f"could not release what stopped runs left reserved on the cluster ({type(err).__name__}: {err})"
    return (f"released what stopped runs left on the cluster: {len(found.placement_groups)} placement group(s), "
            f"{ended} Ray Train cleaner actor(s)")


def _end_cleaners(cleaners: list[tuple[str, str, int]]) -> int:
    """End leftover cleaner actors; returns how many were ended."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not cleaners:
        return 0

    @ray.remote(num_cpus=0, max_retries=0)
    def end_cleaner(pid: int) -> bool:
        """SIGKILL the cleaner's process (an unnamed detached actor has no public handle to `ray.kill` it)."""
        import os
        import signal

        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if CLEANER_CLASS.encode() not in f.read():
                    return False  # another process took the pid
            os.kill(pid, signal.SIGKILL)
            return True
        except OSError:
            return False

    return sum(ray.get([end_cleaner.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(pid) for _, node, pid in cleaners], timeout=60))
