"""PyTorch data loading from views: DataLoader workers, small pickles, rank shards, read-ahead.

Every view comes from a real ``dg.materialize`` run over LanceDB tables in ``tmp_path``; every
DataLoader starts real worker processes. The database's storage options carry a fake secret
from the environment (lancedb accepts storage options for local paths), so each ``spawn`` test
also shows a worker resolving credentials from its own environment.
"""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import pickle
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lancedb.permutation import Permutation
from lancedb.table import Table
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    default_convert,
    get_worker_info,
)

from perm_assets import LanceDBResource, PermutationView, RandomSplit, Shuffle, permutation_asset
from perm_assets.batches import reslice
from perm_assets.errors import LineageError
from perm_assets.forked import ReadPlan
from perm_assets.training import (
    BatchLoader,
    feistel_permute,
    shard,
    shard_length,
    shard_offsets,
    to_tensors,
)
from perm_assets.views import ViewRequest, iter_arrow, open_view, read_arrow
from tests.conftest import Runner, row_ids, table_asset

SECRET_ENV = "PERM_ASSETS_TEST_SECRET"
ROWS = 1_000
TRAIN_ROWS = 800
COLUMNS = ["id", "label"]
BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_torch.py"

# lancedb resets its runtime in a forked child and warns there (its own, known limitation);
# under pytest's "error" filter the warning would be raised inside the at-fork hook.
FORK_WARNING = "ignore:lancedb fork support is experimental:RuntimeWarning"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = f"fake-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv(SECRET_ENV, value)
    return value


@pytest.fixture
def db(tmp_path: Path, secret: str) -> LanceDBResource:
    """conftest's database, plus storage options as a deployment would give them."""
    return LanceDBResource(
        uri=str(tmp_path / "lancedb"),
        storage_options={
            "aws_secret_access_key": dg.EnvVar(SECRET_ENV),
            "region": "eu-west-1",
        },
    )


def materialize_view(run: Runner, request: dict[str, Any], *, rows: int = ROWS) -> PermutationView:
    """The view of split 'train' that the IO manager hands a consuming asset."""
    source = table_asset("rows", rows)
    splits = permutation_asset(
        "splits",
        source=source,
        split=RandomSplit(ratios=[0.8, 0.2], seed=3, split_names=["train", "test"]),
        shuffle=Shuffle(seed=5),
    )
    captured: list[Permutation] = []

    @dg.asset(ins={"train": dg.AssetIn(key=splits.key, metadata={"split": "train", **request})})
    def trainer(train: Permutation) -> dg.MaterializeResult:
        captured.append(train)
        return dg.MaterializeResult()

    run([source, splits, trainer])
    (view,) = captured
    assert isinstance(view, PermutationView)
    return view


def materialize_table_view(run: Runner) -> PermutationView:
    """The identity view of table asset ``rows`` that the IO manager hands a consumer."""
    source = table_asset("rows", ROWS)
    captured: list[Permutation] = []

    @dg.asset(ins={"rows": dg.AssetIn(key=source.key, metadata={"columns": COLUMNS})})
    def reader(rows: Permutation) -> dg.MaterializeResult:
        captured.append(rows)
        return dg.MaterializeResult()

    run([source, reader], selection=[reader])
    (view,) = captured
    assert isinstance(view, PermutationView)
    return view


def split_ids(db: LanceDBResource, split: int = 0) -> list[int]:
    """The persisted split's ``id`` values in stored order, read from the tables themselves."""
    base_ids = db.open_table("rows").to_arrow().column("id").to_numpy()
    # One fragment written at once: a row address is the row's position in the table.
    return base_ids[row_ids(db.open_table("splits").to_arrow(), split)].tolist()


