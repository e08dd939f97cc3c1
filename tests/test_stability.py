"""The hash split's stability check out of core (`perm_assets.stability`): its figures equal
the in-memory check's (`checks._hash_stability`) over two real versions of a hash split, with
keys spread over many buckets; and its key hash gives equal values equal hashes."""

from __future__ import annotations

from typing import Any

import dagster as dg
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
    # A type it does not hash: None (the caller keeps the in-memory check).
    assert stability.key_hash([pa.array([{"x": 1}])]) is None
