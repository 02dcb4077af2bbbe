"""Start a real two-node Ray cluster on this machine (two raylets), print its address, hold it until stdin closes.

Used by tests/test_cluster_runtime.py: `ray.cluster_utils.Cluster` stops only the processes it started, so the
test session's own local Ray is left alone (unlike `ray stop`, which stops every Ray on the machine).
"""

import sys

from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "dashboard_host": "127.0.0.1"})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
try:
    sys.stdin.read()  # until the test closes our stdin
finally:
    cluster.shutdown()
