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
    GroupSplit,
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    SpecError,
    StratifiedKFold,
    StratifiedSplit,
    TimeSeriesFolds,
    TimeSplit,
    folds_asset,
    permutation_asset,
)
from perm_assets.engines.ray import _public_options
from tests.ray_netns import FAST_NODE_DEATH, run_on_ray
from tests.servers import free_port

DRIVER = Path(__file__).with_name("ray_driver.py")


def test_ray_on_one_worker_builds_the_local_engines_table_for_every_kind(tmp_path: Path) -> None:
    # One worker node over the local disk: every code path of the engine. Two workers over S3:
    # tests/test_ray_engine_s3.py (another file, so that make test runs the two clusters on its
    # two cores at once); both equal the local engine's table, hence each other. Paths (see
    # the cases in tests/ray_driver.py): no_split_shuffled skips the ranking sort;
    # random_counts ranks by a seed, leaves rows out and reads unshuffled; stratified_kfold
    # ranks each class by a seed, filtered, read shuffled (KFold's path, per class);
    # stratified_kfold_in_order ranks each class by row id; sequential ranks by row id
    # (KFold(shuffle=False)'s path); hash and calculated place each row in its task;
    # group_stratified counts groups and (group, label) pairs (GroupKFold's path without
    # labels); time finds each split's first time. Not here, as they take no other path:
    # KFold, StratifiedSplit, GroupKFold, RandomSplit(ratios / fixed) (their sizes are the
    # local engine's functions) and the S3 test's RandomSplit(ratios=...) + Shuffle.
    every = [
        "no_split_shuffled",
        "random_counts",
        "stratified_kfold",
        "stratified_kfold_in_order",
        "sequential",
        "hash",
        "calculated",
        "group_stratified",
        "time",
    ]
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
            timeout=420.0,  # nine Ray builds on 2 shared cores
        )
        .check()
        .json()
    )
    tables = [*every, *(f"{name}__train" for name in every if "kfold" in name)]
    for name in tables:
        assert one["hashes"][f"ray/{name}"] == one["hashes"][f"local/{name}"], name
    # Seeded ranks come from a histogram of the keys (no sort); with the histogram refused
    # (very many classes), Ray Data's sort gives the same tables.
    sorted_ = one["sorted"]
    assert sorted_["refused"] == [True, True]  # both builds took the sort
    assert set(sorted_["hashes"]) == {
        "random_counts",
        "stratified_kfold",
        "stratified_kfold__train",
    }
    for name, digest in sorted_["hashes"].items():
        assert digest == one["hashes"][f"local/{name}"], name
    for name in every:
        # The same rows: the same data version (downstream of a switch of engine stays fresh).
        assert one["versions"][f"ray/{name}"] == one["versions"][f"local/{name}"], name
        assert one["view_ok"][name], f"{name}: a view over the Ray-built table read other rows"
    # Written by the workers, a fragment per block piece, not streamed through the driver into
    # one write (which makes one fragment of these 30k rows: the local engine's tables). The
    # base is three fragments, so the sort gives several blocks, written in order (the hashes
    # above). A KFold training table is the folds rotated, rows [first, n) then [0, n - last)
    # of the same blocks: exactly the folds table's fragments cut at those two ranges.
    for name in tables:
        assert len(one["fragments"][f"local/{name}"]) == 1, name
    for name in every:
        blocks = one["fragments"][f"ray/{name}"]
        assert len(blocks) > 1, (name, blocks)
        if "kfold" in name:
            folds = one["split_rows"][f"ray/{name}"]
            n, first, last = sum(folds), folds[0], folds[-1]
            expected = _pieces(blocks, first, n) + _pieces(blocks, 0, n - last)
            assert one["fragments"][f"ray/{name}__train"] == expected, name
    # Different specs gave different tables (the hashes are not all of one empty table).
    assert len({one["hashes"][f"ray/{name}"] for name in tables}) == len(tables)
    # A value only a Ray task meets (a calculated split out of range) fails the build with
    # the local engine's SpecError, not Ray's wrapping of it; nothing is written.
    for engine, bad in one["out_of_range"].items():
        assert not bad["success"] and not bad["written"], (engine, bad)
        assert bad["class"] == "SpecError", (engine, bad)
        message = bad["message"]
        assert message.startswith(
            "perm_assets.errors.SpecError: asset 'out_of_range': calculated split expression "
            "'id % 4' gives split index 3 (row "
        ), (engine, message)
        assert message.rstrip().endswith(
            "but only splits 0..2 (['split_0', 'split_1', 'split_2']) are declared; fix the "
            "expression or declare more splits"
        ), (engine, message)
    # The blocking checks' membership pass ran as Ray tasks for every Ray-built kind (the
    # hash split's stability check then joins keys out of core in the driver): three shards
    # (one per base fragment at the driver's shard size) and, for tables of several fragments
    # and 5k+ rows per route, several route tasks; the local engine's checks ran in its
    # process.
    for name in every:
        tasks = one["checked_by_ray_tasks/ray"][name]
        assert tasks is not None and tasks["shard_tasks"] == 3, name
        rows = sum(one["split_rows"][f"ray/{name}"])  # 18 rows (random_counts): one route
        assert tasks["route_tasks"] > 1 if rows > 10_000 else tasks["route_tasks"] >= 1, name
        if "kfold" in name:  # the training table compared with the folds in range tasks
            training = one["checked_by_ray_tasks/ray"][f"{name}/training"]
            assert training is not None and training["training_range_tasks"] >= 1, name
    assert not any(one["checked_by_ray_tasks/local"].values())
    # A corrupted Ray-built table (a row dropped, one twice, an id of no base fragment, a split
    # id past the splits): the Ray tasks' figures are the one-process figures, and they fail.
    corrupted = one["corrupted"]
    assert corrupted["ray"] == corrupted["here"]
    cover = corrupted["ray"]["cover"]
    assert not cover["passed"]
    assert (cover["duplicate_rows"], cover["missing_rows"], cover["extra_rows"]) == (1, 1, 1)
    assert cover["out_of_range_ids"] == 1
    assert corrupted["tasks"]["route_tasks"] > 1 and corrupted["tasks"]["shard_tasks"] == 3
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


