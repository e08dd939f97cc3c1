"""The hash split's stability check out of core (`perm_assets.stability`): its figures equal
the in-memory check's (`checks._hash_stability`) over two real versions of a hash split, with
keys spread over many buckets; over dictionary and time keys across fragments, the keys counted
by hand; and its key hash gives equal values equal hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from perm_assets import HashSplit, PermutationSpec, checks, permutation_asset, stability
from perm_assets.resources import LanceDBResource
from perm_assets.tables import SPEC_KEY, read_all
from tests.conftest import Runner, make_rows

KEYS = [("id",), ("name",), ("group", "name")]


def _spec(db: LanceDBResource) -> PermutationSpec:
    """The spec the latest version of ``perm`` was built from."""
    return PermutationSpec.model_validate_json(
        (db.open_table("perm").schema.metadata or {})[SPEC_KEY.encode()]
    )


def _figures(db: LanceDBResource, spec: Any, *, streamed: bool) -> dict[str, Any]:
    """The stability figures of the latest version of ``perm`` against the one before."""
    table = db.open_table("perm")
    version = table.version
    meta = table.schema.metadata or {}
    base = db.open_table("growing", version=int(meta[b"base_version"]))
    written = read_all(table)
    row_ids = written.column("row_id").to_numpy()
    split_ids = written.column("split_id").to_numpy()
    if streamed:
        sizes = np.bincount(split_ids.astype(np.int64), minlength=len(spec.split_names()))
        found = checks._hash_stability_streamed(db, "perm", base, spec, spec.split, version, sizes)
        assert found is not None  # these key types take the streamed path
        return found
    persisted = {"persisted_version": version}
    return checks._hash_stability(db, "perm", base, spec, spec.split, row_ids, split_ids, persisted)


@pytest.mark.parametrize("columns", KEYS)
def test_streamed_stability_equals_the_in_memory_check(
    run: Runner, db: LanceDBResource, columns: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stability, "BUCKET_KEYS", 64)  # ~30 buckets for these 1-2k keys
    state = {"start": 0}

    @dg.asset(name="growing", metadata={"write_mode": "append"})
    def growing() -> pa.Table:
        rows = make_rows(800, start=state["start"])
        state["start"] += 800
        return rows

    def perm(weights: list[int]) -> dg.AssetsDefinition:
        return permutation_asset(
            "perm",
            source=growing,
            split=HashSplit(columns=list(columns), weights=weights, split_names=["a", "b"]),
        )

    run([growing, perm([3, 1])])
    db.connect().open_table("growing").optimize()  # compaction renumbers the row ids
    run([growing, perm([3, 1])])
    spec = _spec(db)
    grown = _figures(db, spec, streamed=True)
    assert grown == _figures(db, spec, streamed=False)
    assert grown["passed"] and grown["keys_compared"] == 800
    assert grown["rows_added/a"] + grown["rows_added/b"] == 800  # one key per new row

    # Other weights re-deal keys between the splits: both checks count the same moved keys.
    reweighted = perm([1, 3])
    run([growing, reweighted], selection=[reweighted], raise_on_error=False)
    spec = _spec(db)
    moved = _figures(db, spec, streamed=True)
    assert moved == _figures(db, spec, streamed=False)
    assert not moved["passed"] and moved["rows_moved_between_splits"] > 0


def test_equal_values_hash_equal_whatever_their_arrow_type() -> None:
    def one(values: pa.Array) -> list[int]:
        hashed = stability.key_hash([values])
        assert hashed is not None
        return hashed.tolist()

    ints = [3, -1, 0, 2**40]
    assert one(pa.array(ints, pa.int64())) == one(pa.array(ints, pa.int64()).cast(pa.int64()))
    assert one(pa.array([3, -1, 0], pa.int32())) == one(pa.array([3, -1, 0], pa.int64()))
    words = ["", "a", "ab", "ba", "a\x00", "longer text"]
    plain = one(pa.array(words))
    assert plain == one(pa.array(words, pa.large_string()))
    assert plain == one(pa.array(words).dictionary_encode())
    assert plain[2:] == one(pa.array(words).slice(2))  # an offset into the buffers
    assert len(set(plain)) == len(words)  # no collision among these
    assert one(pa.array([0.0, 1.5])) == one(pa.array([-0.0, 1.5]))
    assert one(pa.array([float("nan")])) == one(pa.array([float("nan")]))
    with_null = one(pa.array([1, None, 2]))
    assert with_null[1] == one(pa.array(["x", None]))[1] and with_null[0] != with_null[1]
    # Several columns: the combination of both values counts, not each alone.
    pairs = stability.key_hash([pa.array([1, 2]), pa.array(["a", "b"])])
    swapped = stability.key_hash([pa.array([2, 1]), pa.array(["a", "b"])])
    assert pairs is not None and swapped is not None and set(pairs) != set(swapped)
    # Dates, times and timestamps hash as their integer storage, nulls included.
    for kind in (pa.time64("us"), pa.time32("s"), pa.timestamp("ns"), pa.date32()):
        storage = pa.int32() if kind.bit_width == 32 else pa.int64()
        values = pa.array([5, None, 7], storage).cast(kind)
        assert one(values)[0] != one(values)[2] and one(values)[1] == with_null[1]
    # A type it does not hash: None (the caller keeps the in-memory check).
    assert stability.key_hash([pa.array([{"x": 1}])]) is None
    assert stability.key_hash([pa.array([], pa.month_day_nano_interval())]) is None


def test_compare_counts_keys_of_dictionary_and_time_columns_across_fragments(
    tmp_path: Path,
) -> None:
    # Two fragments, each with its own dictionary for "word"; "at" a time64 column. The keys
    # (word, at) of two hand-made versions, counted here in Python over 200 distinct keys.
    conn = lancedb.connect(str(tmp_path / "db"))
    ids = np.arange(600)
    rows = pa.table(
        {
            "id": ids,
            "word": pa.array([f"w{i % 50}" for i in ids]).dictionary_encode(),
            "at": pa.array((ids % 40) * 1_000_000, pa.time64("us")),
        }
    )
    base = conn.create_table("base", rows.slice(0, 300))
    base.add(rows.slice(300))
    found = base.search().select(["id"]).with_row_id(True).to_arrow()
    row_ids, id_of = found.column("_rowid").to_numpy(), found.column("id").to_numpy()
    assert np.unique(row_ids >> np.uint64(32)).size == 2

    def key(i: int) -> tuple[int, int]:
        return (i % 50, i % 40)

    split_now = np.array([(a + b) % 2 for a, b in map(key, id_of)], dtype=np.uint64)
    flipped = np.array([key(i)[0] == 3 for i in id_of])  # keys of word w3 change split
    split_before = np.where(flipped, 1 - split_now, split_now)
    earlier = id_of < 150  # the previous version held fewer rows: some keys are new now
    now = conn.create_table("now", pa.table({"row_id": row_ids, "split_id": split_now}))
    before = conn.create_table(
        "before", pa.table({"row_id": row_ids[earlier], "split_id": split_before[earlier]})
    )
    got = stability.compare(
        (now, base, None, 2),
        (before, base, None, 2),
        ["word", "at"],
        spill_dir=str(tmp_path / "spill"),
        bucket_keys=16,  # ~47 buckets
    )
    assert got is not None
    keys_now = {key(i): int(s) for i, s in zip(id_of, split_now, strict=True)}
    keys_before = {
        key(i): int(s) for i, s, e in zip(id_of, split_before, earlier, strict=True) if e
    }
    both = keys_now.keys() & keys_before.keys()
    compared, moved, added = got
    assert compared == len(both) < len(keys_now) == 200
    assert moved == sum(keys_now[k] != keys_before[k] for k in both) > 0
    assert added.tolist() == [
        sum(1 for k, s in keys_now.items() if k not in keys_before and s == split)
        for split in (0, 1)
    ]
