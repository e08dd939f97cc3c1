"""Sources and specs that used to crash the build or give other rows than asked: pandas and
schema-metadata sources, calculated split types, filters with trailing text."""

from __future__ import annotations

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from lancedb.permutation import Permutation

from perm_assets import (
    CalculatedSplit,
    GroupSplit,
    HashSplit,
    KFold,
    LanceDBResource,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    Shuffle,
    SpecError,
    StratifiedKFold,
    StratifiedSplit,
    TimeSplit,
    ViewRequest,
    build_permutation,
    folds_asset,
    open_view,
    permutation_asset,
)
from perm_assets.tables import WriteMode, write_table
from perm_assets.views import read_arrow
from tests.conftest import Runner, make_rows

N = 2_000

SPLITS: dict[str, Any] = {
    "random": RandomSplit(ratios=[0.8, 0.1, 0.1], seed=7, split_names=["train", "val", "test"]),
    "sequential": SequentialSplit(ratios=[0.7, 0.3]),
    "hash": HashSplit(columns=["id"], weights=[8, 2]),
    "calculated": CalculatedSplit(expression="id % 3", splits=3),
    "stratified": StratifiedSplit(label="label", ratios=[0.8, 0.2], seed=1),
    "group": GroupSplit(group="group", ratios=[0.8, 0.2], seed=1),
    "time": TimeSplit(column="value", ratios=[0.8, 0.2]),
}


@dg.asset(name="frame")
def frame() -> pd.DataFrame:
    """A DataFrame source, as the README's first example: pandas adds schema metadata."""
    return make_rows(N).to_pandas()


@pytest.mark.parametrize("kind", sorted(SPLITS))
def test_a_dataframe_source_feeds_every_split_kind(run: Runner, kind: str) -> None:
    perm = permutation_asset(
        f"frame_{kind}",
        source=frame,
        filter="id >= 10",
        split=SPLITS[kind],
        shuffle=Shuffle(seed=3),
    )
    seen: dict[str, int] = {}

    @dg.asset(ins={"views": dg.AssetIn(key=perm.key, metadata={"columns": ["id"]})})
    def reader(views: dict[str, Permutation]) -> None:
        for name, view in views.items():
            seen[name] = read_arrow(view).num_rows

    run([frame, perm, reader])
    assert sum(seen.values()) == N - 10
    assert seen == {k.removeprefix("rows/"): v for k, v in _rows(run, perm.key).items()}


def test_a_dataframe_source_feeds_folds(run: Runner) -> None:
    for folds in (KFold(k=3, seed=1), StratifiedKFold(k=3, label="label", seed=1)):
        asset = folds_asset(f"frame_folds_{folds.kind}", source=frame, folds=folds)
        run([frame, asset])
        assert run.metadata(asset.key)["dagster/row_count"] == N


def test_the_stored_dataframe_keeps_no_pandas_metadata(run: Runner, db: LanceDBResource) -> None:
    run([frame])
    assert b"pandas" not in (db.open_table("frame").schema.metadata or {})


def _rows(run: Runner, key: dg.AssetKey) -> dict[str, int]:
    return {k: v for k, v in run.metadata(key).items() if k.startswith("rows/")}


# ------------------------------------------------------------------ schema metadata (own build)
@pytest.fixture
def tagged(db: LanceDBResource) -> Any:
    """A base table with schema-level metadata: lancedb 0.40's builder panics on it."""
    data = make_rows(N).replace_schema_metadata({"owner": "team-a"})
    return write_table(db.connect(), "tagged", data, WriteMode.OVERWRITE)