def loader_ids(batches: Iterator[Any], fmt: str) -> list[int]:
    """``id`` of every row a DataLoader delivered, in delivery order; checks ``label`` too."""
    ids: list[torch.Tensor] = []
    for batch in batches:
        if fmt == "torch":  # default collate: {"id": tensor[B], "label": tensor[B]}
            id_col, label_col = batch["id"], batch["label"]
        elif fmt == "torch_row":  # default collate stacks per-row tensors: [B, 2]
            id_col, label_col = batch[:, 0], batch[:, 1]
        else:  # torch_col through default_convert: [2, B]
            id_col, label_col = batch[0], batch[1]
        assert torch.equal(label_col, id_col % 10)  # the row's own label, not another row's
        ids.append(id_col)
    return torch.cat(ids).tolist()


# ------------------------------------------------------------------------------- DataLoader
@pytest.mark.slow
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("fmt", ["torch", "torch_row", "torch_col"])
def test_view_is_a_map_style_dataset_for_dataloader_workers(
    run: Runner, db: LanceDBResource, context: str, fmt: str
) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": fmt})
    # Whole-batch formats come back as one tensor: passed through, not collated per row.
    collate = default_convert if fmt == "torch_col" else None

    loader = DataLoader(
        cast(Dataset[Any], view),
        batch_size=64,
        num_workers=2,
        multiprocessing_context=context,
        collate_fn=collate,
    )
    ids = loader_ids(iter(loader), fmt)

    expected = split_ids(db)
    assert len(expected) == TRAIN_ROWS
    assert ids == expected  # sequential sampler: every row once, in the split's stored order
    assert len(loader) == math.ceil(TRAIN_ROWS / 64)


def helper_of(batch: Any) -> tuple[str, bool, bool]:
    """A collate_fn, so it runs in the worker: the kind of reader that served the batch, and
    whether its helper process has lancedb's and pylance's extensions mapped."""
    info = get_worker_info()
    assert info is not None
    reader: Any = cast(PermutationView, info.dataset).reader
    maps = Path(f"/proc/{reader._process.pid}/maps").read_text()
    return type(reader).__name__, "_lancedb.abi3.so" in maps, "lance.abi3.so" in maps


@pytest.mark.slow
@pytest.mark.filterwarnings(FORK_WARNING)
def test_forked_workers_read_through_a_lean_interpreter_without_lancedb(
    run: Runner, db: LanceDBResource
) -> None:
    """lancedb 0.40 hangs or crashes in some forked children: they must not call into it.
    Their helper reads through pylance alone (its start-up is in the first batch)."""
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})

    loader = DataLoader(
        cast(Dataset[Any], view),
        batch_size=TRAIN_ROWS // 2,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=helper_of,
    )

    assert list(loader) == [("_ForkedReader", False, True)] * 2
    assert view.reader is None  # the parent never needed lancedb's reader (nor got a helper)
    rows = DataLoader(
        cast(Dataset[Any], view),
        batch_size=64,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=lambda b: b,
    )
    got = pa.concat_tables([pa.Table.from_batches([b]) for b in rows])
    assert got.column("id").to_pylist() == split_ids(db)


def _interleaved_passes(view: PermutationView, out: Any) -> None:
    """In a forked child: two passes over ``view`` open at once, read in turn."""
    first, second = iter_arrow(view, 100), iter_arrow(view, 100)
    got: list[list[int]] = [[], []]
    for a, b in itertools.zip_longest(first, second):
        got[0] += a.column("id").to_pylist() if a is not None else []
        got[1] += b.column("id").to_pylist() if b is not None else []
    out.put(got)


@pytest.mark.slow
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("helper", ["lean", "full"])
def test_two_passes_open_at_once_in_a_forked_child_each_read_every_row(
    run: Runner, db: LanceDBResource, helper: str
) -> None:
    """The helper keeps each pass apart (one shared pass used to hand rows to either)."""
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    if helper == "full":  # a factory view is reopened by the full helper
        view = view.with_connection_factory(functools.partial(open_local_table, db.uri))
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_interleaved_passes, args=(view, out))
    child.start()
    got = out.get(timeout=120)
    child.join(timeout=60)

    assert child.exitcode == 0
    assert got == [split_ids(db), split_ids(db)]


