"""Split membership of a permutation over its base table, one byte per base row, streamed.

The blocking checks and the balance report need, for every filtered base row, the split it
is in (or that it is in none, or in two). Holding the permutation's row ids and split ids as
numpy arrays costs 16+ bytes a row and a sort; at 100M rows that made the materialization peak
at twice lancedb's own build. Instead, with row ids that are row addresses
(``fragment_id << 32 | offset``, lancedb's default), `Membership` keeps a dense ``split_of``
byte per base row address (`ABSENT` when the permutation lacks it), filled by one batched scan
of the permutation's rows: a second hit on an address is a duplicate; an id that addresses no
row of the base version is a stray. A second batched scan of the filtered base rows (`_rowid`
plus the one label/group/time column a check needs) then counts missing rows and, by
``bincount``, classes per split, groups per split and time ranges per split
(`scan_filtered`). Memory: one byte per base row (a memmap spill file beyond
`MEMORY_BUDGET_BYTES`) plus one batch; never a whole column in Python.

Tables with stable row ids (not addresses) or more than `MAX_SPLITS` splits return None from
`Membership.build`: callers keep their in-memory path for them.

The same classes run on a Ray cluster, one task per shard of base fragments
(`perm_assets.engines.ray_checks`): `Membership.over` covers some fragments, `scan_batches`
scans them, and the shards' figures add up (`Membership.combined`, `ScanCounts.merge`).
This module imports neither lancedb nor dagster, so that Ray workers can import it.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from queue import Full, Queue
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perm_assets.errors import SpecError

if TYPE_CHECKING:  # not imported at run time: Ray workers run `Membership` and `ScanCounts`
    from lancedb.table import Table

ABSENT = 255
"""``split_of`` of an address the permutation does not hold."""
STRAY_SPLIT = 254
"""``split_of`` of an address held with a split id outside the declared splits."""
MAX_SPLITS = 254
"""More splits than this do not fit the one-byte ``split_of``: callers keep the old path."""
MEMORY_BUDGET_BYTES = 1 << 30
"""Above this many base rows, ``split_of`` lives in a temporary memmap file, not in RAM."""
_OFFSET_BITS = 32
_OFFSET_MASK = np.uint64((1 << _OFFSET_BITS) - 1)
_SHOW = 10  # example values in check figures, as `perm_assets.assign`
_GROUP_COMPACT_ROWS = 1 << 22  # (group, split) pairs gathered before they are deduplicated
_BATCH_ROWS = 1 << 18  # per scan batch: ~10 MB of temporaries, and lancedb reads it faster


@dataclass
class Membership:
    """Where each base row address is in a permutation.

    Attributes:
        split_of: one byte per row slot of the base version: the split id, `ABSENT` or
            `STRAY_SPLIT`.
        starts, extents: each fragment id's first slot in ``split_of`` (-1: no such fragment
            at the base version) and its number of slots (its physical rows).
        num_splits: splits the permutation declares.
        rows: rows of the permutation (every entry, duplicates included).
        duplicate_rows: entries beyond the first of an id.
        out_of_range_ids: entries whose split id is not below ``num_splits``.
        strays: distinct ids that address no row of the base version.
        split_rows: entries per split id (in range only).
    """

    split_of: np.ndarray
    starts: np.ndarray
    extents: np.ndarray
    num_splits: int
    rows: int = 0
    duplicate_rows: int = 0
    out_of_range_ids: int = 0
    strays: int = 0
    split_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _spill: str | None = None

    @classmethod
    def build(
        cls,
        base: Table,
        batches: Iterable[pa.RecordBatch],
        num_splits: int,
        *,
        spill_dir: str | None = None,
        budget_bytes: int = MEMORY_BUDGET_BYTES,
    ) -> Membership | None:
        """Membership of the ``row_id``/``split_id`` ``batches`` in ``base`` (checked out at
        the permutation's base version); None when ids are not addresses (stable row ids) or
        there are too many splits for one byte. Beyond ``budget_bytes`` base rows, ``split_of``
        is a memmap in ``spill_dir``."""
        if num_splits > MAX_SPLITS:
            return None
        # lancedb lists no fragments, so this takes pylance (at the checked-out, pinned base
        # version). Once imported, pylance warns in any later fork that lance is not fork-safe;
        # forked DataLoader workers of views never use lance (see perm_assets.views).
        dataset = base.to_lance()
        if dataset.has_stable_row_ids:
            return None
        fragments = dataset.get_fragments()
        return cls.over(
            [f.fragment_id for f in fragments],
            [f.metadata.physical_rows for f in fragments],
            batches,
            num_splits,
            spill_dir=spill_dir,
            budget_bytes=budget_bytes,
        )

    @classmethod
    def over(
        cls,
        fragment_ids: list[int],
        physical_rows: list[int],
        batches: Iterable[pa.RecordBatch],
        num_splits: int,
        *,
        spill_dir: str | None = None,
        budget_bytes: int = MEMORY_BUDGET_BYTES,
    ) -> Membership:
        """Membership of the ``batches`` in the base fragments ``fragment_ids`` (with
        ``physical_rows`` row slots each) only: an id of any other fragment is a stray. One
        shard of a base's fragments holds every id of its fragments, so shards' figures add
        up (`combined`)."""
        ids = np.asarray(fragment_ids, dtype=np.int64)
        sizes = np.asarray(physical_rows, dtype=np.int64)
        top = int(ids.max()) if ids.size else -1
        # At least one entry, so that any fragment id can be clipped to a valid index.
        starts = np.full(max(top + 1, 1), -1, dtype=np.int64)
        extents = np.zeros(max(top + 1, 1), dtype=np.uint64)  # compared with uint64 offsets
        starts[ids] = np.cumsum(sizes) - sizes
        extents[ids] = sizes.astype(np.uint64)
        split_of, spill = _byte_array(int(sizes.sum()), spill_dir, budget_bytes)
        split_of[:] = ABSENT
        member = cls(split_of, starts, extents, num_splits, _spill=spill)
        member._fill(batches)
        return member

    @classmethod
    def combined(cls, parts: list[Membership]) -> Membership:
        """The figures of shards of one base's fragments (each a `Membership.over` of its
        fragments, all ids of those fragments in it), added up (at least one); no
        ``split_of``."""
        split_rows = np.zeros(parts[0].num_splits, dtype=np.int64)
        for part in parts:
            split_rows += part.split_rows
        return cls(
            split_of=np.zeros(0, dtype=np.uint8),
            starts=np.full(1, -1, dtype=np.int64),
            extents=np.zeros(1, dtype=np.uint64),
            num_splits=parts[0].num_splits,
            rows=sum(p.rows for p in parts),
            duplicate_rows=sum(p.duplicate_rows for p in parts),
            out_of_range_ids=sum(p.out_of_range_ids for p in parts),
            strays=sum(p.strays for p in parts),
            split_rows=split_rows,
        )

    def close(self) -> None:
        """Drop ``split_of`` and its spill file (if any)."""
        self.split_of = np.zeros(0, dtype=np.uint8)
        if self._spill is not None:
            os.unlink(self._spill)
            self._spill = None

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def distinct(self) -> int:
        """Distinct ids of the permutation (addressed or stray)."""
        return self.rows - self.duplicate_rows

    def slots(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(slot, valid)``: each id's place in ``split_of``, and which ids address a row of
        the base version (None: all of them; else slot 0 where one does not)."""
        fragment = row_ids >> np.uint64(_OFFSET_BITS)
        offset = row_ids & _OFFSET_MASK
        if fragment.size and int(fragment.max()) >= self.extents.size:
            known = fragment < self.extents.size
            fragment = np.where(known, fragment, 0)
            offset = np.where(known, offset, np.uint64(1 << _OFFSET_BITS))  # past any extent
        # An absent fragment has extent 0: every offset in it is invalid, no second test.
        valid = offset < self.extents[fragment]
        slot = self.starts[fragment] + offset.view(np.int64)
        if valid.all():
            return slot, None
        return np.where(valid, slot, 0), valid

    def _fill(self, batches: Iterable[pa.RecordBatch]) -> None:
        """One pass over the permutation's rows (any batch size, any order)."""
        split_rows = np.zeros(self.num_splits, dtype=np.int64)
        strays: list[np.ndarray] = []
        addressed = 0
        for batch in batches:
            row_ids = _numpy(batch.column(batch.schema.get_field_index("row_id")))
            split_ids = _numpy(batch.column(batch.schema.get_field_index("split_id")))
            self.rows += row_ids.size
            if split_ids.size and int(split_ids.max()) >= self.num_splits:
                codes = np.minimum(split_ids, STRAY_SPLIT).astype(np.uint8)
            else:  # the usual case: one narrowing pass
                codes = split_ids.astype(np.uint8)
            counted = np.bincount(codes, minlength=STRAY_SPLIT + 1)
            split_rows += counted[: self.num_splits]
            self.out_of_range_ids += int(counted[self.num_splits :].sum())
            slot, valid = self.slots(row_ids)
            if valid is not None:  # ids of no base row: kept apart (corruption; few)
                strays.append(row_ids[~valid])
                slot, codes = slot[valid], codes[valid]
            addressed += slot.size
            self.split_of[slot] = codes
        # Distinct addressed ids are the slots now set: no per-batch sort to find repeats.
        present = _count_present(self.split_of)
        stray_ids = np.unique(np.concatenate(strays)) if strays else np.zeros(0, np.uint64)
        self.strays = int(stray_ids.size)
        stray_entries = int(sum(s.size for s in strays))
        self.duplicate_rows = (addressed - present) + (stray_entries - self.strays)
        self.split_rows = split_rows


