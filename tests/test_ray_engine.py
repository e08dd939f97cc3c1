"""The Ray engine on a real Ray cluster (head + worker processes) started by tests/ray_netns.py
inside a loopback-only network namespace. A cluster start costs tens of seconds on 2 loaded
cores, so each test starts one cluster and batches its checks into one driver run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

from perm_assets import (
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    StratifiedSplit,
    permutation_asset,
)
from perm_assets.factories import folds_asset
from perm_assets.specs import KFold
from tests.ray_netns import run_on_ray
from tests.servers import free_port

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


def _error(result: dg.ExecuteInProcessResult, node: str) -> str:
    """The failed step's error with its causes, class names included."""
    failure = result.failure_data_for_node(node)
    assert failure is not None and failure.error is not None
    error, parts = failure.error, []
    while error is not None:
        parts.append(error.to_string())
        error = error.cause
    return "\n".join(parts)


def _base() -> dg.AssetsDefinition:
    @dg.asset(name="base")
    def base() -> pa.Table:
        return pa.table({"id": np.arange(1000, dtype=np.int64), "label": np.arange(1000) % 3})

    return base


def test_an_unreachable_ray_address_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: no Ray is started by this test
    address = f"127.0.0.1:{port}"
    db = LanceDBResource(uri=str(tmp_path / "db"), engine="ray", ray_address=address)
    base = _base()
    perm = permutation_asset("perm", source=base, split=RandomSplit(ratios=[0.5, 0.5], seed=1))
    result = dg.materialize(
        [base, perm],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        raise_on_error=False,
    )
    assert not result.success
    message = _error(result, "perm")
    assert "SpecError" in message and f"ray_address '{address}'" in message
    assert "nothing was written" in message
    assert not db.table_exists("perm")


def test_kinds_the_ray_engine_does_not_build_fail_with_the_local_engines_kind_of_error(
    tmp_path: Path,
) -> None:
    # Refused before any connection: the address below is never dialled.
    db = LanceDBResource(uri=str(tmp_path / "db"), engine="ray", ray_address="127.0.0.1:9")
    base = _base()
    cases = {
        "stratified": permutation_asset(
            "stratified", source=base, split=StratifiedSplit(ratios=[0.5, 0.5], label="label")
        ),
        "folds": folds_asset("folds", source=base, folds=KFold(k=3)),
    }
    for name, asset in cases.items():
        result = dg.materialize(
            [base, asset],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
            raise_on_error=False,
        )
        message = _error(result, name)
        assert "engine 'ray' does not build" in message, message
        assert ("StratifiedSplit" if name == "stratified" else "KFold") in message
        assert "engine='local'" in message
        assert not db.table_exists(name)
