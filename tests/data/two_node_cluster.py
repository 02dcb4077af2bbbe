"""Start a real Ray cluster on this machine (a head raylet plus worker raylets), print its address, then obey
commands on stdin until it closes.

Used by the cluster tests: `ray.cluster_utils.Cluster` stops only the processes it started, so the test session's
own local Ray is left alone (unlike `ray stop`, which stops every Ray on the machine).

    python tests/data/two_node_cluster.py [--head-cpus 3] [--head-gpus 0] [--worker-nodes 1]

Commands, one per line (each answered with one line once done):
    kill-workers    SIGKILL every worker node's raylet and processes, as when a machine disappears
    add-worker      start one more worker node (2 CPUs), as an autoscaler's replacement

`--head-gpus` declares GPUs the head does not have (Ray schedules by declared resources): a GPU run then lands on a
node without a usable NVIDIA driver, which is what the GPU preflight must catch.
"""

import argparse
import sys

from ray.cluster_utils import Cluster

parser = argparse.ArgumentParser()
parser.add_argument("--head-cpus", type=int, default=3)
parser.add_argument("--head-gpus", type=int, default=0)
parser.add_argument("--worker-nodes", type=int, default=1)
args = parser.parse_args()
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus, "num_gpus": args.head_gpus,
                                                        "dashboard_host": "127.0.0.1"})
workers = [cluster.add_node(num_cpus=2) for _ in range(args.worker_nodes)]
cluster.wait_for_nodes()
print(cluster.address, flush=True)
try:
    for line in sys.stdin:  # until the test closes our stdin
        command = line.strip()
        if command == "kill-workers":
            for node in workers:
                cluster.remove_node(node, allow_graceful=False)
            workers = []
            print("killed", flush=True)
        elif command == "add-worker":
            workers.append(cluster.add_node(num_cpus=2))
            cluster.wait_for_nodes()
            print("added", flush=True)
        elif command:
            print(f"unknown command {command!r}", flush=True)
finally:
    cluster.shutdown()