def _numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)


def _count_present(split_of: np.ndarray) -> int:
    """Slots not `ABSENT`, counted in 64 MiB slices (a memmap is never read whole)."""
    step, present = 1 << 26, 0
    for at in range(0, split_of.size, step):
        present += int(np.count_nonzero(split_of[at : at + step] != ABSENT))
    return present


def _byte_array(size: int, spill_dir: str | None, budget: int) -> tuple[np.ndarray, str | None]:
    """``size`` bytes: in memory within ``budget``, else a memmap in ``spill_dir`` (the
    system's temporary folder by default), unlinked by `Membership.close`."""
    if size <= budget:
        return np.empty(size, dtype=np.uint8), None
    handle, path = tempfile.mkstemp(prefix="perm_assets-membership-", dir=spill_dir)
    try:
        # Blocks reserved now: a sparse memmap on a full disk would die of SIGBUS mid-check.
        os.posix_fallocate(handle, 0, size)
        return np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,)), path
    except OSError as exc:
        os.unlink(path)
        raise OSError(
            f"cannot create the {size:,}-byte split membership spill file in "
            f"{os.path.dirname(path)} (set LanceDBResource.spill_dir to a folder with room): "
            f"{exc}"
        ) from exc
    finally:
        os.close(handle)


def table_batches(table: Table) -> Iterator[pa.RecordBatch]:
    """The ``row_id``/``split_id`` columns of a written permutation table, batch by batch
    (read ahead in a thread while the caller works on the previous batch)."""
    query = table.search().select(["row_id", "split_id"])
    yield from prefetched(query.to_batches(batch_size=_BATCH_ROWS))