def test_a_read_plans_repr_shows_no_storage_option_value() -> None:
    plan = ReadPlan(
        asset="a",
        base_path="/p/rows.lance",
        base_name="rows",
        base_version=1,
        stored_path=None,
        stored_name="rows",
        stored_version=1,
        split=0,
        pin=None,
        stamp=None,
        offset=None,
        limit=None,
        selection={"id": "id"},
        storage_options={"aws_secret_access_key": "S3CR3T-value"},
    )
    assert "S3CR3T-value" not in repr(plan) and "rows.lance" in repr(plan)


@pytest.mark.slow
@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_connection_factory_view_in_a_forked_worker_uses_the_full_helper(
    run: Runner, db: LanceDBResource
) -> None:
    """A view reopened by the user's factory cannot be opened by location: the helper
    unpickles it with lancedb, and reads the same rows."""
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    with_factory = view.with_connection_factory(functools.partial(open_local_table, db.uri))

    loader = DataLoader(
        cast(Dataset[Any], with_factory),
        batch_size=TRAIN_ROWS,
        num_workers=1,
        multiprocessing_context="fork",
        collate_fn=lambda batch: (helper_of(batch), batch),
    )

    ((kind, batch),) = list(loader)
    assert kind == ("_ForkedReader", True, False)
    assert batch.column("id").to_pylist() == split_ids(db)


@pytest.mark.slow
@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_base_table_recreated_after_the_fork_fails_in_the_worker_not_other_rows(
    run: Runner, db: LanceDBResource
) -> None:
    """The lean helper reopens tables by location: it checks the pin as open_view does."""
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    base_version = view.lineage.base_version
    connection = db.connect()
    connection.drop_table("rows")
    # Re-created with other rows, up to the same version number: a plain reopen would read it.
    table = connection.create_table(
        "rows", pa.table({"id": np.arange(5_000, 5_000 + ROWS), "label": np.zeros(ROWS, np.int64)})
    )
    while table.version < base_version:
        table.add(pa.table({"id": np.arange(3), "label": np.zeros(3, np.int64)}))
    loader = DataLoader(
        cast(Dataset[Any], view),
        batch_size=64,
        num_workers=1,
        multiprocessing_context="fork",
        collate_fn=lambda batch: batch,
    )

    with pytest.raises(LineageError, match=rf"pins version {base_version} of base table 'rows'"):
        next(iter(loader))


# ------------------------------------------------------------------------------ pickling
@pytest.mark.slow
def test_pickle_is_small_names_no_secret_and_reopens_the_same_rows(
    run: Runner, db: LanceDBResource, secret: str
) -> None:
    view = materialize_view(run, {"columns": ["id", "value"]}, rows=1_000_000)

    data = pickle.dumps(view)
    lancedb_own = pickle.dumps(Permutation.__getstate__(view))

    assert len(data) < 4096, len(data)
    assert secret.encode() not in data
    assert SECRET_ENV.encode() in data  # the variable's name travels, for the worker to read
    # What lancedb 0.40 would send instead: the whole permutation table and the secret.
    assert len(lancedb_own) > 16_000_000
    assert secret.encode() in lancedb_own

    clone = pickle.loads(data)
    assert isinstance(clone, PermutationView)
    assert clone.lineage == view.lineage
    assert clone.num_rows == view.num_rows == 800_000
    assert clone.selected_columns == ["id", "value"]
    first = next(iter_arrow(clone, 4096))
    assert first.equals(next(iter_arrow(view, 4096)))


