"""A view's rows by position, read by this project instead of lancedb's offset map.

lancedb 0.40's ``Permutation.take_offsets`` builds an offset map of the whole split on its
first call (39 s for a 72M-row split of a 100M-row table), once per process and per DataLoader
worker. The project owns its permutation tables (``row_id`` = base row address, ``split_id``,
both uint64, at a pinned version), so it reads them itself:

- `SplitRows` holds a split's row ids in view order: the ``row_id`` of every permutation-table
  row whose ``split_id`` is the split's, in stored order (lancedb's reader uses the same order;
  tests compare them). The whole array is read once, on the first random access, in 1M-row
  batches (~0.3 s per 10M table rows); sequential reads stream it and never wait for the
  whole split.
- `take_rows` reads base rows by row id at the pinned base version (``Table.take_row_ids``)
  and puts them in the requested order (lancedb returns them sorted by address).

Both work on a `Store`: `LanceDBStore` wraps a lancedb ``Table`` (every process that opened
the view), `LanceStore` a pylance dataset at a pinned version (the read helper of a forked
DataLoader worker, `perm_assets.forked`, which must start without lancedb's 2-3 s import).
This module imports neither dagster nor lancedb.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from perm_assets.errors import LineageError

if TYPE_CHECKING:
    from lance import LanceDataset
    from lancedb.table import Table

__all__ = [
    "ROW_ID_BATCH",
    "SPLIT_RANGES_KEY",
    "LanceDBStore",
    "LanceStore",
    "SplitRows",
    "Store",
    "ramp",
    "take_rows",
]

ROW_ID_BATCH = 1 << 20
"""Permutation-table rows per read batch (1M: ~20 ms for the two uint64 columns)."""

SPLIT_RANGES_KEY = "perm_assets.split_ranges"
"""``[[first row, rows], ...]`` per split id when the table stores its splits one after another
(every table this project builds): a reader takes a split's row ids by table offset."""

_ROWID = "_rowid"


