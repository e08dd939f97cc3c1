"""The Ray engine on a real Ray cluster (head + worker processes) started by tests/ray_netns.py
inside a loopback-only network namespace. A cluster start costs tens of seconds on 2 loaded
cores, so each test starts one cluster and batches its checks into one driver run."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest

from perm_assets import (
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    SpecError,
    StratifiedSplit,
    permutation_asset,
)
from perm_assets.engines.ray import _public_options
from perm_assets.factories import folds_asset
from perm_assets.specs import StratifiedKFold
from tests.ray_netns import FAST_NODE_DEATH, run_on_ray
from tests.servers import free_port

DRIVER = Path(__file__).with_name("ray_driver.py")


def test_ray_on_one_worker_builds_the_local_engines_table_for_every_kind(tmp_path: Path) -> None:
    # One worker node over the local disk: every code path of the engine. Two workers over S3:
    # tests/test_ray_engine_s3.py (another file, so that make test runs the two clusters on its
    # two cores at once); both equal the local engine's table, hence each other. Paths:
    # no_split_shuffled skips the ranking sort; random_counts ranks by a seed, leaves rows out
    # and reads unshuffled; kfold_shuffled ranks by a seed, filtered, reads shuffled (the path
    # of a shuffled random split, which the S3 test builds); kfold_unshuffled ranks by row id.
    # Not here, as they take no other path: RandomSplit(fixed=...) (its sizes are the local
    # engine's split_sizes) and RandomSplit(ratios=...) + Shuffle (the S3 test's case).
    every = ["no_split_shuffled", "random_counts", "kfold_shuffled", "kfold_unshuffled"]
    root = tmp_path / "one"
    root.mkdir()
    one = (
        run_on_ray(
            DRIVER,
            "build",
            str(root),
            ",".join(every),
            "then-kill-the-worker",
            workers=1,
            env=FAST_NODE_DEATH,
        )
        .check()
        .json()
    )
    tables = [*every, "kfold_shuffled__train", "kfold_unshuffled__train"]
    for name in tables:
        assert one["hashes"][f"ray/{name}"] == one["hashes"][f"local/{name}"], name
    for name in every:
        # The same rows: the same data version (downstream of a switch of engine stays fresh).
        assert one["versions"][f"ray/{name}"] == one["versions"][f"local/{name}"], name
        assert one["view_ok"][name], f"{name}: a view over the Ray-built table read other rows"
    # Written by the workers, a fragment per block piece, not streamed through the driver into
    # one write (which makes one fragment of these 30k rows: the local engine's tables). The
    # sort of a one-fragment base gives one block, so a permutation table is one piece and a
    # KFold training table two (the folds rotated: two ranges of that block).
    for name in tables:
        assert one["fragments"][f"local/{name}"] == 1, name
        assert one["fragments"][f"ray/{name}"] == (2 if name.endswith("__train") else 1), name
    # Different specs gave different tables (the hashes are not all of one empty table).
    assert len({one["hashes"][f"ray/{name}"] for name in tables}) == len(tables)
    # Then the only worker node is SIGKILLed and a build starts: Ray alone would wait for a
    # CPU forever; the engine fails it after NO_CPU_SECONDS (3 s in the driver), naming why,
    # and commits nothing.
    alone = one["no_worker"]
    assert alone["workers_killed"] == 1 and alone["processes"] >= 2, alone
    assert alone["cpus_left"] == 0, alone
    assert not alone["success"]
    assert "engine 'ray': the Ray cluster has had no CPU for" in alone["error"], alone["error"]
    assert "the previous one stays the latest" in alone["error"]
    assert alone["versions_unchanged"]
    assert alone["seconds"] < 60, alone


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
        "folds": folds_asset(
            "folds", source=base, folds=StratifiedKFold(k=3, label="label", seed=1)
        ),
    }
    for name, asset in cases.items():
        result = dg.materialize(
            [base, asset],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
            raise_on_error=False,
        )
        message = _error(result, name)
        assert "engine 'ray' does not build" in message, message
        assert ("StratifiedSplit" if name == "stratified" else "StratifiedKFold") in message
        assert "engine='local'" in message
        assert not db.table_exists(name)


def test_credentials_in_storage_options_stay_out_of_what_ray_ships_to_tasks() -> None:
    # lance-ray puts the storage options in every read task's arguments; workers take
    # credentials from their own environment instead.
    options = {
        "endpoint": "http://127.0.0.1:9000",
        "region": "us-east-1",
        "allow_http": "true",
        "aws_access_key_id": "AKIA-ID",
        "aws_secret_access_key": "s3cr3t",
        "aws_session_token": "t0ken",
    }
    assert _public_options(options) == {
        "endpoint": "http://127.0.0.1:9000",
        "region": "us-east-1",
        "allow_http": "true",
    }
    assert _public_options({"aws_secret_access_key": "s3cr3t"}) is None


def test_engine_ray_without_ray_installed_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules is how Python marks a module unimportable: `import ray`
    # raises ImportError exactly as in an environment without the extra.
    monkeypatch.setitem(sys.modules, "ray", None)
    db = LanceDBResource(uri=str(tmp_path / "db"), engine="ray")
    base = _base()
    perm = permutation_asset("perm", source=base, split=RandomSplit(ratios=[0.5, 0.5], seed=1))
    result = dg.materialize(
        [base, perm],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        raise_on_error=False,
    )
    message = _error(result, "perm")
    assert "pip install 'perm-assets[ray]'" in message
    assert not db.table_exists("perm")


def test_an_unknown_engine_is_refused_listing_ray_among_the_engines() -> None:
    with pytest.raises(SpecError, match=r"engine 'spark'.*'auto', 'lancedb', 'local' or 'ray'"):
        LanceDBResource(engine="spark")  # pyright: ignore[reportArgumentType]