@pytest.mark.parametrize(
    "spec",
    [
        PermutationSpec(filter="id < 1500"),
        PermutationSpec(shuffle=Shuffle(seed=1)),
        PermutationSpec(
            filter="id >= 3",
            split=RandomSplit(ratios=[0.7, 0.2, 0.1], seed=1),
            shuffle=Shuffle(seed=2),
        ),
        PermutationSpec(split=RandomSplit(ratios=[0.5, 0.2], seed=1, allow_discard=True)),
        PermutationSpec(split=RandomSplit(counts=[100, 50], seed=4)),
        PermutationSpec(
            split=RandomSplit(fixed=3, seed=1, clump_size=16),
            shuffle=Shuffle(seed=3, clump_size=16),
        ),
        PermutationSpec(split=SequentialSplit(ratios=[0.75, 0.25])),
        PermutationSpec(
            split=CalculatedSplit(expression="id % 4", splits=4), shuffle=Shuffle(seed=1)
        ),
        PermutationSpec(split=HashSplit(columns=["id"], weights=[1, 1])),
        PermutationSpec(split=HashSplit(columns=["id"], weights=[1, 1]), shuffle=Shuffle(seed=9)),
    ],
    ids=[
        "filter",
        "shuffle",
        "random",
        "discard",
        "counts",
        "clumps",
        "seq",
        "calc",
        "hash",
        "hash+shuffle",
    ],
)
def test_a_table_with_schema_metadata_builds_every_lancedb_kind(tagged: Any, spec: Any) -> None:
    data = build_permutation(tagged, spec, asset="tagged_perm")
    again = build_permutation(tagged, spec, asset="tagged_perm")
    assert data.data.column("row_id").equals(again.data.column("row_id"))  # seeded: same rows
    row_ids = data.data.column("row_id").to_numpy()
    split_ids = data.data.column("split_id").to_numpy()
    assert data.data.schema.field("split_id").type == pa.uint64()
    assert np.unique(row_ids).size == row_ids.size  # no row twice
    selected = tagged.count_rows(spec.filter)
    split = spec.split
    if isinstance(split, RandomSplit) and split.counts:
        assert list(data.split_rows) == split.counts
    elif isinstance(split, RandomSplit) and split.allow_discard:
        assert list(data.split_rows) == [N // 2, N // 5]
    else:
        assert data.num_rows == selected
    if isinstance(split, RandomSplit) and split.ratios and not split.allow_discard:
        shares = np.asarray(split.ratios) * selected
        assert np.all(np.abs(np.asarray(data.split_rows) - shares) <= 1)
    if isinstance(split, SequentialSplit):
        assert row_ids[split_ids == 0].max() < row_ids[split_ids == 1].min()
    if isinstance(split, CalculatedSplit):
        ids = tagged.to_arrow().column("id").to_numpy()
        assert np.array_equal(ids[row_ids] % 4, split_ids)  # one fragment: row id = position
    assert np.all(np.diff(split_ids.astype(np.int64)) >= 0)  # grouped by split
    if spec.shuffle is not None and split is None:
        assert not np.all(np.diff(row_ids.astype(np.int64)) > 0)  # actually shuffled


# ----------------------------------------------------------------------- calculated split types
def test_a_calculated_split_is_stored_as_uint64_and_read_as_a_split(
    run: Runner, db: LanceDBResource
) -> None:
    source = _rows_asset()
    perm = permutation_asset(
        "calc", source=source, split=CalculatedSplit(expression="id % 2", splits=2)
    )
    run([source, perm])
    assert db.open_table("calc").schema.field("split_id").type == pa.uint64()
    view = open_view(db, asset="calc", table="calc", version=None, request=ViewRequest(split=0))
    rows = read_arrow(view)
    assert rows.column_names == make_rows(1).column_names  # the base rows, not the perm table
    assert rows.num_rows == 50 and all(i % 2 == 0 for i in rows.column("id").to_pylist())


def test_a_permutation_table_with_int64_split_ids_is_never_read_as_data(
    db: LanceDBResource,
) -> None:
    """Tables written before the uint64 cast: refused, not handed over as a plain table."""
    bad = pa.table(
        {"row_id": pa.array([0, 1], pa.uint64()), "split_id": pa.array([0, 1], pa.int64())}
    ).replace_schema_metadata({"base_version": "1", "perm_assets.base_table": "rows"})
    write_table(db.connect(), "legacy", bad, WriteMode.OVERWRITE)
    with pytest.raises(SpecError, match=r"not a valid permutation table .*split_id: int64"):
        open_view(db, asset="legacy", table="legacy", version=None, request=ViewRequest(split=0))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("value / 2", r"gives double; it must give a whole number"),
        ("NULLIF(id % 2, 0)", r"gives int64 with 50 null\(s\)"),
        ("name", r"gives (string|large_string|utf8); it must give a whole number"),
        ("id % 2 - 1", r"gives split index -1, below 0"),
        ("CAST(id % 2 AS INT)", None),  # int32 (counted as 64-bit ids, it once asked 32 GiB)
    ],
)
def test_calculated_expressions_of_the_wrong_type_fail_with_the_type(
    run: Runner, db: LanceDBResource, expression: str, message: str | None
) -> None:
    source = _rows_asset()
    perm = permutation_asset(
        "calc", source=source, split=CalculatedSplit(expression=expression, splits=2)
    )
    if message is None:
        run([source, perm])
        assert _rows(run, perm.key) == {"rows/split_0": 50, "rows/split_1": 50}
        return
    with pytest.raises(SpecError, match=rf"asset 'calc': calculated split expression .*{message}"):
        run([source, perm])
    assert not db.table_exists("calc")  # nothing written


