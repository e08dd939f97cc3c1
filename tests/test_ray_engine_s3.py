"""The Ray engine on two worker nodes over the S3-compatible server, inside the loopback-only
network namespace of tests/ray_netns.py (one worker over the local disk: test_ray_engine.py)."""

from __future__ import annotations

from pathlib import Path

from tests.ray_netns import run_on_ray

DRIVER = Path(__file__).with_name("ray_driver.py")


def test_ray_on_two_workers_over_s3_builds_the_local_engines_table_and_leaks_no_secret() -> None:
    # Two worker nodes over moto's S3 (inside the namespace), credentials only in the
    # environment: the harness's own checks, then a random split + shuffle by both engines.
    over_s3 = run_on_ray(DRIVER, "s3", "x", workers=2, s3=True).check().json()
    assert over_s3.pop("ray_log_files") > 0  # the leak check below looked at real logs
    assert len(over_s3.pop("hash")) > 0
    assert over_s3 == {
        "interfaces": ["lo"],  # nothing but loopback: Ray cannot reach or advertise eth0
        "alive_nodes": 3,
        "task_nodes": 2,  # the head has no CPUs: tasks run on the two workers
        "workers_have_credentials": True,
        "args": ["x"],
        "same_rows": True,  # Ray over S3 built the local engine's table
        "secret_in_metadata": False,
        "secret_in_ray_logs": [],
    }