def prefetched(batches: Iterable[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """``batches``, read up to ``depth`` ahead by a thread: Lance's decoding and numpy both
    release the GIL, so reading overlaps the lookups (about halves a check's time)."""
    queue: Queue[pa.RecordBatch | BaseException | None] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: pa.RecordBatch | BaseException | None) -> bool:
        """Hand ``item`` over unless the consumer has gone (False then)."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    reader = threading.Thread(target=read, name="perm_assets-prefetch", daemon=True)
    reader.start()
    try:
        while (item := queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # a consumer that stops early (an error) releases the reader
        reader.join()


def arrow_batches(data: pa.Table) -> Iterator[pa.RecordBatch]:
    """An in-memory permutation's rows as zero-copy batches (no concatenated column)."""
    yield from data.select(["row_id", "split_id"]).to_batches()


# ------------------------------------------------------------------ the filtered base rows
@dataclass
class Scan:
    """What one batched scan of the filtered base rows found against a `Membership`.

    Attributes:
        scanned: filtered base rows.
        found: of them, rows the permutation holds (with any split id).
        classes / counts: the label's classes (as text) and ``(splits, classes)`` rows, over
            rows held in a declared split; ``label_values`` the classes' raw values.
        groups: per-group summary (see `_GroupCounter.result`), or None.
        time_min / time_max: per split, the time column's extremes (None: no rows).
    """

    scanned: int = 0
    found: int = 0
    classes: list[str] = field(default_factory=list)
    label_values: list[Any] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    groups: dict[str, Any] | None = None
    time_min: list[Any] = field(default_factory=list)
    time_max: list[Any] = field(default_factory=list)


def scan_filtered(
    member: Membership,
    base: Table,
    filter: str | None,
    *,
    asset: str,
    label: str | None = None,
    group: str | None = None,
    time: str | None = None,
    nulls_allowed: bool = False,
) -> Scan:
    """Scan the rows of ``base`` that ``filter`` selects, in batches: ``_rowid`` plus only
    the ``label``, ``group`` and ``time`` columns asked, each row looked up in ``member``.

    Nulls in a key column raise SpecError (as `perm_assets.build.scan_columns`), unless
    ``nulls_allowed`` (the balance report's ``label=`` hint: null is a class there).
    """
    from perm_assets.tables import where  # lancedb's filter form (imports dagster)

    columns = key_columns(label, group, time)
    selected = columns or ["_rowid"]  # lancedb's select([]) reads every column
    query = base.search().select(selected).with_row_id(True)
    if filter is not None:
        query = query.where(cast(str, where(filter)))
    counts = ScanCounts.of(member.num_splits, label=label, group=group, time=time)
    batches = prefetched(query.to_batches(batch_size=_BATCH_ROWS))
    where_said = f" among the rows of filter {filter!r}" if filter else ""
    counts.scan(
        member,
        batches,
        "_rowid",
        nulls_allowed=nulls_allowed,
        table=base.name,
        among=where_said,
        asset=asset,
    )
    return counts.result()


def key_columns(label: str | None, group: str | None, time: str | None) -> list[str]:
    """The distinct columns a scan reads besides the row address."""
    return [c for c in dict.fromkeys([label, group, time]) if c is not None]


@dataclass
class ScanCounts:
    """What scans of filtered base rows against a `Membership` have counted (`Scan`'s
    figures before they are final). Scans of disjoint rows (a Ray task per shard of base
    fragments) `merge` into the figures of one scan of them all."""

    num_splits: int
    label: str | None = None
    group: str | None = None
    time: str | None = None
    scanned: int = 0
    found: int = 0
    labels: _ClassCounter | None = None
    groups: _GroupCounter | None = None
    times: _TimeRange | None = None

    @classmethod
    def of(
        cls, num_splits: int, *, label: str | None, group: str | None, time: str | None
    ) -> ScanCounts:
        """Nothing counted yet, for scans that read these key columns (None: not read)."""
        return cls(
            num_splits,
            label,
            group,
            time,
            labels=_ClassCounter(num_splits) if label is not None else None,
            groups=_GroupCounter(num_splits) if group is not None else None,
            times=_TimeRange(num_splits, time) if time is not None else None,
        )

    def scan(
        self,
        member: Membership,
        batches: Iterable[pa.RecordBatch],
        id_column: str,
        *,
        nulls_allowed: bool,
        table: str,
        among: str,
        asset: str,
    ) -> None:
        """Count ``batches`` of filtered base rows (row addresses in ``id_column``, and the
        key columns); ``table`` and ``among`` (the filter, as words) name them in errors."""
        columns = key_columns(self.label, self.group, self.time)
        for batch in batches:
            if not nulls_allowed:
                _refuse_nulls(batch, columns, table=table, among=among, asset=asset)
            ids = _numpy(batch.column(batch.schema.get_field_index(id_column)))
            slot, valid = member.slots(ids)
            splits = member.split_of[slot]
            if valid is not None:
                splits = np.where(valid, splits, ABSENT)
            held = splits != ABSENT
            self.scanned += batch.num_rows
            self.found += int(np.count_nonzero(held))
            keep = splits < member.num_splits  # held in a declared split
            if keep.all():
                kept, codes = batch, splits
            else:
                kept = batch.filter(pa.array(keep))
                codes = splits[keep]
            if self.labels is not None:
                self.labels.add(
                    kept.column(kept.schema.get_field_index(cast(str, self.label))), codes
                )
            if self.groups is not None:
                self.groups.add(
                    kept.column(kept.schema.get_field_index(cast(str, self.group))), codes
                )
            if self.times is not None:
                self.times.add(
                    kept.column(kept.schema.get_field_index(cast(str, self.time))), codes
                )

    def merge(self, other: ScanCounts) -> None:
        """Add ``other``'s counts (of other rows) to these."""
        self.scanned += other.scanned
        self.found += other.found
        if self.labels is not None and other.labels is not None:
            self.labels.merge(other.labels)
        if self.groups is not None and other.groups is not None:
            self.groups.merge(other.groups)
        if self.times is not None and other.times is not None:
            self.times.merge(other.times)

    def result(self) -> Scan:
        """The final figures: classes ordered, groups counted."""
        out = Scan(scanned=self.scanned, found=self.found)
        if self.labels is not None:
            out.classes, out.label_values, out.counts = self.labels.result()
        if self.groups is not None:
            out.groups = self.groups.result()
        if self.times is not None:
            out.time_min, out.time_max = self.times.lows, self.times.highs
        return out


def _refuse_nulls(
    batch: pa.RecordBatch, columns: list[str], *, table: str, among: str, asset: str
) -> None:
    for column in columns:
        nulls = batch.column(batch.schema.get_field_index(column)).null_count
        if nulls:
            raise SpecError(
                f"asset '{asset}': column '{column}' of table '{table}' has null "
                f"value(s){among} ({nulls} in one batch of {batch.num_rows}); a row with no "
                f'{column} cannot be placed safely. Drop them with filter "{column} IS NOT '
                'NULL" (combined with AND)'
            )


class _ClassCounter:
    """Rows per (split, class), merged batch by batch.

    Classes come out as `perm_assets.balance` names them: integers without nulls in value
    order, anything else in order of first appearance (nulls a class of their own).
    """

    def __init__(self, num_splits: int) -> None:
        self.num_splits = num_splits
        self.index: dict[Any, int] = {}  # class value -> row of `counts` (first appearance)
        self.counts = np.zeros((0, num_splits), dtype=np.int64)
        self.integers = True
        self.nulls = False

    def add(self, values: pa.Array, splits: np.ndarray) -> None:
        if not pa.types.is_integer(values.type):
            self.integers = False
        self.nulls = self.nulls or values.null_count > 0
        encoded = cast(pa.DictionaryArray, values.dictionary_encode(null_encoding="encode"))
        names = encoded.dictionary.to_pylist()  # this batch's classes: few, not rows
        rows = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            rows[i] = self.index.setdefault(name, len(self.index))
        if len(self.index) > self.counts.shape[0]:
            grown = np.zeros((len(self.index), self.num_splits), dtype=np.int64)
            grown[: self.counts.shape[0]] = self.counts
            self.counts = grown
        local = np.bincount(
            encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) * self.num_splits
            + splits,
            minlength=len(names) * self.num_splits,
        ).reshape(len(names), self.num_splits)
        self.counts[rows] += local  # a batch's classes are distinct: one row each

    def merge(self, other: _ClassCounter) -> None:
        """Add ``other``'s counts; its new classes come after these (first appearance)."""
        self.integers = self.integers and other.integers
        self.nulls = self.nulls or other.nulls
        rows = np.asarray(
            [self.index.setdefault(v, len(self.index)) for v in other.index], dtype=np.int64
        )  # classes, not rows
        if len(self.index) > self.counts.shape[0]:
            grown = np.zeros((len(self.index), self.num_splits), dtype=np.int64)
            grown[: self.counts.shape[0]] = self.counts
            self.counts = grown
        if rows.size:
            self.counts[rows] += other.counts[: rows.size]

    def result(self) -> tuple[list[str], list[Any], np.ndarray]:
        """``(class names, class values, (splits, classes) counts)``."""
        values = list(self.index)
        order = np.arange(len(values))
        if self.integers and not self.nulls:
            order = np.argsort(np.asarray(values, dtype=np.int64), kind="stable")
        ordered = [values[i] for i in order]
        names = ["null" if v is None else str(v) for v in ordered]
        return names, ordered, self.counts[order].T.copy()