class Store(Protocol):
    """One table at one version, as this module reads it."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    def metadata(self) -> Mapping[bytes, bytes]:
        """The schema's metadata."""
        ...

    def count_rows(self) -> int:
        """Rows at this version (from the manifest: no scan)."""
        ...

    def take_offsets(self, offsets: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows at table ``offsets`` (sorted, distinct), in that order."""
        ...

    def take_row_ids(self, row_ids: np.ndarray, columns: Mapping[str, str]) -> pa.Table:
        """Rows ``row_ids`` (sorted, distinct) in address order, with ``columns`` (output
        name → source column) and ``_rowid``; rows not in the table are left out."""
        ...

    def scan(self, column: str | None, where: str | None) -> Iterator[np.ndarray]:
        """``column`` (None: the row ids) of the rows matching ``where``, in stored order, in
        batches of `ROW_ID_BATCH` rows."""
        ...


class LanceDBStore:
    """A lancedb ``Table`` (at its checked-out version) as a `Store`."""

    def __init__(self, table: Table) -> None:
        self.table = table

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def version(self) -> int:
        return self.table.version

    def metadata(self) -> Mapping[bytes, bytes]:
        return self.table.schema.metadata or {}

    def count_rows(self) -> int:
        return self.table.count_rows()

    def take_offsets(self, offsets: np.ndarray, columns: list[str]) -> pa.Table:
        return self.table.take_offsets(offsets.tolist()).select(columns).to_arrow()

    def take_row_ids(self, row_ids: np.ndarray, columns: Mapping[str, str]) -> pa.Table:
        query = self.table.take_row_ids(row_ids.tolist()).with_row_id()
        return query.select(dict(columns) if columns else []).to_arrow()

    def scan(self, column: str | None, where: str | None) -> Iterator[np.ndarray]:
        query = self.table.search()
        if where is not None:
            query = query.where(where)
        # Filtered in lancedb, to_batches rather than to_arrow: query.to_arrow() took 2.3 s
        # for an 8M-row split, these batches 0.26 s (and 5.2 s for a 80M-row split of 100M
        # rows, where reading both columns and masking in numpy took 7.7 s).
        query = query.select([column]) if column is not None else query.select([])
        if column is None:
            query = query.with_row_id(True)
        for batch in query.to_batches(ROW_ID_BATCH):
            yield batch.column(column or _ROWID).to_numpy().astype(np.uint64, copy=False)


class LanceStore:
    """A pylance dataset (checked out at a version) as a `Store`, and as the `Versioned`
    table `perm_assets.identity` checks."""

    def __init__(self, dataset: LanceDataset, name: str) -> None:
        self.dataset = dataset
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return int(self.dataset.version)

    @property
    def tags(self) -> Any:
        return self.dataset.tags

    def list_versions(self) -> list[dict[str, Any]]:
        return [dict(version) for version in self.dataset.versions()]

    def metadata(self) -> Mapping[bytes, bytes]:
        return self.dataset.schema.metadata or {}

    def count_rows(self) -> int:
        return self.dataset.count_rows()

    def take_offsets(self, offsets: np.ndarray, columns: list[str]) -> pa.Table:
        return self.dataset.take(pa.array(offsets, pa.uint64()), columns=columns)

    def take_row_ids(self, row_ids: np.ndarray, columns: Mapping[str, str]) -> pa.Table:
        wanted = {**columns, _ROWID: _ROWID}
        return self.dataset._take_rows(pa.array(row_ids, pa.uint64()), columns=wanted)

    def scan(self, column: str | None, where: str | None) -> Iterator[np.ndarray]:
        batches = self.dataset.to_batches(
            columns=[column] if column is not None else [],
            filter=where,
            with_row_id=column is None,
            batch_size=ROW_ID_BATCH,
        )
        for batch in batches:
            yield batch.column(column or _ROWID).to_numpy().astype(np.uint64, copy=False)


class SplitRows:
    """The row ids (base row addresses) of one split of a permutation table, in view order.

    ``stored`` None is an identity view: every row of ``base`` in stored order. Shared by
    every copy of a view (see `perm_assets.views.PermutationView`), so the array is read at
    most once per process; thread-safe.
    """

    def __init__(self, base: Store, stored: Store | None, split: int) -> None:
        self.base = base
        self.stored = stored
        self.split = split
        self._all: np.ndarray | None = None
        self._lock = threading.Lock()
        self._range_read = False
        self._range_value: tuple[int, int] | None = None

    @property
    def _range(self) -> tuple[int, int] | None:
        # Read on first use, never in __init__: views are built on lancedb's event loop
        # thread, where a synchronous table call (schema) waits on that same loop forever.
        if not self._range_read:
            self._range_value = _split_range(self.stored, self.split)
            self._range_read = True
        return self._range_value

    def at(self, offset: int | None, limit: int | None, positions: np.ndarray) -> np.ndarray:
        """Row ids at ``positions`` of the `window`, in that order (IndexError outside it).

        A table that records its split ranges is read at just those table offsets (a
        DataLoader worker's or a shard's first batch does not wait for the whole split's row
        ids: 5 s at 80M rows); otherwise, or once read, a slice of `all`.
        """
        positions = np.asarray(positions, dtype=np.int64)
        size = self.size(offset, limit)
        if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= size):
            bad = positions[(positions < 0) | (positions >= size)][0]
            raise IndexError(f"offset {bad} is out of range for a view of {size:,} rows")
        if self._range is None or self._all is not None or self.stored is None:
            return self.window(offset, limit)[positions]
        first = self._range[0] + (offset or 0)
        # lancedb returns taken rows in table order, once each: ask sorted distinct offsets.
        wanted, inverse = np.unique(positions, return_inverse=True)
        found = self.stored.take_offsets(wanted + first, ["row_id", "split_id"])
        splits = found.column("split_id").to_numpy()
        if found.num_rows != wanted.size or not bool(np.all(splits == self.split)):
            raise LineageError(
                f"permutation table '{self.stored.name}' version {self.stored.version}: its "
                f"split ranges metadata places split {self.split} at rows {self._range}, but "
                "those rows hold other splits; the table was changed outside this project"
            )
        return found.column("row_id").to_numpy()[inverse.reshape(-1)]

    def size(self, offset: int | None, limit: int | None) -> int:
        """Rows of the `window`, without reading the row ids when `known_size` knows it."""
        known = self.known_size(offset, limit)
        return known if known is not None else _window(self.all().size, offset, limit)

    def known_size(self, offset: int | None, limit: int | None) -> int | None:
        """Rows of the `window` when that costs no scan: the row ids read already, an
        identity view's row count, or the table's recorded split ranges; else None."""
        if self._all is not None:
            total = self._all.size
        elif self.stored is None:
            total = self.base.count_rows()
        elif self._range is not None:
            total = self._range[1]
        else:
            return None
        return _window(total, offset, limit)

    def held(self) -> np.ndarray | None:
        """`all` if it was read already, else None; never reads, never takes the lock (a
        forked child may have inherited it locked)."""
        return self._all

    def all(self) -> np.ndarray:
        """Every row id of the split, uint64, in view order (read on first call)."""
        with self._lock:
            if self._all is None:
                parts = list(self._scan())
                self._all = np.concatenate(parts) if parts else np.empty(0, np.uint64)
            return self._all

    def window(self, offset: int | None, limit: int | None) -> np.ndarray:
        """Row ids of the view that skips ``offset`` rows and takes ``limit`` (lancedb's
        ``with_skip``/``with_take``), a slice of `all`."""
        start = offset or 0
        stop = None if limit is None else start + limit
        return self.all()[start:stop]

    def stream(
        self, offset: int | None, limit: int | None, sizes: Iterable[int]
    ) -> Iterator[np.ndarray]:
        """The row ids of `window` in chunks of the next of ``sizes`` rows (the last chunk
        shorter), read as they are needed: the first chunk does not wait for the rest of the
        split."""
        wanted = iter(sizes)
        if self._all is not None:
            ids = self.window(offset, limit)
            start = 0
            while start < ids.size:
                size = next(wanted)
                yield ids[start : start + size]
                start += size
            return
        chunk_rows = next(wanted)
        skip = offset or 0
        left = -1 if limit is None else limit
        pending: list[np.ndarray] = []
        held = 0
        for part in self._scan():
            if skip:
                dropped = min(skip, part.size)
                part, skip = part[dropped:], skip - dropped
            if left >= 0:
                part = part[:left]
                left -= part.size
            if part.size:
                pending.append(part)
                held += part.size
            while held >= chunk_rows:
                joined = np.concatenate(pending)
                yield joined[:chunk_rows]
                pending, held = [joined[chunk_rows:]], held - chunk_rows
                chunk_rows = next(wanted)
            if left == 0:
                break
        if held:
            yield np.concatenate(pending)

    def _scan(self) -> Iterator[np.ndarray]:
        """The split's row ids batch by batch, in stored order."""
        if self.stored is None:  # identity view: the base table's own row ids
            yield from self.base.scan(None, None)
            return
        yield from self.stored.scan("row_id", f"split_id = {int(self.split)}")


def _window(total: int, offset: int | None, limit: int | None) -> int:
    """Rows left of ``total`` after skipping ``offset`` and taking at most ``limit``."""
    rest = max(total - (offset or 0), 0)
    return rest if limit is None else min(limit, rest)


def _split_range(stored: Store | None, split: int) -> tuple[int, int] | None:
    """``(first table row, rows)`` of ``split`` from the table's metadata, if recorded."""
    if stored is None:
        return None
    raw = stored.metadata().get(SPLIT_RANGES_KEY.encode())
    if raw is None:
        return None
    ranges = json.loads(raw)
    if not 0 <= split < len(ranges):
        return None
    first, rows = ranges[split]
    return int(first), int(rows)


def ramp(first: int, full: int) -> Iterator[int]:
    """Read sizes ``first, 2 * first, 4 * first, ...`` up to ``full``, then ``full`` forever:
    a pass's first batch waits for one small read, not for a whole I/O batch."""
    size = min(first, full)
    while size < full:
        yield size
        size *= 2
    while True:
        yield full


def take_rows(
    base: Store, row_ids: np.ndarray, selection: Mapping[str, str], *, what: str
) -> pa.RecordBatch:
    """Rows ``row_ids`` of ``base`` (at its checked-out version), in that order, as one batch
    with the columns of ``selection`` (output name → source column, as lancedb keeps it).

    Raises:
        LineageError: a row id is not in ``base`` at this version (``what`` names the view).
    """
    names = list(selection)
    # lancedb returns rows sorted by address whatever order they were asked in, and once
    # per distinct id: ask for the sorted distinct ids, then gather them in the wanted order.
    unique, inverse = np.unique(np.asarray(row_ids, dtype=np.uint64), return_inverse=True)
    columns: dict[str, Any] = {name: selection[name] for name in names if name != _ROWID}
    found = base.take_row_ids(unique, columns)
    got = found.column(_ROWID).to_numpy() if found.num_rows else np.empty(0, np.uint64)
    if got.size != unique.size or not np.array_equal(got, unique):
        missing = np.setdiff1d(unique, got)[:5].tolist()
        raise LineageError(
            f"{what}: base table '{base.name}' at version {base.version} does not return the "
            f"rows asked for (asked {unique.size:,}, got {got.size:,}; missing e.g. row ids "
            f"{missing}); its pinned version no longer holds the view's rows"
        )
    ordered = found.take(pa.array(inverse.reshape(-1)))
    sources = [_ROWID if name == _ROWID else name for name in names]
    schema = pa.schema(
        [found.schema.field(src).with_name(name) for src, name in zip(sources, names, strict=True)]
    )
    table = pa.Table.from_arrays([ordered.column(src) for src in sources], schema=schema)
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=schema)
