"""Ray plumbing that a training run and a sweep share: joining or starting Ray, the shared-storage check, and the
check that a run's workers fit some node.

Apart from `msad.engine.trainer` because the sweep's driver (`msad.sweep.runner`) and its callbacks use it without
fitting a run here.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msad import console, storage
from msad.config import DistributedConfig
from msad.engine.placement import cluster_shapes, unplaceable, worker_resources
from msad.errors import UserError

ADDRESS_FORMS = "'auto', 'ray://HOST:PORT' (Ray client) or HOST:PORT (the cluster's GCS, e.g. 10.0.0.1:6379)"
CONNECT_TIMEOUT_S = 5.0


def check_address(address: str) -> None:
    """Refuse a malformed or unreachable `--address` in one line, in seconds (before Ray's own long retries)."""
    if address == "auto":  # Ray finds the cluster on this machine (or RAY_ADDRESS); it says at once if there is none
        return
    match = re.fullmatch(r"(ray://)?(\[[0-9A-Fa-f:]+\]|[^:/\s\[\]]+):(\d{1,5})", address)
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise UserError(f"--address {address}: invalid address; expected {ADDRESS_FORMS}")
    host, port = match.group(2).strip("[]"), int(match.group(3))
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror:
        raise UserError(f"--address {address}: unknown host {host!r}") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"--address {address}: no Ray cluster answers at {host}:{port} ({reason}); start it "
                        "(`ray start --head` / `ray up`) or check the address") from None


def init_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a private local Ray (bound to localhost) when none is given.

    No address means a new Ray of our own even when another one runs on this machine (a cluster head started with
    `ray start --head`, or a second msad run): plain `ray.init()` would join that one, and refuse our resources.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--address {address}: cannot join a Ray cluster ({first})") from None
        return
    # One logical CPU more than the cores: Tune's and Train's driver actors hold a sliver each but sit idle.
    start_local_ray(num_cpus=(os.cpu_count() or 1) + 1)


API_SERVER_ENV_VAR = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients go (else: the one Ray on this machine)


def start_local_ray(num_cpus: int, **init_args: Any) -> None:
    """Start a private local Ray whose own processes find its dashboard even when other Rays run on this machine.

    Ray Train's placement-group cleaner (a detached actor that frees a run's CPUs when its controller dies, e.g. a
    trial ASHA stops) asks Ray's State API, which without an address looks for "the" Ray of this machine and fails
    with "Found multiple active Ray instances" when there are two: the stopped trial's CPUs stayed reserved, and
    the sweep waited forever. The dashboard (the State API's server) gets a port chosen here, on localhost only, and
    `RAY_API_SERVER_ADDRESS` names it to every process of this Ray (they inherit this process's environment).

    Args:
        num_cpus: logical CPUs of the local Ray.
        init_args: more `ray.init` arguments (tests: log_to_driver, configure_logging).
    """
    import ray

    with socket.socket() as probe:  # a port free now; Ray binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ[API_SERVER_ENV_VAR] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, **init_args)


STORAGE_CHECK_TIMEOUT_S = 60.0


@dataclass
class StorageProbe:
    """Nodes (id -> "address (id)") that did not see the driver's marker file, and those that gave no answer in
    time or left while answering."""

    blind: dict[str, str]
    silent: dict[str, str]


def probe_shared_storage(location: str, node_ids: list[str] | None = None,
                         timeout: float = STORAGE_CHECK_TIMEOUT_S) -> StorageProbe:
    """Ask nodes whether they see a marker file the driver writes under `location` (a path; URIs are shared).

    Args:
        location: distributed.storage_path (a local or NFS path).
        node_ids: the nodes to ask (default: every alive node).
        timeout: how long to wait for answers; a node that is still joining, or is leaving, may not answer.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    targets = {node: alive[node] for node in (node_ids if node_ids is not None else alive) if node in alive}
    if storage.is_uri(location) or not targets:
        return StorageProbe({}, {})
    root = Path(storage.resolve(location))
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".msad-shared-check-{os.getpid()}-{time.monotonic_ns()}"
    marker.write_text("msad")

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str) -> bool:
        return Path(path).is_file()

    try:
        refs = {sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker)):
                node for node in targets}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        label = {node: f"{address} ({node[:12]})" for node, address in targets.items()}
        blind, silent = {}, {refs[r]: label[refs[r]] for r in pending}
        for ref in ready:
            node = refs[ref]
            try:
                if not ray.get(ref):
                    blind[node] = label[node]
            except ray.exceptions.RayError:  # the node went away while answering
                silent[node] = label[node]
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        marker.unlink(missing_ok=True)
    return StorageProbe(blind, silent)


def check_shared_storage(location: str, what: str = "distributed.storage_path") -> list[str]:
    """On a multi-node cluster, refuse a storage path that some node cannot see (before any trial starts).

    Object-store URIs are shared by construction. For a path, the driver writes a marker file and a task pinned to
    every alive node looks for it: an NFS mount passes, a head-local folder fails, naming the first blind node.
    A node that does not answer in time (joining, or leaving in an autoscaling event) is reported, not fatal: it
    runs no trial yet, and `SharedStorageWatch` checks nodes again as they join. Returns the node ids checked.
    """
    import ray

    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if storage.is_uri(location) or len(alive) < 2:
        return alive
    probe = probe_shared_storage(location, alive)
    if probe.blind:
        root, first = storage.resolve(location), next(iter(probe.blind.values()))
        raise UserError(f"{what}: {root} is not shared by every node (node {first} cannot see it); use a path "
                        "mounted alike on every node (NFS) or s3://bucket/prefix")
    if probe.silent:
        console.current().warn(f"{what}: node(s) {', '.join(probe.silent.values())} did not answer the "
                               f"shared-storage check in {STORAGE_CHECK_TIMEOUT_S:.0f} s (joining or leaving?); they "
                               "are checked again when they are up")
    return alive


def check_workers_placeable(what: str, distributed: DistributedConfig, on_head: dict[str, float] | None = None) -> None:
    """Refuse, in one line, workers that no node of the connected cluster (or of its autoscaler's node types) can
    ever hold: Ray would wait for them forever (`msad.engine.placement`).

    Args:
        what: the run or trial, as the line names it.
        distributed: the run's distributed section.
        on_head: what else the run keeps on the head (a sweep's trial driver).
    """
    line = unplaceable(what, distributed.num_workers, worker_resources(distributed), on_head or {}, cluster_shapes())
    if line:
        raise UserError(line)