# ---------------------------------------------------------------------------------- filters
@pytest.mark.parametrize(
    "bad",
    [
        "id < 10 ANDD id > 5",
        "id < 10 garbage",
        "id < 10 LIMIT 1",
        "id < 10 ORDER BY id DESC",
        "id < 10 WHERE id > 5",
    ],
)
def test_a_filter_with_trailing_text_fails_instead_of_being_cut(
    run: Runner, db: LanceDBResource, bad: str
) -> None:
    """lancedb parsed `id < 10` and dropped the rest: every one gave the rows of `id < 10`."""
    source = _rows_asset()
    perm = permutation_asset("filtered", source=source, filter=bad)
    with pytest.raises(SpecError, match=r"asset 'filtered': filter .* is not valid on table"):
        run([source, perm])
    assert not db.table_exists("filtered")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("id < 10 ) OR (id > 100", r"closes a parenthesis it never opened"),
        ("(id < 10", r"leaves 1 parenthesis\(es\) open"),
        ("id < 10 -- and id > 5", r"contains an SQL comment \(--\)"),
        ("id < 10 /* and id > 5 */", r"contains an SQL comment \(/\*\)"),
        ("name = 'a", r"leaves a ' quote open"),
    ],
)
def test_a_filter_that_is_not_one_expression_fails_at_definition(bad: str, message: str) -> None:
    with pytest.raises(SpecError, match=rf"permutation asset 'filtered': filter .*{message}"):
        permutation_asset("filtered", source="rows", filter=bad)


def test_quoted_parentheses_and_comment_marks_are_fine(run: Runner) -> None:
    source = _rows_asset()
    perm = permutation_asset("filtered", source=source, filter="name != 'x)--/*' AND id < 10")
    run([source, perm])
    assert run.metadata(perm.key)["dagster/row_count"] == 10


def _rows_asset() -> dg.AssetsDefinition:
    @dg.asset(name="rows")
    def rows() -> pa.Table:
        return make_rows(100)

    return rows


# ------------------------------------------------------------------ columns a split reads
def _wide_asset(n: int = 100) -> dg.AssetsDefinition:
    @dg.asset(name="rows")
    def rows() -> pa.Table:
        base = make_rows(n)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 2, np.float32)), 2)
        nullable = pa.array([None if i % 10 == 0 else i for i in range(n)], pa.int64())
        times = pa.array([float("nan") if i < 3 else float(i) for i in range(n)], pa.float64())
        return (
            base.append_column("vec", vectors)
            .append_column("maybe", nullable)
            .append_column("t", times)
        )

    return rows


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (
            HashSplit(columns=["vec"], weights=[1, 1]),
            r"hash column 'vec' of table 'rows' has type fixed_size_list<item: float>\[2\], "
            r"which has no single value per row",
        ),
        (
            StratifiedSplit(label="vec", ratios=[0.5, 0.5], seed=1),
            r"stratify column 'vec' of table 'rows' has type fixed_size_list",
        ),
        (
            GroupSplit(group="vec", ratios=[0.5, 0.5], seed=1),
            r"group column 'vec' of table 'rows' has type fixed_size_list",
        ),
        (
            HashSplit(columns=["maybe"], weights=[1, 1]),
            r"hash column 'maybe' of table 'rows' has 10 null value\(s\) among the 100 selected "
            r"rows; they would all land in one split\. Drop them with filter \"maybe IS NOT NULL\"",
        ),
        (
            TimeSplit(column="t", ratios=[0.5, 0.5]),
            r"column 't' has 3 NaN value\(s\) among 100 rows.*filter=\"NOT isnan\(t\)\"",
        ),
        (
            RandomSplit(ratios=[0.5, 0.5], seed=1, clump_size=500),
            r"clump_size 500 is larger than the 100 selected rows",
        ),
    ],
)
def test_columns_a_split_cannot_use_fail_before_anything_is_built(
    run: Runner, db: LanceDBResource, split: Any, message: str
) -> None:
    source = _wide_asset()
    perm = permutation_asset("perm", source=source, split=split)
    with pytest.raises(SpecError, match=rf"asset 'perm'[:,] .*{message}"):
        run([source, perm])
    assert not db.table_exists("perm")