class _GroupCounter:
    """Distinct (group, split) pairs and their rows: groups per split and groups in several."""

    def __init__(self, num_splits: int) -> None:
        self.num_splits = num_splits
        self.parts: list[pa.Table] = []
        self.pending = 0

    def add(self, values: pa.Array, splits: np.ndarray) -> None:
        pairs = pa.table({"g": values, "s": pa.array(splits.astype(np.int64))})
        self.parts.append(_pairs(pairs, "count"))
        self.pending += self.parts[-1].num_rows
        if self.pending > _GROUP_COMPACT_ROWS:  # groups far fewer than rows: stays small
            self.parts = [_pairs(pa.concat_tables(self.parts), "sum")]
            self.pending = self.parts[0].num_rows

    def merge(self, other: _GroupCounter) -> None:
        """Add ``other``'s (group, split) pairs (of other rows: a group may be in both)."""
        self.parts.extend(other.parts)
        self.pending += sum(part.num_rows for part in other.parts)
        if self.pending > _GROUP_COMPACT_ROWS:
            self.parts = [_pairs(pa.concat_tables(self.parts), "sum")]
            self.pending = self.parts[0].num_rows

    def result(self) -> dict[str, Any]:
        empty = pa.table({"g": pa.array([], pa.int64()), "s": pa.array([], pa.int64())})
        pairs = _pairs(pa.concat_tables(self.parts), "sum") if self.parts else empty
        if not self.parts:
            pairs = pairs.append_column("rows", pa.array([], pa.int64()))
        split_of_pair = pairs.column("s").to_numpy()
        per_split = np.bincount(split_of_pair, minlength=self.num_splits)
        by_group = pairs.group_by("g").aggregate([("s", "count"), ("rows", "sum")])
        spanning = by_group.filter(pa.array(by_group.column("s_count").to_numpy() > 1))
        examples = spanning.column("g").sort()[:_SHOW] if spanning.num_rows else pa.array([])
        rows = pc.sum(spanning.column("rows_sum")).as_py() if spanning.num_rows else 0  # pyright: ignore[reportAttributeAccessIssue]
        return {
            "groups": by_group.num_rows,
            "groups_per_split": per_split,
            "groups_in_several_splits": spanning.num_rows,
            "rows_in_such_groups": int(rows or 0),
            "example_groups": [
                v if isinstance(v, int | float | str) else str(v) for v in examples.to_pylist()
            ],
        }


