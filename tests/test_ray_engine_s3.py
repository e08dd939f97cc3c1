"""The Ray engine on two worker nodes over the S3-compatible server, inside the loopback-only
network namespace of tests/ray_netns.py (one worker over the local disk: test_ray_engine.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.ray_netns import FAST_NODE_DEATH, run_on_ray

DRIVER = Path(__file__).with_name("ray_driver.py")


def test_ray_on_two_workers_over_s3_builds_the_local_engines_table_and_leaks_no_secret() -> None:
    # Two worker nodes over moto's S3 (inside the namespace), credentials only in the
    # environment: the harness's own checks, then a random split + shuffle by both engines.
    over_s3 = run_on_ray(DRIVER, "s3", "x", workers=2, s3=True, env=FAST_NODE_DEATH).check().json()
    killed = over_s3.pop("killed")
    assert over_s3.pop("ray_log_files") > 0  # the leak check below looked at real logs
    built = over_s3.pop("hash")
    assert len(built) > 0
    assert over_s3 == {
        "interfaces": ["lo"],  # nothing but loopback: Ray cannot reach or advertise eth0
        "alive_nodes": 3,
        "task_nodes": 2,  # the head has no CPUs: tasks run on the two workers
        "workers_have_credentials": True,
        "args": ["x"],
        "same_rows": True,  # Ray over S3 built the local engine's table
        "secret_in_metadata": False,
        "secret_in_ray_logs": [],
        # The build's blocks were released when its block ended (the kept run result holds
        # the data's streams): the killed build below once hung while Ray rebuilt them.
        "objects_held_after_build": 0,
    }
    _assert_a_killed_worker_lost_nothing(killed, previous_hash=built)


def _assert_a_killed_worker_lost_nothing(killed: dict[str, Any], *, previous_hash: str) -> None:
    """The issue's fault test, run last by the driver: "perm" at version V (Ray-built above),
    re-materialized with another seed while a worker node is SIGKILLed (raylet and workers),
    then once more. Either outcome Ray can honestly give is checked strictly."""
    previous, run, after = killed["previous"], killed["killed_run"], killed["next_run"]
    assert previous["hash"] == previous_hash  # V is the table the first Ray build wrote
    assert killed["expected_hash"] != previous_hash  # the new seed gives other rows
    # Mid-build: the node was alive when the build started and when a task of the build was
    # running on it (a CPU in use), and all its processes were dead before the build ended.
    assert killed["alive_at_start"] and killed["alive_when_killed"], killed
    assert killed["processes"] >= 2, killed  # the raylet and at least one worker
    assert killed["dead_before_end"], killed
    assert killed["reported_dead"]  # Ray itself saw the node die
    if run["success"]:
        # (a) Finished on the surviving worker: the local engine's rows for the new spec, in
        # exactly one new version.
        assert run["hash"] == killed["expected_hash"]
        assert run["versions"] == [*previous["versions"], previous["latest"] + 1]
        assert run["latest"] == previous["latest"] + 1
    else:
        # (b) Failed, saying so: V is still the latest version and reads V's rows.
        assert "engine 'ray': the build failed on the Ray cluster" in run["error"], run
        assert "the previous one stays the latest" in run["error"], run
        assert run["versions"] == previous["versions"] and run["latest"] == previous["latest"]
        assert run["hash"] == previous_hash
    # No version but the successful runs' ones, ever; the next run succeeds with the new rows.
    assert after["success"]
    assert after["versions"] == [*run["versions"], run["latest"] + 1]
    assert after["hash"] == killed["expected_hash"]