def test_stratified_folds_on_a_vector_column_name_its_type(run: Runner) -> None:
    source = _wide_asset()
    folds = folds_asset("folds", source=source, folds=StratifiedKFold(k=2, label="vec"))
    with pytest.raises(SpecError, match=r"asset 'folds': stratify column 'vec' .* has type"):
        run([source, folds])


def test_the_advised_filters_work(run: Runner) -> None:
    source = _wide_asset()
    hashed = permutation_asset(
        "hashed",
        source=source,
        filter="maybe IS NOT NULL",
        split=HashSplit(columns=["maybe"], weights=[1, 1]),
    )
    timed = permutation_asset(
        "timed",
        source=source,
        filter="NOT isnan(t)",
        split=TimeSplit(column="t", ratios=[0.5, 0.5]),
    )
    run([source, hashed, timed])
    assert run.metadata(hashed.key)["dagster/row_count"] == 90
    assert run.metadata(timed.key)["dagster/row_count"] == 97


# ------------------------------------------------------------------ writers and credentials
def test_an_append_that_loses_to_an_overwrite_says_so_and_loses_nothing(
    db: LanceDBResource,
) -> None:
    """A real second writer overwrites the table while the append streams its batches."""
    from perm_assets.tables import ConcurrentWriteError

    write_table(db.connect(), "rows", make_rows(10), WriteMode.OVERWRITE)
    schema = make_rows(1).schema

    def batches():
        yield from make_rows(5, start=10).to_batches()
        other = LanceDBResource(uri=db.uri).connect()  # another writer, its own connection
        other.open_table("rows").add(make_rows(3, start=100), mode="overwrite")
        yield from make_rows(5, start=15).to_batches()

    stream = pa.RecordBatchReader.from_batches(schema, batches())
    with pytest.raises(
        ConcurrentWriteError, match=r"table 'rows': another process replaced the table"
    ):
        write_table(db.connect(), "rows", stream, WriteMode.APPEND)
    assert db.open_table("rows").to_arrow().column("id").to_pylist() == [100, 101, 102]


def test_a_proxy_url_with_credentials_is_never_pickled_verbatim() -> None:
    import pickle

    from perm_assets.views import WorkerConnection

    secret = "http://user:s3cret@proxy.internal:3128"
    with pytest.raises(pickle.PicklingError, match=r"storage option 'proxy_url'"):
        WorkerConnection.capture("s3://b/db", {"proxy_url": secret}, asset="a", environ={})
    captured = WorkerConnection.capture(
        "s3://b/db", {"proxy_url": secret}, asset="a", environ={"PROXY_URL": secret}
    )
    assert captured.env == (("proxy_url", "PROXY_URL"),) and "s3cret" not in repr(captured)
    plain = WorkerConnection.capture(
        "s3://b/db", {"proxy_url": "http://proxy.internal:3128"}, asset="a", environ={}
    )
    assert plain.options == (("proxy_url", "http://proxy.internal:3128"),)


def test_a_hash_split_on_a_column_named_with_a_space_builds(db: LanceDBResource) -> None:
    data = make_rows(200).rename_columns(["user id", "label", "group", "value", "name"])
    table = write_table(db.connect(), "spaced", data, WriteMode.OVERWRITE)
    spec = PermutationSpec(split=HashSplit(columns=["user id"], weights=[1, 1]))
    assert build_permutation(table, spec, asset="spaced_perm").num_rows == 200