def _pairs(table: pa.Table, how: str) -> pa.Table:
    """Distinct (group, split) pairs of ``table`` with their rows (``how``: count the rows of
    raw pairs, or sum the ``rows`` of already counted ones)."""
    if how == "count":
        grouped = table.group_by(["g", "s"]).aggregate([("s", "count")])
        return grouped.rename_columns(["g", "s", "rows"]).select(["g", "s", "rows"])
    grouped = table.group_by(["g", "s"]).aggregate([("rows", "sum")])
    return grouped.rename_columns(["g", "s", "rows"]).select(["g", "s", "rows"])


class _TimeRange:
    """Per split, the smallest and largest value of an orderable column."""

    def __init__(self, num_splits: int, column: str) -> None:
        self.column = column
        self.lows: list[Any] = [None] * num_splits
        self.highs: list[Any] = [None] * num_splits

    def add(self, values: pa.Array, splits: np.ndarray) -> None:
        kind = values.type
        if not (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind)
        ):
            raise ValueError(
                f"column '{self.column}' has type {kind}, which has no time order; use a "
                "number, date or timestamp column"
            )
        array = values.to_numpy(zero_copy_only=False)
        if pa.types.is_floating(kind) and (nans := int(np.count_nonzero(np.isnan(array)))):
            raise ValueError(
                f"column '{self.column}' has {nans} NaN value(s) in one batch, which have no "
                f'time order; filter them out first, e.g. filter="NOT isnan({self.column})" '
                "(IS NOT NULL keeps NaN, which SQL does not count as null)"
            )
        for s in np.unique(splits).tolist():  # splits are few
            mine = array[splits == s]
            self._extend(s, mine.min(), mine.max())

    def merge(self, other: _TimeRange) -> None:
        """Widen these ranges by ``other``'s."""
        for s, (low, high) in enumerate(zip(other.lows, other.highs, strict=True)):
            if low is not None:
                self._extend(s, low, high)

    def _extend(self, s: int, low: Any, high: Any) -> None:
        if self.lows[s] is None or low < self.lows[s]:
            self.lows[s] = low
        if self.highs[s] is None or high > self.highs[s]:
            self.highs[s] = high