def test_unpickled_view_keeps_skip_take_format_and_batch_size(run: Runner) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow", "batch_size": 7})
    narrowed = view.with_skip(10).with_take(100)

    clone = pickle.loads(pickle.dumps(narrowed))

    batches: list[pa.RecordBatch] = list(clone)
    original: list[pa.RecordBatch] = list(narrowed)
    # lancedb aligns a skipped view's reads to the unskipped grid (10 % 7 = 3, so 4 rows
    # first); the view re-slices them into batches of exactly the size asked for.
    assert [b.num_rows for b in batches] == [7] * 14 + [2]
    assert [b.num_rows for b in original] == [7] * 14 + [2]
    rows = pa.Table.from_batches(batches)
    assert rows.equals(pa.Table.from_batches(original))
    assert rows.column_names == COLUMNS and len(clone) == 100
    # BatchLoader gives the same exact batches, same rows.
    exact = list(BatchLoader(clone, 7, io_bytes=7 * 16))
    assert [b.num_rows for b in exact] == [7] * 14 + [2]
    assert pa.Table.from_batches(exact).equals(rows)


def test_unpickled_views_stay_at_their_pinned_versions(run: Runner, db: LanceDBResource) -> None:
    """Re-materializing the source and the permutation does not move an unpickled view."""
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    before = read_arrow(view)
    data = pickle.dumps(view)
    identity = materialize_table_view(run)  # all rows of the table asset, in stored order
    identity_data = pickle.dumps(identity)

    smaller = table_asset("rows", 50)
    run([smaller, permutation_asset("splits", source=smaller, shuffle=Shuffle(seed=9))])
    assert db.open_table("rows").count_rows() == 50

    assert read_arrow(pickle.loads(data)).equals(before)
    # lancedb's own pickle of an identity view reopens the latest version: 50 rows here.
    assert read_arrow(pickle.loads(identity_data)).equals(read_arrow(identity))
    assert pickle.loads(identity_data).num_rows == ROWS


def test_literal_secret_is_refused_and_never_printed(run: Runner, tmp_path: Path) -> None:
    materialize_view(run, {})
    literal = f"literal-{uuid.uuid4().hex}"
    literal_db = LanceDBResource(
        uri=str(tmp_path / "lancedb"), storage_options={"aws_secret_access_key": literal}
    )
    view = open_view(
        literal_db, asset="splits", table="splits", version=None, request=ViewRequest(split=0)
    )

    with pytest.raises(pickle.PicklingError, match="aws_secret_access_key") as info:
        pickle.dumps(view)
    assert literal not in str(info.value)


