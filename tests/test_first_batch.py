"""Reads by position without lancedb's offset map: same rows, same order, as lancedb's path.

lancedb 0.40's ``Permutation.take_offsets`` builds an offset map of the whole split on its first
call (39 s at 72M rows). Views now read the split's row ids and take base rows by id
(`perm_assets.reader`); these tests compare every read path against lancedb's own
``Permutation.take_offsets`` / ``iter`` on real tables: shuffled splits, folds, shards,
skip/take, identity views, and a hand-written permutation table whose splits interleave over
several fragments. A spy reader makes sure the project's paths never ask lancedb's reader to
take by offset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch
from lancedb.permutation import Permutation
from torch.utils.data import DataLoader, default_convert

from perm_assets import (
    KFold,
    LanceDBResource,
    PermutationView,
    RandomSplit,
    Shuffle,
    folds_asset,
    permutation_asset,
)
from perm_assets.errors import LineageError
from perm_assets.training import BatchLoader, shard
from perm_assets.views import ViewRequest, open_view
from tests.conftest import Runner, make_rows

ROWS = 3_000


def lancedb_take(view: Permutation, offsets: np.ndarray) -> pa.RecordBatch:
    """lancedb's own take by offset (its offset map), as Arrow."""
    arrow = view.with_format("arrow")
    return Permutation.take_offsets(arrow, offsets.tolist())


def lancedb_rows(view: Permutation) -> pa.Table:
    """Every row of ``view`` through lancedb's own stream (``Permutation.iter``), as Arrow."""
    arrow = view.with_format("arrow")
    return pa.Table.from_batches(list(Permutation.iter(arrow, 256, False)))


def as_table(batches: Any) -> pa.Table:
    return pa.Table.from_batches(list(batches))


