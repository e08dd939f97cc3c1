"""`LanceDBIOManager` with real tables and real materializations: outputs, inputs, pinning."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from lancedb.permutation import Permutation
from lancedb.table import Table

from perm_assets import (
    LanceDBResource,
    PermutationView,
    RandomSplit,
    Shuffle,
    SpecError,
    TableNotFoundError,
    permutation_asset,
)
from perm_assets.views import read_arrow
from tests.conftest import Runner, make_rows, table_asset


def test_table_output_overwrites_as_a_new_version_each_time(
    run: Runner, db: LanceDBResource
) -> None:
    sizes = iter([100, 40])

    @dg.asset(name="rows")
    def rows() -> pa.Table:
        return make_rows(next(sizes))

    run([rows])
    first = run.metadata("rows")
    run([rows])
    second = run.metadata("rows")

    assert second["lance/version"] == first["lance/version"] + 1
    assert second["dagster/row_count"] == 40
    assert db.open_table("rows").to_arrow().equals(make_rows(40))
    # The first version is still readable as it was.
    assert db.open_table("rows", version=first["lance/version"]).to_arrow().equals(make_rows(100))
    assert second["lance/write_mode"] == "overwrite"
    assert second["dagster/table_name"] == "rows"
    schema = second["dagster/column_schema"]
    assert [(c.name, c.type) for c in schema.columns] == [
        ("id", "int64"),
        ("label", "int64"),
        ("group", "int64"),
        ("value", "double"),
        ("name", "string"),
    ]
    assert run.data_version("rows") == f"rows@{second['lance/version']}"


def test_append_mode_adds_rows_as_a_new_version(run: Runner, db: LanceDBResource) -> None:
    starts = iter([0, 30])

    @dg.asset(name="log", metadata={"write_mode": "append"})
    def log() -> pa.Table:
        return make_rows(30, start=next(starts))

    run([log])
    run([log])
    meta = run.metadata("log")
    assert meta["dagster/row_count"] == 60
    assert meta["lance/rows_written"] == 30
    assert meta["lance/write_mode"] == "append"
    ids = db.open_table("log").to_arrow().column("id").to_pylist()
    assert sorted(ids) == list(range(60))


def test_pandas_output_is_stored_without_its_index(run: Runner, db: LanceDBResource) -> None:
    @dg.asset(name="frame")
    def frame() -> pd.DataFrame:
        return pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}, index=[10, 20, 30])

    run([frame])
    assert db.open_table("frame").to_arrow().to_pydict() == {"a": [1, 2, 3], "b": ["x", "y", "z"]}


def test_record_batch_reader_is_streamed_not_collected(run: Runner, db: LanceDBResource) -> None:
    batches, rows_per_batch = 40, 1_000_000  # 320 MB in all, 8 MB a batch
    schema = pa.schema([("x", pa.int64())])
    peak = {"bytes": 0}

    def generate() -> Iterator[pa.RecordBatch]:
        for i in range(batches):
            # "add" allocates in Arrow's pool, so the pool shows how many batches are alive.
            column = pc.call_function("add", [pa.array(np.arange(rows_per_batch)), i])
            peak["bytes"] = max(peak["bytes"], pa.total_allocated_bytes())
            yield pa.record_batch([column], schema=schema)

    @dg.asset(name="stream")
    def stream() -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(schema, generate())

    run([stream])
    assert db.open_table("stream").count_rows() == batches * rows_per_batch
    assert run.metadata("stream")["dagster/row_count"] == batches * rows_per_batch
    # Collected first, the pool would reach 320 MB; streamed, a handful of batches are alive.
    assert peak["bytes"] < 10 * 8 * rows_per_batch


def test_unsupported_output_type_names_the_asset_and_the_supported_types(run: Runner) -> None:
    @dg.asset(name="oops")
    def oops() -> dict[str, int]:
        return {"a": 1}

    with pytest.raises(TypeError, match=r"cannot store asset 'oops': it returned builtins\.dict"):
        run([oops])


def test_unknown_write_mode_is_rejected(run: Runner, db: LanceDBResource) -> None:
    bad = table_asset("rows", 10, metadata={"write_mode": "upsert"})
    with pytest.raises(SpecError, match=r"write_mode='upsert'; allowed: 'overwrite', 'append'"):
        run([bad])
    assert not db.table_exists("rows")


SOURCE = table_asset("rows", 200)
SPLITS = permutation_asset(
    "splits",
    source=SOURCE,
    split=RandomSplit(ratios=[0.75, 0.25], seed=3, split_names=["train", "test"]),
    shuffle=Shuffle(seed=4),
)


def _consumer(name: str, annotation: Any, upstream: dg.AssetsDefinition, **metadata: Any):
    """An asset that receives ``upstream`` as ``annotation`` and keeps what it got."""
    got: dict[str, Any] = {}

    def body(data) -> None:  # Dagster reads the annotation set below
        got["value"] = data

    body.__annotations__ = {"data": annotation, "return": None}
    asset = dg.asset(
        name=name, ins={"data": dg.AssetIn(key=upstream.key, metadata=metadata or None)}
    )(body)
    return asset, got


def test_permutation_input_is_a_pinned_view_of_the_split(run: Runner, db: LanceDBResource) -> None:
    consumer, got = _consumer(
        "train", Permutation, SPLITS, split="train", columns=["id", "label"], format="arrow"
    )
    run([SOURCE, SPLITS, consumer])
    view = got["value"]
    assert isinstance(view, PermutationView)
    assert view.num_rows == 150
    assert view.selected_columns == ["id", "label"]
    table = read_arrow(view)
    assert table.column_names == ["id", "label"]

    stored = db.open_table("splits").to_arrow()
    train_row_ids = stored.column("row_id").to_numpy()[stored.column("split_id").to_numpy() == 0]
    base = db.open_table("rows").to_arrow()
    # Without stable row ids a row id is the row address: fragment 0, offset = position.
    expected_ids = base.column("id").take(train_row_ids).to_pylist()
    assert table.column("id").to_pylist() == expected_ids

    lineage = view.lineage
    meta = run.metadata("splits")
    assert (lineage.table, lineage.table_version) == ("splits", meta["lance/version"])
    assert (lineage.base_table, lineage.base_version) == ("rows", meta["lance/base_version"])
    assert (lineage.split, lineage.split_index) == ("train", 0)


def test_view_stays_pinned_when_the_tables_move_on_outside_dagster(
    run: Runner, db: LanceDBResource
) -> None:
    consumer, got = _consumer("reader", Permutation, SPLITS, split="test", columns=["id"])
    run([SOURCE, SPLITS, consumer])
    first_ids = read_arrow(got["value"]).column("id").to_pylist()

    # Someone rewrites both tables behind Dagster's back: the recorded versions still rule.
    connection = db.connect()
    connection.create_table("rows", make_rows(200, start=10_000), mode="overwrite")
    connection.open_table("splits").delete("true")
    run([SOURCE, SPLITS, consumer], selection=[consumer])
    assert read_arrow(got["value"]).column("id").to_pylist() == first_ids


def test_view_follows_the_latest_materialization(run: Runner) -> None:
    consumer, got = _consumer("reader", Permutation, SPLITS, split="train", columns=["id"])
    run([SOURCE, SPLITS, consumer])
    first = got["value"].lineage.table_version
    run(
        [SOURCE, SPLITS, consumer],
        selection=[SPLITS, consumer],
        run_config={"ops": {"splits": {"config": {"seed": 10}}}},
    )
    assert got["value"].lineage.table_version == first + 1


def test_dict_input_gives_one_view_per_split(run: Runner) -> None:
    consumer, got = _consumer(
        "both", dict[str, Permutation], SPLITS, split=["train", "test"], columns=["id"]
    )
    run([SOURCE, SPLITS, consumer])
    views = got["value"]
    assert sorted(views) == ["test", "train"]
    train = set(read_arrow(views["train"]).column("id").to_pylist())
    test = set(read_arrow(views["test"]).column("id").to_pylist())
    assert not train & test
    assert train | test == set(range(200))


def test_table_asset_input_is_its_identity_view_or_the_table(run: Runner) -> None:
    as_view, got_view = _consumer("as_view", Permutation, SOURCE, columns=["name"], batch_size=64)
    as_table, got_table = _consumer("as_table", Table, SOURCE)
    run([SOURCE, as_view, as_table])
    view = got_view["value"]
    assert isinstance(view, PermutationView)
    assert view.batch_size == 64
    assert read_arrow(view).column("name").to_pylist() == [f"row{i}" for i in range(200)]
    table = got_table["value"]
    assert isinstance(table, Table)
    assert table.version == run.metadata("rows")["lance/version"]


def test_arrow_and_pandas_inputs_honour_columns(run: Runner) -> None:
    as_arrow, got_arrow = _consumer("as_arrow", pa.Table, SPLITS, split="test", columns=["label"])
    as_pandas, got_pandas = _consumer(
        "as_pandas", pd.DataFrame, SPLITS, split="test", columns=["id", "value"]
    )
    run([SOURCE, SPLITS, as_arrow, as_pandas])
    arrow = got_arrow["value"]
    frame = got_pandas["value"]
    assert isinstance(arrow, pa.Table) and arrow.column_names == ["label"]
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["id", "value"]
    assert len(arrow) == len(frame) == 50
    assert arrow.column("label").to_pylist() == [i % 10 for i in frame["id"]]


def test_iterating_a_view_yields_every_row_even_with_a_short_last_batch(run: Runner) -> None:
    # 50 test rows at lancedb's default batch of 100: plain lancedb iteration yields nothing.
    consumer, got = _consumer("reader", Permutation, SPLITS, split="test", format="arrow")
    run([SOURCE, SPLITS, consumer])
    view = got["value"]
    assert sum(len(batch) for batch in view) == 50
    assert sum(len(batch) for batch in Permutation.__iter__(view)) == 0  # what lancedb alone does


@pytest.mark.parametrize(
    ("metadata", "error", "message"),
    [
        (
            {"split": "val"},
            SpecError,
            r"split 'val' is not in asset 'splits' \(splits: 'train', 'test'\)",
        ),
        ({"split": 5}, SpecError, r"split index 5 is out of range for asset 'splits'"),
        ({}, SpecError, r"asset 'splits' has 2 splits \('train', 'test'\); ask for one"),
        (
            {"split": "train", "columns": ["id", "pixels"]},
            SpecError,
            r"columns \['pixels'\] are not in asset 'splits' "
            r"\(columns: id, label, group, value, name\)",
        ),
        (
            {"split": "train", "format": "parquet"},
            SpecError,
            r"input from asset 'splits': invalid view request: format='parquet'.*one of numpy",
        ),
        ({"split": "train", "batch_size": 0}, SpecError, r"batch_size=0"),
        (
            {"split": "train", "colums": ["id"]},
            SpecError,
            r"input from asset 'splits': invalid view request: unknown key 'colums' \(did you "
            r"mean 'columns'\?\)\. Allowed keys: split .*columns",
        ),
        (
            {"split": "train", "fromat": "arrow"},
            SpecError,
            r"unknown key 'fromat' \(did you mean 'format'\?\)",
        ),
    ],
)
def test_bad_view_requests_name_the_asset_and_the_choices(
    run: Runner, metadata: dict[str, Any], error: type[Exception], message: str
) -> None:
    consumer, _ = _consumer("reader", Permutation, SPLITS, **metadata)
    run([SOURCE, SPLITS])
    with pytest.raises(error, match=message):
        run([SOURCE, SPLITS, consumer], selection=[consumer])


def test_a_split_asked_of_a_table_asset_is_rejected(run: Runner) -> None:
    consumer, _ = _consumer("reader", Permutation, SOURCE, split="train")
    with pytest.raises(
        SpecError, match=r"split 'train' was asked of asset 'rows', which is a table"
    ):
        run([SOURCE, consumer])


def test_unsupported_input_annotation_is_rejected(run: Runner) -> None:
    consumer, _ = _consumer("reader", np.ndarray, SOURCE)
    with pytest.raises(TypeError, match=r"cannot load asset 'rows' as <class 'numpy\.ndarray'>"):
        run([SOURCE, consumer])


def test_reading_an_asset_never_materialized_says_so(run: Runner) -> None:
    consumer, _ = _consumer("reader", Permutation, SOURCE)
    with pytest.raises(TableNotFoundError, match=r"LanceDB table 'rows' does not exist") as info:
        run([SOURCE, consumer], selection=[consumer])
    assert "Materialize the asset" in str(info.value)
