"""Start a real Ray cluster on this machine (a head raylet plus worker raylets), print its address, hold it until
stdin closes.

Used by the cluster tests: `ray.cluster_utils.Cluster` stops only the processes it started, so the test session's
own local Ray is left alone (unlike `ray stop`, which stops every Ray on the machine).

    python tests/data/two_node_cluster.py [--head-cpus 3] [--head-gpus 0] [--worker-nodes 1]

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
for _ in range(args.worker_nodes):
    cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
try:
    sys.stdin.read()  # until the test closes our stdin
finally:
    cluster.shutdown()
