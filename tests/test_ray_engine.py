"""The Ray engine on a real Ray cluster (head + worker processes) started by tests/ray_netns.py
inside a loopback-only network namespace. A cluster start costs tens of seconds on 2 loaded
cores, so each test starts one cluster and batches its checks into one driver run."""

from __future__ import annotations

from pathlib import Path

from tests.ray_netns import run_on_ray

DRIVER = Path(__file__).with_name("ray_driver.py")


def test_harness_runs_a_script_on_a_namespaced_cluster_with_s3() -> None:
    run = run_on_ray(DRIVER, "trivial", "x", workers=2, s3=True).check()
    assert run.json() == {
        "interfaces": ["lo"],  # nothing but loopback: Ray cannot reach or advertise eth0
        "alive_nodes": 3,
        "task_nodes": 2,  # the head has no CPUs: tasks run on the two workers
        "workers_have_credentials": True,
        "args": ["x"],
    }
