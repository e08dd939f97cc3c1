"""No other rows than a run read: re-created tables, retention against what Dagster serves,
files of killed writes. Real tables, real materializations, a real killed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
from lancedb.permutation import Permutation

from perm_assets import (
    KFold,
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    Shuffle,
    folds_asset,
    permutation_asset,
)
from perm_assets.errors import LineageError
from perm_assets.lineage import load_view, reproduce_input
from perm_assets.pins import retain
from perm_assets.views import ViewRequest, read_arrow
from tests.conftest import Runner, make_rows

SOURCE_ROWS = {"n": 120, "start": 0}


@dg.asset(name="rows")
def rows() -> pa.Table:
    return make_rows(SOURCE_ROWS["n"], start=SOURCE_ROWS["start"])


SPLITS = permutation_asset(
    "splits",
    source=rows,
    split=RandomSplit(ratios=[0.5, 0.5], seed=1, split_names=["train", "test"]),
    shuffle=Shuffle(seed=2),
)
FOLDS = folds_asset("folds", source=rows, folds=KFold(k=3, seed=1))


def _reader(upstream: dg.AssetsDefinition, metadata: dict[str, Any], seen: list[list[int]]):
    @dg.asset(name="reader", ins={"data": dg.AssetIn(key=upstream.key, metadata=metadata)})
    def reader(data: Permutation) -> None:
        seen.append(read_arrow(data).column("id").to_pylist())

    return reader


def _recreate(db: LanceDBResource, name: str, data: pa.Table) -> None:
    """Drop table ``name`` and create it again with ``data``: version numbers restart at 1."""
    connection = db.connect()
    connection.drop_table(name)
    connection.create_table(name, data)


@pytest.fixture(autouse=True)
def _reset_source() -> None:
    SOURCE_ROWS.update(n=120, start=0)


def test_a_recreated_permutation_table_is_refused_by_load_view_and_reproduce_input(
    run: Runner, db: LanceDBResource
) -> None:
    seen: list[list[int]] = []
    reader = _reader(SPLITS, {"split": "train", "columns": ["id"]}, seen)
    result = run([rows, SPLITS, reader])
    before = seen[-1]
    # The same rows reproduce while the tables are the recorded ones.
    again = reproduce_input(db, run.instance, run_id=result.run_id, input_name="data")
    assert read_arrow(again).column("id").to_pylist() == before

    # Someone re-creates the permutation table with other rows: the same version number 1.
    other = db.open_table("splits").to_arrow()
    _recreate(db, "splits", other.take(list(range(other.num_rows))[::-1]))
    assert db.open_table("splits").version == 1

    with pytest.raises(LineageError, match=r"asset 'splits': table 'splits' has no tag"):
        reproduce_input(db, run.instance, run_id=result.run_id, input_name="data")
    with pytest.raises(LineageError, match=r"table 'splits' has no tag"):
        load_view("splits", db=db, instance=run.instance, run_id=result.run_id)
    with pytest.raises(LineageError, match=r"table 'splits' has no tag"):
        run([rows, SPLITS, reader], selection=[reader])


def test_a_recreated_base_table_is_refused_by_identity_views_and_permutation_builds(
    run: Runner, db: LanceDBResource
) -> None:
    seen: list[list[int]] = []
    identity = _reader(rows, {"columns": ["id"]}, seen)
    result = run([rows, SPLITS, identity])
    assert seen[-1] == list(range(120))

    # The base table is dropped and re-created outside Dagster: version 1 again, other rows.
    _recreate(db, "rows", make_rows(120, start=1000))

    with pytest.raises(LineageError, match=r"asset 'rows': table 'rows' version 1 was committed"):
        run([rows, SPLITS, identity], selection=[identity])
    with pytest.raises(LineageError, match=r"table 'rows' version 1 was committed"):
        reproduce_input(db, run.instance, run_id=result.run_id, input_name="data")
    # A permutation built now would read the new table at the version recorded for the old.
    with pytest.raises(LineageError, match=r"asset 'rows': table 'rows' version 1"):
        run([rows, SPLITS], selection=[SPLITS])
    # The permutation materialized before: its base pin is gone with the old table.
    with pytest.raises(LineageError, match=r"pins version 1 of base table 'rows'"):
        load_view("splits", db=db, instance=run.instance, request=ViewRequest(split="train"))
    # Materializing the source again makes everything consistent once more.
    SOURCE_ROWS.update(start=1000)
    run([rows, SPLITS, identity])
    assert seen[-1] == list(range(1000, 1120))


def test_a_recreated_training_table_is_refused_by_fold_training_views(
    run: Runner, db: LanceDBResource
) -> None:
    seen: list[list[int]] = []
    reader = _reader(FOLDS, {"split": "train", "fold": 1, "columns": ["id"]}, seen)
    result = run([rows, FOLDS, reader])
    assert len(seen[-1]) == 80

    train = db.open_table("folds__train").to_arrow()
    _recreate(db, "folds__train", train.take(list(range(train.num_rows))[::-1]))
    for _ in range(int(db.open_table("folds").schema.metadata[b"perm_assets.train_version"]) - 1):
        db.connect().open_table("folds__train").add(train.slice(0, 0))  # same version number

    with pytest.raises(LineageError, match=r"folds__train"):
        run([rows, FOLDS, reader], selection=[reader])
    with pytest.raises(LineageError, match=r"folds__train"):
        reproduce_input(db, run.instance, run_id=result.run_id, input_name="data")


def test_retain_never_retires_the_version_dagster_serves(
    run: Runner, db: LanceDBResource, tmp_path: Path
) -> None:
    """A second Dagster instance writes a newer version of the same permutation table."""
    run([rows, SPLITS])
    served = read_arrow(
        load_view("splits", db=db, instance=run.instance, request=ViewRequest(split="train"))
    )
    other_resources = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}
    with dg.DagsterInstance.ephemeral() as other:
        dg.materialize(
            [rows, SPLITS],
            selection=[SPLITS],
            resources=other_resources,
            instance=other,
            run_config={"ops": {"splits": {"config": {"seed": 99}}}},
        )
    assert db.open_table("splits").version == 2  # Lance's latest has no record in `run`

    report = retain(db, keep=1, cleanup_older_than=timedelta(0), instance=run.instance)
    assert report.retired_pins["splits"] == []  # both live: v1 served here, v2 Lance's latest
    view = load_view("splits", db=db, instance=run.instance, request=ViewRequest(split="train"))
    assert read_arrow(view).equals(served)

    # Without the instance, only Lance's latest counts: the served version's pin is retired
    # and its views then fail clearly, never with other rows.
    retain(db, keep=1, cleanup_older_than=timedelta(0))
    with pytest.raises(LineageError):
        load_view("splits", db=db, instance=run.instance, request=ViewRequest(split="train"))


def test_retain_counts_the_versions_it_removed(run: Runner, db: LanceDBResource) -> None:
    for seed in (1, 2, 3):
        run([rows, SPLITS], run_config={"ops": {"splits": {"config": {"seed": seed}}}})
    before = {int(v["version"]) for v in db.open_table("splits").list_versions()}
    report = retain(db, keep=1, cleanup_older_than=timedelta(0), instance=run.instance)
    after = {int(v["version"]) for v in db.open_table("splits").list_versions()}
    assert report.versions_removed["splits"] == len(before - after) > 0
    assert all(n >= 0 for n in report.versions_removed.values())


_KILLED_WRITER = """
import sys, time
import numpy as np, pyarrow as pa, lancedb
table = lancedb.connect(sys.argv[1]).open_table("rows")
def batches():
    for i in range(400):
        yield pa.RecordBatch.from_pylist(
            [dict(id=j, label=j % 10, group=j // 7, value=j * 0.5, name=f"row{j}")
             for j in range(i * 2000, (i + 1) * 2000)],
            schema=table.schema,
        )
        if i == 200:
            print("mid-write", flush=True)
            time.sleep(120)
table.add(pa.RecordBatchReader.from_batches(table.schema, batches()))
"""


def test_files_of_a_killed_write_go_with_delete_unverified_and_views_still_read(
    run: Runner, db: LanceDBResource
) -> None:
    seen: list[list[int]] = []
    reader = _reader(SPLITS, {"split": "train", "columns": ["id"]}, seen)
    result = run([rows, SPLITS, reader])
    data_dir = Path(db.uri) / "rows.lance" / "data"
    files_before = set(data_dir.iterdir())

    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, db.uri], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "mid-write"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    writer.stdout.close()
    orphans = set(data_dir.iterdir()) - files_before
    assert orphans  # the killed write left data files behind
    assert db.open_table("rows").count_rows() == 120  # and never became visible

    retain(db, keep=1, cleanup_older_than=timedelta(0), instance=run.instance)
    assert set(data_dir.iterdir()) & orphans  # Lance keeps young unreferenced files by default
    retain(
        db, keep=1, cleanup_older_than=timedelta(0), instance=run.instance, delete_unverified=True
    )
    assert not set(data_dir.iterdir()) & orphans
    view = reproduce_input(db, run.instance, run_id=result.run_id, input_name="data")
    assert read_arrow(view).column("id").to_pylist() == seen[-1]


def test_retain_keeps_the_table_version_dagster_serves_when_lance_has_newer_ones(
    run: Runner, db: LanceDBResource
) -> None:
    """A table asset has no pin; writes outside Dagster add versions it never recorded."""
    seen: list[list[int]] = []
    identity = _reader(rows, {"columns": ["id"]}, seen)
    run([rows, identity])
    for start in (500, 600):
        db.connect().open_table("rows").add(make_rows(5, start=start))
    assert db.open_table("rows").version == 3

    retain(db, keep=1, cleanup_older_than=timedelta(0), instance=run.instance)
    run([rows, identity], selection=[identity])
    assert seen[-1] == seen[0] == list(range(120))