def _pieces(blocks: list[int], start: int, stop: int) -> list[int]:
    """Rows of each piece of rows ``[start, stop)`` over consecutive blocks of ``blocks``
    rows."""
    pieces, at = [], 0
    for rows in blocks:
        piece = min(stop, at + rows) - max(start, at)
        if piece > 0:
            pieces.append(piece)
        at += rows
    return pieces


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
    # What the local engine does not build (the Ray engine builds from its plan): refused
    # before any connection, so the address below is never dialled.
    db = LanceDBResource(uri=str(tmp_path / "db"), engine="ray", ray_address="127.0.0.1:9")
    base = _base()
    cases = {
        "clumped": permutation_asset(
            "clumped", source=base, split=RandomSplit(ratios=[0.5, 0.5], seed=1, clump_size=4)
        ),
        "folds": folds_asset("folds", source=base, folds=TimeSeriesFolds(k=3, column="id")),
    }
    for name, asset in cases.items():
        result = dg.materialize(
            [base, asset],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
            raise_on_error=False,
        )
        message = _error(result, name)
        assert "engine 'ray' does not build" in message, message
        kind = "RandomSplit(clump_size=...)" if name == "clumped" else "TimeSeriesFolds"
        assert kind in message, message
        assert "engine='lancedb'" in message
        assert not db.table_exists(name)


def test_null_labels_groups_and_times_fail_as_on_the_local_engine_before_ray_is_touched(
    tmp_path: Path,
) -> None:
    # Counted on the driver before any connection (the address is never dialled): the local
    # engine's message, naming the column and the filter that drops them; nothing written.
    @dg.asset(name="base")
    def base() -> pa.Table:
        ids = np.arange(1000, dtype=np.int64)
        holes = pa.array(ids % 3, mask=ids % 100 == 7)  # 10 nulls
        return pa.table({"id": ids, "label": holes, "user": holes, "t": holes.cast(pa.float64())})

    cases = {
        "stratified": lambda: permutation_asset(
            "stratified",
            source=base,
            split=StratifiedSplit(ratios=[0.5, 0.5], label="label", seed=1),
        ),
        "skfold": lambda: folds_asset(
            "skfold", source=base, folds=StratifiedKFold(k=3, label="label", seed=1)
        ),
        "group": lambda: permutation_asset(
            "group", source=base, split=GroupSplit(group="user", ratios=[0.5, 0.5], seed=1)
        ),
        "time": lambda: permutation_asset(
            "time", source=base, split=TimeSplit(column="t", ratios=[0.5, 0.5])
        ),
    }
    column = {"stratified": "label", "skfold": "label", "group": "user", "time": "t"}
    for engine in ("local", "ray"):
        db = LanceDBResource(uri=str(tmp_path / engine), engine=engine, ray_address="127.0.0.1:9")
        for name, make in cases.items():
            result = dg.materialize(
                [base, make()],
                resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
                raise_on_error=False,
            )
            message = _error(result, name)
            assert (
                f"asset '{name}': column '{column[name]}' of table 'base' has null values "
                "among the selected rows"
            ) in message, (engine, message)
            assert f'Drop them with filter "{column[name]} IS NOT NULL"' in message
            assert not db.table_exists(name)


def test_a_time_column_without_an_order_fails_as_on_the_local_engine(tmp_path: Path) -> None:
    @dg.asset(name="base")
    def base() -> pa.Table:
        return pa.table({"id": np.arange(10), "t": [str(i) for i in range(10)]})

    for engine in ("local", "ray"):
        db = LanceDBResource(uri=str(tmp_path / engine), engine=engine, ray_address="127.0.0.1:9")
        perm = permutation_asset(
            "time", source=base, split=TimeSplit(column="t", ratios=[0.5, 0.5])
        )
        result = dg.materialize(
            [base, perm],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
            raise_on_error=False,
        )
        message = _error(result, "time")
        assert "column 't' has type string, which has no time order" in message, message
        assert not db.table_exists("time")


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