class RefusingReader:
    """Stands in for lancedb's reader: answers counts and streams, refuses take by offset."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "take_offsets":
            raise AssertionError("lancedb's take_offsets (offset map of the whole split) called")
        return getattr(self.inner, name)


def refusing(view: PermutationView) -> PermutationView:
    view._ensure_open()
    view.reader = RefusingReader(view.reader)  # type: ignore[assignment]
    return view


@pytest.fixture
def splits(run: Runner, db: LanceDBResource) -> LanceDBResource:
    def rows() -> pa.Table:
        return make_rows(ROWS)

    source = dg.asset(name="rows")(rows)
    split = permutation_asset(
        "splits",
        source=source,
        split=RandomSplit(ratios=[0.7, 0.2, 0.1], seed=3, split_names=["train", "val", "test"]),
        shuffle=Shuffle(seed=5),
    )
    folds = folds_asset("folds", source=source, folds=KFold(k=3, seed=2, shuffle=True))
    run([source, split, folds])
    return db


def view_of(db: LanceDBResource, table: str, **request: Any) -> PermutationView:
    request.setdefault("columns", ["id", "value", "name"])
    return open_view(
        db, asset=table, table=table, version=None, request=ViewRequest(format="arrow", **request)
    )


VIEWS = [
    ("splits", {"split": "train"}),
    ("splits", {"split": "val"}),
    ("splits", {"split": "test", "columns": ["name", "id"]}),
    ("folds", {"split": "train", "fold": 1}),
    ("folds", {"split": "validation", "fold": 2}),
    ("rows", {}),
]


@pytest.mark.parametrize(("table", "request_"), VIEWS)
def test_take_by_position_equals_lancedbs_offset_map(
    splits: LanceDBResource, table: str, request_: dict[str, Any]
) -> None:
    view = view_of(splits, table, **request_)
    rng = np.random.default_rng(0)
    for candidate in (view, view.with_skip(17), view.with_skip(5).with_take(101)):
        n = len(candidate)
        assert n > 0
        offsets = rng.permutation(n)[: min(n, 500)]
        offsets = np.concatenate([offsets, offsets[:7], [0, n - 1]])  # repeats and both ends
        expected = lancedb_rows(candidate).take(offsets).combine_chunks().to_batches()[0]
        if table != "rows":
            # lancedb's identity view ignores skip and take in take_offsets (offset 20 of a
            # 10-row view answers): its own stream, which honours them, is the reference.
            assert lancedb_take(candidate, offsets).equals(expected)
        assert refusing(candidate).take_offsets(offsets).equals(expected)
        assert candidate.__getitems__(offsets.tolist()).equals(expected)


@pytest.mark.parametrize(("table", "request_"), VIEWS)
def test_batch_loader_and_shards_read_the_views_order(
    splits: LanceDBResource, table: str, request_: dict[str, Any]
) -> None:
    view = view_of(splits, table, **request_)
    for candidate in (view, view.with_skip(33).with_take(200)):
        whole = lancedb_rows(candidate)
        loaded = as_table(BatchLoader(refusing(candidate), 64, io_bytes=1024))
        assert loaded.equals(whole)
        for rank in range(2):
            part = shard(candidate, rank=rank, world_size=2, seed=4, epoch=1)
            expected = whole.take(part.offsets).combine_chunks().to_batches()[0]
            got = as_table(BatchLoader(part, 50, io_bytes=4096))
            assert got.equals(pa.Table.from_batches([expected]))
            indices = list(range(3, 40))
            assert part.__getitems__(indices).equals(expected.slice(3, 37))


def test_interleaved_splits_over_many_fragments(tmp_path: Path) -> None:
    """A permutation table lancedb's builder could write: splits interleaved, five fragments
    in both tables; the stored order of each split is what lancedb reads."""
    connection = lancedb.connect(tmp_path / "db")
    base = connection.create_table("base", make_rows(400))
    for start in range(400, 2_000, 400):  # one fragment per add
        base.add(make_rows(400, start=start))
    addresses = base.search().select(["id"]).with_row_id(True).to_arrow()
    rng = np.random.default_rng(1)
    order = rng.permutation(addresses.num_rows)
    row_id = addresses.column("_rowid").to_numpy()[order].astype(np.uint64)
    split_id = rng.integers(0, 3, row_id.size).astype(np.uint64)
    schema = pa.schema(
        [pa.field("row_id", pa.uint64()), pa.field("split_id", pa.uint64(), nullable=False)],
        metadata={"split_names": '["a", "b", "c"]', "base_version": str(base.version)},
    )
    data = pa.table([row_id, split_id], schema=schema)
    stored = connection.create_table("perm", data.slice(0, 500))
    for start in range(500, 2_000, 500):
        stored.add(data.slice(start, 500))
    for split in range(3):
        opened = PermutationView.from_tables(base, stored, split)
        view = cast(PermutationView, opened.select_columns(["id", "name"]).with_format("arrow"))
        expected = lancedb_rows(view)
        assert expected.num_rows == int((split_id == split).sum())
        offsets = np.arange(len(view))[::-1]
        taken = lancedb_take(view, offsets)
        loader = BatchLoader(refusing(view), 100, io_bytes=1600)
        assert as_table(loader).equals(expected)
        assert view.take_offsets(offsets).equals(taken)
        # A resumed pass streams the split's row ids from the permutation table itself.
        state = {**loader.state_dict(), "position": 100}
        loader.load_state_dict(state)
        assert as_table(loader).equals(expected.slice(100))


def test_offsets_out_of_range_are_refused(splits: LanceDBResource) -> None:
    view = view_of(splits, "splits", split="test").with_skip(10)
    n = len(view)
    with pytest.raises(IndexError, match=f"offset {n} is out of range for a view of {n:,} rows"):
        view.take_offsets([0, n])
    with pytest.raises(IndexError, match="offset -1"):
        view.take_offsets([-1])


def test_rows_missing_at_the_pinned_version_are_an_error_not_fewer_rows(
    splits: LanceDBResource,
) -> None:
    view = view_of(splits, "splits", split="train")
    ids = view.split_rows()
    assert ids is not None
    wanted = np.concatenate([ids.all()[:3], [np.uint64(10**12)]])
    with pytest.raises(LineageError, match=r"asked 4, got 3.*1000000000000"):
        view.take_row_ids(wanted)


def test_the_first_batch_does_not_wait_for_the_whole_split(splits: LanceDBResource) -> None:
    """A plain pass streams the split's row ids: the first read needs only the first ones."""
    view = view_of(splits, "splits", split="train")
    rows = view.split_rows()
    assert rows is not None
    first = next(iter(BatchLoader(view, 8, io_bytes=128)))
    assert first.num_rows == 8
    assert rows._all is None  # the whole split's row ids were never read into memory
    assert first.equals(lancedb_take(view, np.arange(8)))


@pytest.mark.parametrize(("table", "request_"), VIEWS)
def test_opening_a_view_and_its_first_batch_never_build_lancedbs_reader(
    splits: LanceDBResource, table: str, request_: dict[str, Any]
) -> None:
    """lancedb's reader counts the split over the whole permutation table when built (~1 s at
    100M rows): opening, len, schema and a BatchLoader's batches do without it, and give
    lancedb's own answers."""
    view = view_of(splits, table, **request_)
    assert view.reader is None
    length, schema = len(view), view.schema
    first = next(iter(BatchLoader(view, 64)))
    assert view.reader is None

    split = None if view.permutation_table is None else view.split  # identity: no split
    lancedbs = Permutation.from_tables(view.base_table, view.permutation_table, split)
    lancedbs = lancedbs.select_columns(list(view.selection.values()))
    if view.offset is not None or view.limit is not None:  # a fold's range of its table
        lancedbs = lancedbs.with_skip(view.offset or 0)
        lancedbs = lancedbs.with_take(view.limit) if view.limit is not None else lancedbs
    assert length == len(lancedbs) > 0
    assert schema.equals(lancedbs.schema, check_metadata=True)
    assert schema.remove_metadata() == first.schema  # batches carry no schema metadata
    assert first.equals(lancedb_take(lancedbs, np.arange(first.num_rows)))