def test_unpickling_without_the_variable_names_it(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pickle.dumps(materialize_view(run, {}))
    monkeypatch.delenv(SECRET_ENV)

    with pytest.raises(pickle.UnpicklingError, match=SECRET_ENV):
        pickle.loads(data)


def open_local_table(uri: str, name: str) -> Table:
    """A connection factory, as lancedb's ``with_connection_factory`` documents them."""
    return lancedb.connect(uri).open_table(name)


def test_a_connection_factory_is_pickled_instead_of_storage_options(
    run: Runner, db: LanceDBResource, secret: str
) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    with_factory = view.with_connection_factory(functools.partial(open_local_table, db.uri))

    data = pickle.dumps(with_factory)

    assert SECRET_ENV.encode() not in data and secret.encode() not in data
    assert read_arrow(pickle.loads(data)).equals(read_arrow(view))


# -------------------------------------------------------------------------------- shards
class _Sized(Dataset[int]):
    """What DistributedSampler needs of a dataset: its length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


@settings(max_examples=150, deadline=None)
@given(
    num_rows=st.integers(0, 400),
    world_size=st.integers(1, 9),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    shuffle=st.booleans(),
    remainder=st.sampled_from(["drop", "pad"]),
    order=st.sampled_from(["bijection", "distributed_sampler"]),
)
def test_shards_are_equal_disjoint_and_cover_the_split(
    num_rows: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    remainder: Any,
    order: Any,
) -> None:
    layout: dict[str, Any] = {
        "world_size": world_size,
        "seed": seed,
        "epoch": epoch,
        "shuffle": shuffle,
        "remainder": remainder,
        "order": order,
    }
    shards = [shard_offsets(num_rows, rank=r, **layout) for r in range(world_size)]
    length = shard_length(num_rows, world_size, remainder)
    assert [len(s) for s in shards] == [length] * world_size
    every = np.concatenate(shards)
    counts = np.bincount(every, minlength=num_rows)
    assert len(counts) == num_rows  # no offset outside the split
    if remainder == "drop":
        assert counts.max(initial=0) <= 1  # disjoint
        assert num_rows - every.size == num_rows % world_size <= world_size - 1
    else:
        assert counts.min(initial=1) >= 1  # every row
        assert every.size - num_rows == (-num_rows) % world_size <= world_size - 1
    # Any positions computed alone equal those of the whole shard (how batches compute them).
    for rank, offsets in enumerate(shards):
        positions = np.random.default_rng(seed).permutation(length)[:50]
        alone = shard_offsets(num_rows, rank=rank, positions=positions, **layout)
        assert np.array_equal(alone, offsets[positions])
    if order == "bijection" and shuffle:
        return
    # Exactly torch's DistributedSampler, rank by rank.
    for rank, offsets in enumerate(shards):
        sampler = DistributedSampler(
            _Sized(num_rows),
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=remainder == "drop",
        )
        sampler.set_epoch(epoch)
        assert offsets.tolist() == list(sampler)
    # Deterministic per (seed, epoch): every rank can compute it alone.
    assert np.array_equal(shard_offsets(num_rows, rank=0, **layout), shards[0])


@pytest.mark.parametrize("num_rows", [1, 2, 3, 1000, 1024, 1025, 100_003])
def test_the_bijection_is_a_seeded_uniform_looking_permutation(num_rows: int) -> None:
    everything = np.arange(num_rows)
    order = feistel_permute(everything, num_rows, seed=7, epoch=0)
    assert np.array_equal(np.sort(order), everything)  # a permutation of [0, n)
    assert np.array_equal(order, feistel_permute(everything, num_rows, seed=7, epoch=0))
    if num_rows < 1000:
        return
    # Shuffled like a uniform permutation: adjacent entries jump n / 3 on average, almost
    # never to a neighbour, positions and values uncorrelated; epochs and seeds differ.
    jumps = np.abs(np.diff(order))
    assert 0.95 < jumps.mean() / (num_rows / 3) < 1.05
    assert np.mean(jumps == 1) < 0.01
    assert abs(np.corrcoef(everything, order)[0, 1]) < 0.1
    for other in (
        feistel_permute(everything, num_rows, seed=7, epoch=1),
        feistel_permute(everything, num_rows, seed=8, epoch=0),
    ):
        assert np.mean(other == order) < 0.01


def test_bad_shard_order_seed_or_position_is_refused() -> None:
    with pytest.raises(ValueError, match="order must be 'bijection' or 'distributed_sampler'"):
        shard_offsets(10, rank=0, world_size=2, order=cast(Any, "random"))
    with pytest.raises(ValueError, match="seed >= 0"):
        shard_offsets(10, rank=0, world_size=2, seed=-1)
    with pytest.raises(IndexError, match="position 5 is out of range for a shard of 5 rows"):
        shard_offsets(10, rank=0, world_size=2, positions=np.array([0, 5]))
    with pytest.raises(IndexError, match="position -1"):
        shard_offsets(
            10, rank=1, world_size=2, order="distributed_sampler", positions=np.array([-1])
        )


@pytest.mark.parametrize(("rank", "world_size"), [(-1, 2), (2, 2), (0, 0)])
def test_bad_rank_is_refused(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        shard_offsets(10, rank=rank, world_size=world_size)


@pytest.mark.slow
@pytest.mark.filterwarnings(FORK_WARNING)
def test_rank_shards_of_a_real_split_reshuffle_per_epoch(run: Runner, db: LanceDBResource) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    expected = np.asarray(split_ids(db))
    world_size = 3  # 800 rows: 2 left out by 'drop', 1 repeated by 'pad'

    def delivered(epoch: int, remainder: Any) -> list[list[int]]:
        shards = [
            shard(view, rank=r, world_size=world_size, seed=11, epoch=epoch, remainder=remainder)
            for r in range(world_size)
        ]
        out = []
        for s in shards:
            ids = pa.Table.from_batches(list(BatchLoader(s, 50))).column("id").to_pylist()
            assert ids == expected[s.offsets].tolist()  # the shard's rows, in its order
            out.append(ids)
        return out

    epoch0 = delivered(0, "drop")
    assert [len(ids) for ids in epoch0] == [266] * 3
    flat = [i for ids in epoch0 for i in ids]
    assert len(set(flat)) == len(flat) == 798 and set(flat) <= set(expected.tolist())

    epoch1 = delivered(1, "drop")
    assert epoch1 != epoch0  # reshuffled without a new materialization
    assert delivered(1, "drop") == epoch1  # and reproducible

    padded = delivered(0, "pad")
    assert [len(ids) for ids in padded] == [267] * 3
    assert {i for ids in padded for i in ids} == set(expected.tolist())

    # The same shard as a map-style dataset in forked DataLoader workers, and torch's own
    # DistributedSampler over the view: the same rows in the same order.
    rank1 = shard(view, rank=1, world_size=world_size, seed=11, epoch=1)
    assert rank1.order == "bijection"
    workers = DataLoader(
        rank1,
        batch_size=50,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=default_convert,
    )
    from_workers = [i for b in workers for i in b.column("id").to_pylist()]
    assert from_workers == epoch1[1]
    # order="distributed_sampler": torch's own DistributedSampler over the view, row for row.
    like_torch = shard(
        view, rank=1, world_size=world_size, seed=11, epoch=1, order="distributed_sampler"
    )
    ids = pa.Table.from_batches(list(BatchLoader(like_torch, 50))).column("id").to_pylist()
    assert sorted(ids) != ids and ids != epoch1[1]
    dataset = cast(Dataset[Any], view)  # a Dataset by protocol, not by subclass
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=1, seed=11, drop_last=True)
    sampler.set_epoch(1)
    with_sampler = DataLoader(dataset, batch_size=50, sampler=sampler, collate_fn=default_convert)
    assert [i for b in with_sampler for i in b.column("id").to_pylist()] == ids

    assert len(pickle.dumps(rank1)) < 4096  # offsets are recomputed, not shipped


# ----------------------------------------------------------------------------- BatchLoader
def test_batch_loader_delivers_the_view_in_order_in_any_batch_size(
    run: Runner, db: LanceDBResource
) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    expected = split_ids(db)

    for batch_size in (1, 7, 64, 800, 1000):
        for io_bytes in (1, 2_000, 10_000_000):
            loader = BatchLoader(view, batch_size, io_bytes=io_bytes, prefetch=2)
            batches = list(loader)

            sizes = [b.num_rows for b in batches]
            full, rest = divmod(TRAIN_ROWS, batch_size)
            assert sizes == [batch_size] * full + ([rest] if rest else [])
            assert len(loader) == len(batches)
            assert pa.Table.from_batches(batches).column("id").to_pylist() == expected
            # I/O batches: whole training batches, within io_bytes unless one batch is larger.
            assert loader.row_bytes == 16  # two int64 columns
            assert loader.io_rows % batch_size == 0
            assert loader.io_rows == batch_size or loader.io_rows * 16 <= io_bytes


def test_batch_loader_applies_the_view_format_and_drops_last_on_request(run: Runner) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": "torch_col"})

    batches = list(BatchLoader(view, 300, io_bytes=1_000, drop_last=True))

    assert [tuple(b.shape) for b in batches] == [(2, 300), (2, 300)]
    expected: list[Any] = list(view.iter(300, skip_last_batch=True))
    assert all(torch.equal(a, b) for a, b in zip(batches, expected, strict=True))

    # cast: lancedb annotates the transform as Callable[pa.RecordBatch, Any], an invalid form.
    tensors = next(iter(BatchLoader(view.with_transform(cast(Any, to_tensors)), 5)))
    assert set(tensors) == {"id", "label"} and tensors["id"].shape == (5,)
    assert torch.equal(tensors["label"], tensors["id"] % 10)


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "perm-assets-read-ahead"]


def test_batch_loader_stops_its_thread_when_the_loop_stops_early(run: Runner) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    batches = iter(BatchLoader(view, 10, io_bytes=160, prefetch=1))

    next(batches)
    assert len(_read_ahead_threads()) == 1
    batches.close()  # what `break` does to the loop's iterator

    assert _read_ahead_threads() == []


def test_batch_loader_raises_read_errors_in_the_training_loop(
    run: Runner, db: LanceDBResource
) -> None:
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"})
    loader = BatchLoader(view, 10, io_bytes=160)
    db.connect().drop_table("rows")  # the base table's files are gone

    with pytest.raises(Exception, match=r"(?i)not found|no such file"):
        list(loader)
    assert _read_ahead_threads() == []


@settings(max_examples=100, deadline=None)
@given(
    reads=st.lists(st.integers(0, 40), max_size=12),
    batch_size=st.integers(1, 25),
    drop_last=st.booleans(),
)
def test_reslice_concatenates_across_uneven_reads(
    reads: list[int], batch_size: int, drop_last: bool
) -> None:
    starts = np.cumsum([0, *reads])
    batches = [
        pa.record_batch({"id": np.arange(a, b, dtype=np.int64)})
        for a, b in itertools.pairwise(starts)
    ]

    out = list(reslice(batches, batch_size, drop_last=drop_last))

    total = int(starts[-1])
    full, rest = divmod(total, batch_size)
    expected_sizes = [batch_size] * full + ([rest] if rest and not drop_last else [])
    assert [b.num_rows for b in out] == expected_sizes
    ids = [i for b in out for i in b.column("id").to_pylist()]
    assert ids == list(range(len(ids)))


# ------------------------------------------------------------------------------ benchmark
@pytest.mark.slow
def test_bench_torch_runs_and_prints_its_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--rows",
            "20000",
            "--budget",
            "1",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for variant in ("perm_assets BatchLoader", "Permutation", "StreamingDataset", "HF datasets"):
        assert re.search(rf"^\s*\(\d\) {variant}.*rows/s", out, re.MULTILINE), out
    ratio = re.search(r"^ratio project/HF = (\S+)x", out, re.MULTILINE)
    assert ratio is not None and float(ratio.group(1)) > 0, out
    assert "same rows in the same order as Permutation.iter: True" in out
    clumps = re.findall(r"^clump_size\s+(\d+)\s", out, re.MULTILINE)
    assert clumps == ["1", "64", "1024"], out


def test_a_restricted_view_opens_its_reader_once_for_every_pass(run: Runner) -> None:
    """Each pass used to build lancedb's reader anew (a helper process per epoch when forked)."""
    view = materialize_view(run, {"columns": COLUMNS, "format": "arrow"}).restricted(10, 50)
    built: list[int] = []
    original = PermutationView._build_reader

    async def counting(self: PermutationView) -> Any:
        built.append(1)
        return await original(self)

    PermutationView._build_reader = counting  # type: ignore[method-assign]
    try:
        passes = [pa.Table.from_batches(list(view.iter(8))) for _ in range(3)]
    finally:
        PermutationView._build_reader = original  # type: ignore[method-assign]
    assert len(built) == 1
    assert passes[0].num_rows == 50 and passes[0].equals(passes[2])