# ----------------------------------------------------------------------- check figures
def cover_figures(member: Membership, scan: Scan) -> dict[str, Any]:
    """`perm_assets.checks` ``splits_disjoint_and_complete`` figures, as its in-memory
    ``_cover`` computes them (missing: filtered rows not held; extra: held ids not among
    the filtered rows)."""
    missing = scan.scanned - scan.found
    extra = member.distinct - scan.found
    return {
        "rows": member.rows,
        "expected_rows": scan.scanned,
        "duplicate_rows": member.duplicate_rows,
        "missing_rows": int(missing),
        "extra_rows": int(extra),
        "out_of_range_ids": member.out_of_range_ids,
        "passed": member.duplicate_rows == 0
        and missing == 0
        and extra == 0
        and member.out_of_range_ids == 0,
    }


def exact(member: Membership, scan: Scan) -> bool:
    """Every filtered row is held exactly once, in a declared split, and nothing else is."""
    return bool(cover_figures(member, scan)["passed"])


def stratified_figures(scan: Scan, ratios: np.ndarray) -> dict[str, Any]:
    """`perm_assets.assign.check_stratified`'s figures from the streamed counts."""
    from perm_assets.assign import _shares  # the same exact-share rule as the assignment

    cells = scan.counts.T  # (classes, splits)
    totals = cells.sum(axis=1)
    if totals.size == 0:
        deviation, worst_class, worst_split = 0.0, None, None
    else:
        error = np.abs(cells - _shares(totals, ratios))
        worst = int(np.argmax(error))
        deviation = float(error.flat[worst])
        value = scan.label_values[worst // ratios.size]
        worst_class = value if isinstance(value, int | float | str) else str(value)
        worst_split = worst % ratios.size
    return {
        "classes": int(totals.size),
        "max_deviation_rows": round(deviation, 6),
        "worst_class": worst_class,
        "worst_split": worst_split,
        "rows_outside_splits": 0,
        "passed": deviation < 1,
    }


def normalised(ratios: list[float] | tuple[float, ...] | int) -> np.ndarray:
    """Ratios scaled to sum to 1 (``k``: k equal shares), as `assign.check_stratified`."""
    if isinstance(ratios, int):
        return np.full(ratios, 1.0 / ratios)
    values = np.asarray(ratios, dtype=np.float64)
    return values / math.fsum(values.tolist())


def group_figures(scan: Scan) -> dict[str, Any]:
    """`perm_assets.assign.check_groups`'s figures from the streamed (group, split) pairs."""
    groups = cast(dict[str, Any], scan.groups)
    return {
        "groups": int(groups["groups"]),
        "groups_in_several_splits": int(groups["groups_in_several_splits"]),
        "rows_in_such_groups": int(groups["rows_in_such_groups"]),
        "example_groups": groups["example_groups"],
        "passed": groups["groups_in_several_splits"] == 0,
    }


def time_figures(scan: Scan) -> dict[str, Any]:
    """``earlier_splits_precede_later`` figures from the streamed per-split extremes."""
    lows, highs = scan.time_min, scan.time_max
    splits = max((s + 1 for s, v in enumerate(lows) if v is not None), default=0)
    overlaps = sum(
        1
        for s in range(splits - 1)
        if lows[s + 1] is None or highs[s] is None or not highs[s] < lows[s + 1]
    )
    return {
        "split_min": [str(v) for v in lows[:splits]],
        "split_max": [str(v) for v in highs[:splits]],
        "boundaries_violated": overlaps,
        "passed": overlaps == 0,
    }


def own_fold_rows(folds: np.ndarray, low: int, ranges: list[list[int]]) -> list[int]:
    """For each fold ``i``'s training range ``ranges[i]`` (offset, rows), how many of the
    training positions ``[low, low + folds.size)`` in it hold a row of fold ``i`` (``folds``:
    the fold of each of those positions' rows)."""
    high, own = low + folds.size, []
    for i, (offset, rows) in enumerate(ranges):
        start, stop = max(offset, low, 0), min(offset + rows, high)
        own.append(
            int(np.count_nonzero(folds[start - low : stop - low] == i)) if start < stop else 0
        )
    return own