def test_a_views_schema_names_renamed_and_row_id_columns_as_lancedb_does(
    splits: LanceDBResource,
) -> None:
    view = view_of(splits, "splits", split="val")
    for selection in ({"v": "value", "rid": "_rowid"}, {"_rowid": "_rowid", "name": "name"}):
        renamed = view._with_selection(selection)
        lancedbs = Permutation.from_tables(view.base_table, view.permutation_table, view.split)
        expected = lancedbs._with_selection(selection).schema
        assert renamed.schema.equals(expected, check_metadata=True)
    assert view.reader is None


def test_recorded_split_ranges_answer_takes_without_reading_the_whole_split(
    run: Runner, db: LanceDBResource
) -> None:
    """The first batch of a map-style worker or a shard reads only the row ids it needs."""
    source = dg.asset(name="rows")(lambda: make_rows(ROWS))
    splits = permutation_asset(
        "ranged",
        source=source,
        split=RandomSplit(ratios=[0.5, 0.3, 0.2], seed=5, split_names=["a", "b", "c"]),
        shuffle=Shuffle(seed=6),
    )
    run([source, splits])
    request = ViewRequest(split="b", columns=["id"], format="arrow")
    full = open_view(db, asset="ranged", table="ranged", version=None, request=request)
    expected = lancedb_rows(full).column("id").to_numpy()
    view = open_view(db, asset="ranged", table="ranged", version=None, request=request)
    rows = view.split_rows()
    assert rows is not None and rows._range is not None

    def whole_split_read() -> Any:
        raise AssertionError("the whole split's row ids were read")

    rows._scan = whole_split_read  # type: ignore[method-assign]
    positions = np.random.default_rng(1).permutation(len(expected))[:300]
    got = view.take_offsets(positions).column("id").to_numpy()
    assert np.array_equal(got, expected[positions])
    with pytest.raises(IndexError, match=f"offset {len(expected)} is out of range"):
        view.take_offsets([len(expected)])


def test_split_ranges_that_do_not_match_the_split_ids_are_refused(tmp_path: Path) -> None:
    db = LanceDBResource(uri=str(tmp_path / "db"))
    connection = db.connect()
    connection.create_table("base", make_rows(10))
    # Splits interleave, but the metadata claims split 1 is rows 5..9.
    bad = pa.table(
        {
            "row_id": pa.array(range(10), pa.uint64()),
            "split_id": pa.array([0, 1] * 5, pa.uint64()),
        }
    ).replace_schema_metadata(
        {
            "split_names": '["x", "y"]',
            "base_version": "1",
            "perm_assets.base_table": "base",
            "perm_assets.split_ranges": "[[0, 5], [5, 5]]",
        }
    )
    connection.create_table("perm", bad)
    view = open_view(
        db, asset="perm", table="perm", version=None, request=ViewRequest(split="y", format="arrow")
    )
    with pytest.raises(LineageError, match=r"split ranges metadata places split 1"):
        view.take_offsets([0, 1])


@pytest.mark.filterwarnings("ignore:lancedb fork support is experimental:RuntimeWarning")
def test_a_shards_first_batch_computes_only_its_own_offsets(
    splits: LanceDBResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default shard order is a bijection evaluated per batch: no randperm of the split
    and no order array before the first batch, in a BatchLoader or a DataLoader worker."""
    view = view_of(splits, "splits", split="train")
    expected = lancedb_rows(view)
    reference = shard(view, rank=1, world_size=2, seed=4, epoch=2)
    whole = expected.take(reference.offsets)

    def randperm(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.randperm of the whole split")

    monkeypatch.setattr(torch, "randperm", randperm)
    part = shard(view, rank=1, world_size=2, seed=4, epoch=2)
    first = next(iter(BatchLoader(part, 64, io_bytes=4096)))
    assert part._offsets is None
    assert as_table([first]).equals(whole.slice(0, 64))
    assert part.__getitems__(list(range(100, 164))).equals(
        whole.slice(100, 64).combine_chunks().to_batches()[0]
    )
    assert part._offsets is None
    workers = DataLoader(
        part,
        batch_size=64,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=default_convert,
    )
    assert as_table(workers).equals(whole)
