"""The pinned local column cache: same rows as lancedb's take, one fetch across processes,
re-created tables never hit old entries, damaged entries refetched, least recently used out."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest
from lancedb.permutation import Permutation
from torch.utils.data import DataLoader, default_convert

from perm_assets import (
    KFold,
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    Shuffle,
    ViewRequest,
    folds_asset,
    open_view,
    permutation_asset,
    views,
)
from perm_assets import cache as cache_module
from perm_assets.cache import ColumnCache
from perm_assets.errors import LineageError
from perm_assets.lineage import load_view
from perm_assets.training import BatchLoader, shard
from perm_assets.views import PermutationView
from tests.conftest import Runner, table_asset
from tests.processes import REPO, child_env

N = 20_000


def _rows(n: int, *, shift: int = 0) -> pa.Table:
    ids = np.arange(n, dtype=np.int64)
    return pa.table(
        {
            "id": ids + shift,
            "label": (ids % 7).astype(np.int32),
            "x": (ids * 0.25).astype(np.float32),
            "flag": ids % 2 == 0,
            "vec": pa.FixedSizeListArray.from_arrays(
                pa.array(np.repeat(ids, 4).astype(np.float32) + np.tile(np.arange(4), n)), 4
            ),
            "name": pa.array([f"r{i}" for i in ids]),
        }
    )


@pytest.fixture
def table(tmp_path: Path) -> lancedb.table.Table:
    db = lancedb.connect(tmp_path / "db")
    # Several fragments, and a deletion that leaves a hole in the row addresses.
    tbl = db.create_table("base", _rows(N // 2))
    tbl.add(_rows(N // 2, shift=N // 2))
    tbl.delete("id % 1000 = 3")
    return tbl


def _take(tbl: lancedb.table.Table, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """lancedb's own take, put in the order asked (it returns address order)."""
    found = tbl.take_row_ids(np.unique(ids).tolist()).with_row_id().select(columns).to_arrow()
    order = np.searchsorted(found.column("_rowid").to_numpy(), ids)
    return found.take(pa.array(order)).select(columns)


def _all_ids(tbl: lancedb.table.Table) -> np.ndarray:
    scan = tbl.search().select(["id"]).with_row_id(True).to_arrow()
    return scan.column("_rowid").to_numpy()


def test_cached_gathers_equal_lancedb_take_in_any_order(
    table: lancedb.table.Table, tmp_path: Path
) -> None:
    columns = ["id", "label", "x", "flag", "vec", "name"]
    entry = ColumnCache(tmp_path / "cache", 1 << 30).open(table, columns, pin="p1", what="view")
    ids = np.random.default_rng(0).permutation(_all_ids(table))[:5_000]
    got = entry.take(ids, {c: c for c in columns})
    expected = _take(table, ids, columns)
    assert pa.Table.from_batches([got]).equals(expected)
    # Renamed outputs and the row id itself, as lancedb's selection maps them.
    renamed = entry.take(ids[:10], {"row": "_rowid", "label_out": "label"})
    assert renamed.column("row").to_numpy().tolist() == ids[:10].tolist()
    assert renamed.schema.field("label_out").type == pa.int32()


def test_a_row_id_outside_the_entry_is_refused(table: lancedb.table.Table, tmp_path: Path) -> None:
    entry = ColumnCache(tmp_path / "cache", 1 << 30).open(table, ["id"], pin=None, what="view")
    deleted = np.array([3], dtype=np.uint64)  # id 3 was deleted: its address is a hole
    with pytest.raises(LineageError, match=r"has no row ids \[3\]"):
        entry.take(deleted, {"id": "id"})


def test_a_recreated_table_or_another_pin_never_hits_the_old_entry(tmp_path: Path) -> None:
    db = lancedb.connect(tmp_path / "db")
    cache = ColumnCache(tmp_path / "cache", 1 << 30)
    first = db.create_table("base", _rows(100))
    old = cache.open(first, ["id"], pin="p", what="view")
    db.drop_table("base")
    second = db.create_table("base", _rows(100, shift=1_000))  # same name, same version 1
    assert second.version == first.version
    new = cache.open(second, ["id"], pin="p", what="view")
    assert new.folder != old.folder
    assert new.take(np.array([0], np.uint64), {"id": "id"}).column("id")[0].as_py() == 1_000
    assert cache.open(second, ["id"], pin="q", what="view").folder != new.folder


