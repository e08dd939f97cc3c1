"""Driver scripts for tests/test_ray_engine.py, run on a namespaced Ray cluster by
`tests.ray_netns.run_on_ray`: ``python tests/ray_driver.py <command> [args]``; the last stdout
line is a JSON summary the test asserts on."""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any


def trivial() -> dict[str, Any]:
    """Where tasks run and what they see: the harness's own check."""
    from tests.ray_netns import connect

    ray = connect()

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def where() -> tuple[str, bool]:
        return ray.get_runtime_context().get_node_id(), "AWS_SECRET_ACCESS_KEY" in os.environ

    seen = ray.get([where.remote() for _ in range(6)])
    return {
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "alive_nodes": sum(bool(node["Alive"]) for node in ray.nodes()),
        "task_nodes": len({node for node, _ in seen}),
        "workers_have_credentials": all(has for _, has in seen),
        "args": sys.argv[2:],
    }


COMMANDS = {"trivial": trivial}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]]()), flush=True)  # noqa: T201 - the test reads it
