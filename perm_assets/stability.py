"""The hash split's stability check out of core: every key present in the previous version
of a permutation keeps its split.

The in-memory check (`perm_assets.checks._hash_stability`) holds both versions' row ids and
each row's key values, 16+ bytes a row and sorts: a billion rows do not fit. Here each version
is read as `perm_assets.membership` reads a permutation (one byte per base row address), its
filtered base rows are scanned with their key columns, and each held row's ``(key, split)``
goes to one of `buckets` spill files by a hash of its key (`key_hash`), so that a key's rows of
both versions meet in one bucket. Buckets are then joined one at a time: memory is one bucket
(about `BUCKET_KEYS` rows) and one byte per base row, never the row ids.

Figures are the in-memory check's: keys compared (present in both), keys whose split changed
(``rows_moved_between_splits``), and new keys per split. A key's split is the smallest split
any of its rows has (one hash sends all of a key's rows to one split).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from perm_assets.membership import Membership, prefetched, table_batches

if TYPE_CHECKING:
    from lancedb.table import Table

BUCKET_KEYS = 1 << 23
"""``(key, split)`` rows per bucket on average (8M: a few hundred MB joined at once)."""
MAX_BUCKETS = 512
"""At most this many buckets (open files while one version is spilled: a process may have
1,024); past 4B ``(key, split)`` rows, buckets grow beyond `BUCKET_KEYS`."""
_BATCH_ROWS = 1 << 18
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_NULL = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def key_hash(columns: list[pa.Array]) -> np.ndarray | None:
    """A 64-bit hash of each row's values of ``columns`` (equal values, equal hashes, for
    integers, booleans, dates and times, floats, strings and binaries; nulls hash alike);
    None for another type (the caller's in-memory path)."""
    out = np.zeros(len(columns[0]) if columns else 0, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the hash wraps modulo 2^64 on purpose
        for column in columns:
            part = _column_hash(column)
            if part is None:
                return None
            out = _mix(out * np.uint64(31) + part)
    return out


def _column_hash(column: pa.Array) -> np.ndarray | None:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = cast(pa.DictionaryArray, column).dictionary_decode()
    kind = column.type
    valid = None if column.null_count == 0 else column.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_temporal(kind) and not pa.types.is_interval(kind):
        # Dates, times, timestamps, durations: their integer storage (32 or 64 bits).
        column = column.view(pa.int32() if kind.bit_width == 32 else pa.int64())
        kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        filled = column.fill_null(pa.scalar(0).cast(kind)) if valid is not None else column
        values = np.asarray(filled.to_numpy(zero_copy_only=False)).astype(np.int64).view(np.uint64)
    elif pa.types.is_floating(kind):
        filled = column.fill_null(pa.scalar(0.0).cast(kind)) if valid is not None else column
        numbers = np.asarray(filled.to_numpy(zero_copy_only=False), dtype=np.float64) + 0.0
        numbers[np.isnan(numbers)] = np.nan  # -0.0 is 0.0 and every NaN one NaN, as a join
        values = numbers.view(np.uint64)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        values = _bytes_hash(column.cast(pa.large_binary()))
    elif pa.types.is_large_binary(kind):
        values = _bytes_hash(column)
    else:
        return None
    hashed = _mix(values ^ _NULL)
    if valid is not None:
        hashed[~valid] = _NULL
    return hashed


def _bytes_hash(column: pa.Array) -> np.ndarray:
    """A hash of each value of a ``large_binary`` array from its buffers (no Python loop):
    the sum of its bytes weighted by a mix of their positions, mixed with its length."""
    n = len(column)
    offsets = np.frombuffer(cast(pa.Buffer, column.buffers()[1]), dtype=np.int64)
    offsets = offsets[column.offset : column.offset + n + 1]
    data_buffer = column.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0)
    lengths = np.diff(offsets)
    sums = np.zeros(n, dtype=np.uint64)
    if n and int(offsets[-1]) > int(offsets[0]):
        positions = np.arange(int(offsets[0]), int(offsets[-1]), dtype=np.int64)
        within = positions - np.repeat(offsets[:-1], lengths)
        weighted = data[positions].astype(np.uint64) * _mix(within.astype(np.uint64) + 1)
        filled = lengths > 0
        sums[filled] = np.add.reduceat(weighted, (offsets[:-1] - offsets[0])[filled])
    return sums ^ _mix(lengths.astype(np.uint64))


class _Buckets:
    """Arrow IPC files ``<name>-<b>.arrow`` under ``folder``, one per bucket, each opened at
    its first rows and appended to until `close`."""

    def __init__(self, folder: Path, name: str, schema: pa.Schema, count: int) -> None:
        self.paths = [folder / f"{name}-{b}.arrow" for b in range(count)]
        self.schema = schema
        self.writers: list[Any | None] = [None] * count

    def add(self, rows: pa.Table, bucket: np.ndarray) -> None:
        """Append each of ``rows`` to the file of its ``bucket``."""
        order = np.argsort(bucket, kind="stable")
        ends = np.searchsorted(bucket[order], np.arange(len(self.writers) + 1))
        for b in range(len(self.writers)):
            if ends[b + 1] > ends[b]:
                writer = self.writers[b]
                if writer is None:
                    writer = self.writers[b] = pa.ipc.new_file(str(self.paths[b]), self.schema)
                writer.write_table(rows.take(pa.array(order[ends[b] : ends[b + 1]])))

    def close(self) -> None:
        """Finish every file (also after an error: the spill folder is removed after it)."""
        for writer in self.writers:
            if writer is not None:
                writer.close()

    def read(self, b: int) -> pa.Table:
        """Bucket ``b``'s rows (none if it got none)."""
        if self.writers[b] is None:
            return self.schema.empty_table()
        with pa.memory_map(str(self.paths[b])) as source:
            return pa.ipc.open_file(source).read_all()


def _pairs(
    folder: Path,
    name: str,
    base: Table,
    filter: str | None,
    permutation: Table,
    keys: list[str],
    num_splits: int,
    buckets: int,
    *,
    spill_dir: str | None,
) -> _Buckets | None:
    """Each filtered row of ``base`` that ``permutation`` holds in a declared split, as
    ``(key columns, split)`` in the bucket of its key; None when the ids are not row
    addresses or a key column's type has no `key_hash`."""
    from perm_assets.tables import where

    fields = [base.schema.field(k) for k in keys]
    # Dictionary columns decoded: each Lance fragment has its own dictionary, and one IPC file
    # takes one.
    fields = [
        f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in fields
    ]
    if key_hash([pa.array([], f.type) for f in fields]) is None:
        return None
    member = Membership.build(base, table_batches(permutation), num_splits, spill_dir=spill_dir)
    if member is None:
        return None
    query = base.search().select(list(keys)).with_row_id(True)
    if filter is not None:
        query = query.where(cast(str, where(filter)))
    out = _Buckets(folder, name, pa.schema([*fields, pa.field("split", pa.int64())]), buckets)
    with member:
        try:
            for batch in prefetched(query.to_batches(batch_size=_BATCH_ROWS)):
                ids = batch.column(batch.schema.get_field_index("_rowid")).to_numpy()
                slot, valid = member.slots(ids.astype(np.uint64, copy=False))
                splits = member.split_of[slot]
                if valid is not None:
                    splits = np.where(valid, splits, num_splits)
                kept = splits < num_splits
                values = [
                    _decoded(batch.column(batch.schema.get_field_index(k)).filter(kept))
                    for k in keys
                ]
                hashed = cast(np.ndarray, key_hash(values))  # the types were checked above
                columns = {**dict(zip(keys, values, strict=True)), "split": splits[kept]}
                rows = pa.table(columns).cast(out.schema)
                out.add(rows, (hashed % np.uint64(buckets)).astype(np.int64))
        finally:
            out.close()
    return out


def _decoded(column: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(column.type):
        return cast(pa.DictionaryArray, column).dictionary_decode()
    return column


def _distinct(rows: pa.Table, keys: list[str]) -> pa.Table:
    """One row per key: its smallest split."""
    grouped = rows.group_by(keys).aggregate([("split", "min")])
    return grouped.select([*keys, "split_min"]).rename_columns([*keys, "split"])


def joined_splits(
    now: pa.Table, before: pa.Table, keys: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(split now, known, split before)`` of each distinct key of ``now`` (``keys`` columns
    and ``split``, a row each, any number per key), ``known`` where ``before`` has the key too
    (its split there; 0 where not known). Shared with the in-memory check
    (`perm_assets.checks._hash_stability`)."""
    joined = _distinct(now, keys).join(
        _distinct(before, keys), keys=keys, join_type="left outer", right_suffix="_before"
    )
    split_now = joined.column("split").to_numpy(zero_copy_only=False)
    was = joined.column("split_before")
    known = ~np.asarray(was.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return split_now, known, was.fill_null(0).to_numpy(zero_copy_only=False)


def compare(
    now: tuple[Table, Table, str | None, int],
    before: tuple[Table, Table, str | None, int],
    keys: list[str],
    *,
    spill_dir: str | None,
    bucket_keys: int | None = None,
) -> tuple[int, int, np.ndarray] | None:
    """``(keys compared, keys moved, new keys per split)`` of two versions of a hash split,
    each ``(permutation, base, filter, splits)`` (tables pinned); None when a version's ids
    are not row addresses or a key column has no `key_hash` (the in-memory path)."""
    from perm_assets.engines.local import Spill  # spill folders reclaimed after a SIGKILL

    rows = max(1, now[0].count_rows() + before[0].count_rows())
    buckets = min(MAX_BUCKETS, max(1, math.ceil(rows / (bucket_keys or BUCKET_KEYS))))
    num_splits = now[3]
    with Spill(spill_dir) as spill:
        folder = cast(Path, spill.path)
        sides = []
        for name, (permutation, base, filter, splits) in (("now", now), ("before", before)):
            found = _pairs(
                folder,
                name,
                base,
                filter,
                permutation,
                keys,
                splits,
                buckets,
                spill_dir=spill_dir,
            )
            if found is None:
                return None
            sides.append(found)
        compared, moved = 0, 0
        added = np.zeros(num_splits, dtype=np.int64)
        for b in range(buckets):
            split_now, known, was_values = joined_splits(sides[0].read(b), sides[1].read(b), keys)
            compared += int(np.count_nonzero(known))
            moved += int(np.count_nonzero(known & (split_now != was_values)))
            added += np.bincount(split_now[~known].astype(np.int64), minlength=num_splits)
    return compared, moved, added