def test_several_processes_fetch_once_and_read_the_same_rows(
    table: lancedb.table.Table, tmp_path: Path
) -> None:
    script = (
        "import json, sys, lancedb, numpy as np\n"
        "from perm_assets.cache import ColumnCache\n"
        "tbl = lancedb.connect(sys.argv[1]).open_table('base')\n"
        "entry = ColumnCache(sys.argv[2], 1 << 30).open(tbl, ['x', 'vec'], pin='p', what='w')\n"
        "ids = tbl.search().select(['id']).with_row_id(True).to_arrow().column('_rowid')\n"
        "got = entry.take(np.asarray(ids)[::-1], {'x': 'x'}).column('x').to_numpy()\n"
        "print(json.dumps({'by': entry.manifest['fetched_by_pid'], 'sum': float(got.sum()),\n"
        "                  'first': float(got[0])}))\n"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "db"), str(tmp_path / "cache")],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [json.loads(child.communicate(timeout=120)[0]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert len({r["by"] for r in results}) == 1  # one fetch, published for everyone
    assert results[0]["by"] in {child.pid for child in children}
    assert len({(r["sum"], r["first"]) for r in results}) == 1
    published = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(published) == 1 and ".tmp-" not in published[0].name


@pytest.mark.parametrize("damage", ["truncate", "flip_a_bit"])
def test_a_damaged_entry_is_fetched_again(
    table: lancedb.table.Table, tmp_path: Path, damage: str
) -> None:
    cache = ColumnCache(tmp_path / "cache", 1 << 30)
    entry = cache.open(table, ["x"], pin=None, what="view")
    column = entry.folder / entry.manifest["fixed"]["x"]
    data = bytearray(column.read_bytes())
    if damage == "truncate":
        column.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x10
        column.write_bytes(bytes(data))
    cache_module._VERIFIED.clear()  # a new process: it verifies entries once
    again = cache.open(table, ["x"], pin=None, what="view")
    ids = _all_ids(table)
    assert np.array_equal(
        again.take(ids, {"x": "x"}).column("x").to_numpy(),
        _take(table, ids, ["x"]).column("x").to_numpy(),
    )


def _count_checksums(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the cache checksums from now on, in order (the real checksum still runs)."""
    checksummed: list[Path] = []
    checksum = cache_module._checksum
    monkeypatch.setattr(
        cache_module, "_checksum", lambda path: checksummed.append(path) or checksum(path)
    )
    return checksummed


def test_a_node_checksums_an_entry_once_until_one_of_its_files_changes(
    table: lancedb.table.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every DDP rank and DataLoader worker opens the entry; only the first process on the
    node (per boot) reads it whole to verify it, unless a file changed since."""
    checksummed = _count_checksums(monkeypatch)
    cache = ColumnCache(tmp_path / "cache", 1 << 30)
    entry = cache.open(table, ["x"], pin=None, what="view")
    files = [entry.folder / name for name in entry.manifest["files"]]
    # The fetch checksummed what it wrote, once (the staged files, before publishing).
    assert sorted(path.name for path in checksummed) == sorted(path.name for path in files)
    assert (entry.folder / "verified.json").exists()
    checksummed.clear()
    cache_module._VERIFIED.clear()  # another process on the node: trusts the marker
    cache.open(table, ["x"], pin=None, what="view")
    assert checksummed == []

    os.utime(files[0])  # a touched file (its mtime changes): the next process verifies again
    cache_module._VERIFIED.clear()
    cache.open(table, ["x"], pin=None, what="view")
    assert sorted(checksummed) == sorted(files)
    checksummed.clear()
    cache_module._VERIFIED.clear()
    cache.open(table, ["x"], pin=None, what="view")
    assert checksummed == []

    column = entry.folder / entry.manifest["fixed"]["x"]
    data = bytearray(column.read_bytes())
    data[len(data) // 2] ^= 0x10
    column.write_bytes(bytes(data))  # a write: a new mtime, so the marker no longer applies
    cache_module._VERIFIED.clear()
    again = cache.open(table, ["x"], pin=None, what="view")
    assert column in checksummed  # the damage was looked for, found, and the entry refetched
    ids = _all_ids(table)
    assert np.array_equal(
        again.take(ids, {"x": "x"}).column("x").to_numpy(),
        _take(table, ids, ["x"]).column("x").to_numpy(),
    )


def test_without_a_boot_id_a_process_checksums_an_entry_once(
    table: lancedb.table.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no marker can be written (no boot id: not Linux), each process verifies once."""
    monkeypatch.setattr(cache_module, "boot_id", lambda: "")
    checksummed = _count_checksums(monkeypatch)
    cache = ColumnCache(tmp_path / "cache", 1 << 30)
    entry = cache.open(table, ["x"], pin=None, what="view")
    assert not (entry.folder / "verified.json").exists()
    cache_module._VERIFIED.clear()  # another process
    checksummed.clear()
    for _ in range(3):
        cache.open(table, ["x"], pin=None, what="view")
    assert len(checksummed) == len(entry.manifest["files"])


def test_what_is_left_of_a_half_removed_entry_is_fetched_over(
    table: lancedb.table.Table, tmp_path: Path
) -> None:
    """An eviction racing a marker write can leave the folder holding the marker alone."""
    cache = ColumnCache(tmp_path / "cache", 1 << 30)
    entry = cache.open(table, ["x"], pin=None, what="view")
    for path in entry.folder.iterdir():
        if path.name != "verified.json":
            path.unlink()
    cache_module._VERIFIED.clear()
    again = cache.open(table, ["x"], pin=None, what="view")
    ids = _all_ids(table)
    assert np.array_equal(
        again.take(ids, {"x": "x"}).column("x").to_numpy(),
        _take(table, ids, ["x"]).column("x").to_numpy(),
    )


def test_least_recently_used_entries_go_first(table: lancedb.table.Table, tmp_path: Path) -> None:
    one = ColumnCache(tmp_path / "probe", 1 << 30).open(table, ["x"], pin="a", what="v")
    size = sum(p.stat().st_size for p in one.folder.iterdir())
    cache = ColumnCache(tmp_path / "cache", int(size * 2.5))  # room for two entries
    a = cache.open(table, ["x"], pin="a", what="v").folder
    b = cache.open(table, ["x"], pin="b", what="v").folder
    cache.open(table, ["x"], pin="a", what="v")  # a is used again: b is now the oldest
    c = cache.open(table, ["x"], pin="c", what="v").folder
    assert a.exists() and c.exists() and not b.exists()
    too_small = ColumnCache(tmp_path / "small", 1_000)
    with pytest.raises(LineageError, match=r"above the cache's max_bytes=1,000"):
        too_small.open(table, ["x", "vec"], pin=None, what="view 'v'")


# ------------------------------------------------------------------ views through the cache
SPLITS = permutation_asset(
    "splits",
    source=table_asset("rows", 6_007),
    split=RandomSplit(ratios=[0.7, 0.3], seed=3, split_names=["train", "test"]),
    shuffle=Shuffle(seed=4),
)
FOLDS = folds_asset("folds", source=table_asset("rows", 6_007), folds=KFold(k=3, seed=5))


def _views(db: LanceDBResource, asset: str, split: str, **extra: Any) -> list[Any]:
    """The same view without and with the cache."""
    return [
        open_view(
            db,
            asset=asset,
            table=asset,
            version=None,
            request=ViewRequest(
                split=split, columns=["id", "value", "name"], format="arrow", cache=cache, **extra
            ),
        )
        for cache in (False, True)
    ]


def _ids(batches: Any) -> list[int]:
    return [int(i) for b in batches for i in b.column("id").to_pylist()]


def test_a_cached_view_reads_the_same_rows_in_the_same_order(
    run: Runner, db: LanceDBResource, tmp_path: Path
) -> None:
    db = db.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    run([table_asset("rows", 6_007), SPLITS])
    plain, cached = _views(db, "splits", "train")
    assert cached.cached and not plain.cached
    full = pa.Table.from_batches(list(plain.iter(1000)))
    assert pa.Table.from_batches(list(cached.iter(1000))).equals(full)
    assert pa.Table.from_batches(list(BatchLoader(cached, batch_size=256))).equals(full)
    positions = np.random.default_rng(0).permutation(len(plain))[:500]
    assert cached.take_offsets(positions).equals(plain.take_offsets(positions))
    for rank in range(2):
        shards = [shard(v, rank=rank, world_size=2, seed=1, epoch=1) for v in (plain, cached)]
        assert _ids(BatchLoader(shards[1], batch_size=64)) == _ids(
            BatchLoader(shards[0], batch_size=64)
        )
    # A pickled view (a spawned DataLoader worker) gathers from the same entry.
    again = pickle.loads(pickle.dumps(cached))
    assert again.cached
    assert pa.Table.from_batches(list(again.iter(1000))).equals(full)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_cached_folds_and_resume_match_the_uncached_reads(
    run: Runner, db: LanceDBResource, tmp_path: Path
) -> None:
    db = db.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    run([table_asset("rows", 6_007), FOLDS])
    for split in ("train", "validation"):
        plain, cached = _views(db, "folds", split, fold=1)
        assert _ids(cached.iter(500)) == _ids(plain.iter(500))
    plain, cached = _views(db, "folds", "train", fold=2)
    loader = BatchLoader(cached, batch_size=100)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 7:
            break
    state = loader.state_dict()
    resumed = BatchLoader(cached, batch_size=100)
    resumed.load_state_dict(state)
    assert _ids(head) + _ids(resumed) == _ids(BatchLoader(plain, batch_size=100))


def test_asset_in_cache_true_hands_a_cached_view_with_the_same_rows(
    run: Runner, db: LanceDBResource, tmp_path: Path
) -> None:
    cache_db = db.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    seen: dict[str, list[int]] = {}

    def consumer(name: str, cache: bool) -> dg.AssetsDefinition:
        @dg.asset(
            name=name,
            ins={
                "train": dg.AssetIn(
                    key=SPLITS.key,
                    metadata={
                        "split": "train",
                        "columns": ["id"],
                        "format": "arrow",
                        "cache": cache,
                    },
                )
            },
        )
        def _consume(train: Permutation) -> None:
            assert isinstance(train, PermutationView) and train.cached is cache
            seen[name] = _ids(train.iter(333))

        return _consume

    resources = {"lancedb": cache_db, "io_manager": LanceDBIOManager(db=cache_db)}
    result = dg.materialize(
        [table_asset("rows", 6_007), SPLITS, consumer("plain", False), consumer("cached", True)],
        resources=resources,
        instance=run.instance,
    )
    assert result.success
    assert seen["cached"] == seen["plain"] and len(seen["plain"]) > 4_000
    # load_view(cache=True): the same rows as the run read.
    view = load_view(
        "splits",
        db=cache_db,
        instance=run.instance,
        cache=True,
        request=ViewRequest(split="train", columns=["id"], format="arrow"),
    )
    assert view.cached and _ids(view.iter(1000)) == seen["plain"]


@pytest.mark.filterwarnings("ignore:lancedb fork support is experimental:RuntimeWarning")
def test_forked_workers_of_a_warmed_cached_view_gather_from_the_cache(
    run: Runner, db: LanceDBResource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `warm`, forked DataLoader workers gather from the inherited row ids and entry:
    the same rows as without the cache, and no helper interpreter (lancedb) in any worker."""
    db = db.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    run([table_asset("rows", 6_007), SPLITS])
    plain, cached = _views(db, "splits", "train")
    expected = pa.Table.from_batches(list(plain.iter(1000)))
    cached = cached.with_skip(11).with_take(3_000).warm()
    expected = expected.slice(11, 3_000)

    class NoHelper:
        def __init__(self, *args: Any) -> None:
            raise AssertionError("a forked worker started a helper interpreter")

    monkeypatch.setattr(views, "_ForkedReader", NoHelper)  # inherited by the forked workers
    workers = DataLoader(
        cached,
        batch_size=256,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=default_convert,
    )
    assert pa.Table.from_batches(list(workers)).equals(expected)
    positions = [2_999, 0, 5]
    sampled = DataLoader(
        cached,
        batch_size=3,
        sampler=positions,
        num_workers=1,
        multiprocessing_context="fork",
        collate_fn=default_convert,
    )
    assert pa.Table.from_batches(list(sampled)).equals(expected.take(positions))
