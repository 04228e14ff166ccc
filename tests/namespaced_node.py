"""Start one Ray worker node in this process's (mount) namespace and keep it until SIGTERM.

Run as `python namespaced_node.py GCS_ADDRESS RESOURCE` inside `unshare --mount`: the node then has
its own view of the filesystem (a node with its own disk), on 127.0.0.1 like the test cluster.
`ray start` cannot do this here: it rewrites a 127.0.0.1 head address to the machine's network address.
"""

import signal
import sys
import time

from ray._private.node import Node
from ray._private.parameter import RayParams


def main() -> None:
    gcs_address, resource = sys.argv[1], sys.argv[2]
    params = RayParams(gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0,
                       resources={resource: 1}, object_store_memory=150 * 2**20, min_worker_port=0,
                       max_worker_port=0, include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit runs the node's shutdown hook
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
