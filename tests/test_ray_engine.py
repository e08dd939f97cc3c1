"""The Ray engine on a real Ray cluster (head + worker processes) started by tests/ray_netns.py
inside a loopback-only network namespace. A cluster start costs tens of seconds on 2 loaded
cores, so each test starts one cluster and batches its checks into one driver run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _build(tmp_path: Path, name: str, cases: list[str], *, workers: int) -> dict[str, Any]:
    root = tmp_path / name
    root.mkdir()
    run = run_on_ray(DRIVER, "build", str(root), ",".join(cases), workers=workers).check()
    return run.json()


def test_ray_builds_the_local_engines_table_row_for_row_on_one_and_two_workers(
    tmp_path: Path,
) -> None:
    # One worker: the two kinds that matter most; two workers: every kind the engine builds.
    one = _build(tmp_path, "one", ["random_shuffled", "no_split_shuffled"], workers=1)
    every = ["no_split_shuffled", "random_shuffled", "random_counts", "random_fixed_unshuffled"]
    two = _build(tmp_path, "two", every, workers=2)
    for name in every:
        assert two["hashes"][f"ray/{name}"] == two["hashes"][f"local/{name}"], name
        # The same rows: the same data version (downstream of a switch of engine stays fresh).
        assert two["versions"][f"ray/{name}"] == two["versions"][f"local/{name}"], name
        assert two["view_ok"][name], f"{name}: a view over the Ray-built table read other rows"
    for name in ["random_shuffled", "no_split_shuffled"]:
        assert one["hashes"][f"ray/{name}"] == one["hashes"][f"local/{name}"], name
        assert one["hashes"][f"ray/{name}"] == two["hashes"][f"ray/{name}"], name
        assert one["view_ok"][name]
    # Different specs gave different tables (the hashes are not all of one empty table).
    assert len({two["hashes"][f"ray/{name}"] for name in every}) == len(every)
