"""The same tiny sweep on a one-node and on a two-node Ray cluster: wall time, and the node each trial ran on.

Both clusters are real raylets on this machine (`ray.cluster_utils.Cluster`, in a child process), driven through
`launch.py --address` as a user would drive a cluster. Trials ask for 2 CPUs per worker; the one-node cluster has
the head only (4 CPUs: two trials at a time), the two-node cluster adds a 2-CPU node. On one machine the second node
adds no cores, so the wall times show Ray's placement and overhead, not a speed-up.

    python benchmarks/multinode.py --out runs/multinode
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "dashboard_host": "127.0.0.1"})
    for _ in range(int(sys.argv[1]) - 1):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    try:
        sys.stdin.read()
    finally:
        cluster.shutdown()
""")


def sweep_file(out: Path, name: str, trials: int, iterations: int) -> Path:
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny_sweep_config.yaml").read_text())
    config["train"].update(iterations=iterations, lr_steps=[iterations - 1], eval_period=iterations)
    config["distributed"] = {"storage_path": str(out / "runs"), "num_workers": 1, "cpus_per_worker": 2,
                             "max_failures": 0}
    config["data"]["shapes"]["cache_dir"] = str(out / "cache")
    widths = [0.25, 0.5, 0.75, 1.0][:trials]
    spec = {"name": name, "base": str(REPO / "configs" / "cpu_base.yaml"), "config": config,
            "teachers": {"grid": {"model.width": widths}}, "max_concurrent_trials": trials}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(out: Path, nodes: int, trials: int, iterations: int) -> dict:
    name = f"nodes{nodes}"
    path = sweep_file(out, name, trials, iterations)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    holder = subprocess.Popen([sys.executable, "-c", CLUSTER, str(nodes)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = holder.stdout.readline().strip()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "--address", address, str(path)],
                              cwd=out, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    experiment = out / "runs" / name
    placement = {}
    for trial in sorted(p for p in experiment.iterdir() if (p / "result.json").is_file()):
        last = json.loads((trial / "result.json").read_text().splitlines()[-1])
        placement[trial.name] = last["node_id"][:8]
    return {"nodes": nodes, "wall_s": round(wall, 1), "trials": placement,
            "distinct_nodes_used": len(set(placement.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/multinode"))
    parser.add_argument("--trials", type=int, default=2, help="teacher trials (widths 0.25, 0.5, ...)")
    parser.add_argument("--iterations", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(args.out.resolve(), nodes, args.trials, args.iterations) for nodes in (1, 2)]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
