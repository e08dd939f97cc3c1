"""The out-of-core "local" engine: permutations of more rows than fit in memory, on one machine.

lancedb's builder sorts every selected row id in one in-memory sort; this engine never holds
more than one bucket of them. A row's split and its place in the read order are pure functions
of ``(seed, row id)`` (plus, for stratified kinds, the per-class counts), so the work
partitions: any batch of rows can be keyed independently (Ray's tasks will reuse the same
functions, `order_key` / `rows_of_keys` / `split_of_rank`).

1. **Scan** the filtered rows in batches: only ``_rowid`` and the label column (if any). Each
   row gets an *assignment key* ``order_key(row_id, split seed)``, a bijection of uint64, so
   keys never tie. Rows are spilled by the key's high bits into bucket files (numpy files under
   a spill directory): bucket ``b`` holds exactly the keys in the ``b``-th slice of key space,
   so the buckets in order are the keys in order. Class counts are accumulated on the way.
2. **Assign**: the rows of each class and split follow from the counts alone
   (`perm_assets.assign` apportionment / controlled rounding, the same guarantees as the
   numpy assignment). Each bucket is sorted in memory; a row's *rank* within its class is the
   rows of its class in earlier buckets plus its position in this one, and its split is the
   interval of cumulative per-class sizes that rank falls in. Split sizes are therefore exact
   (random: within 1 row of the share; stratified: within 1 per class and split), whatever the
   bucket count. Sequential splits and unshuffled k-fold rank rows by scan position instead,
   known during the scan itself.
3. **Order**: each kept row is spilled again by split and by the high bits of its *read key*
   (``order_key(row_id, shuffle seed)``, or the row id itself without a shuffle, bucketed by
   sampled row-id boundaries), then each bucket is sorted in memory and streamed, split after
   split, into the permutation table through a ``RecordBatchReader``.

Kinds not decided by a rank (hash, calculated, group, time, unshuffled stratified folds) go
through an `_Assigner` instead of stage 2: the scan spills what the kind needs (group codes,
time keys, a row's place in its class), the split of each group or time run follows from
counts or from a bucketed sort on the time key, and each row id is written to its split's
file; stage 3 is the same. These give every row the split the in-memory path gives it.

Rows differ from lancedb's builder for the same seed (another algorithm), but for one base
table version, spec and seed the table is the same row for row, whatever the bucket and batch
sizes. Without a shuffle a split is stored in row-id order (table order for a table that was
never compacted). Spill files live in a per-run directory under ``spill_dir`` (default: the
system temporary directory), removed when the build ends; a directory left by a killed run is
removed by the next run on the machine (a running build holds a lock on it, see `Spill`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.query import LanceQueryBuilder
from lancedb.table import Table

from perm_assets import assign
from perm_assets.build import (
    PermutationData,
    _check_coverage,
    _check_key_columns,
    _count_filtered,
    check_scalar_columns,
    split_sizes,
    with_permutation_metadata,
)
from perm_assets.engines.keys import (
    _DOMAIN_ORDER,
    PERMUTATION_SCHEMA,
    calculated_splits,
    hash_splits,
    order_key,
    rows_of_keys,
    split_of_rank,
    time_key,
)
from perm_assets.errors import SpecError
from perm_assets.folds import FOLDS_KIND, TRAIN_KIND, TRAIN_SPLIT, FoldsData, _of_kind
from perm_assets.node import boot_id
from perm_assets.specs import (
    CalculatedSplit,
    FoldsSpec,
    GroupKFold,
    GroupSplit,
    HashSplit,
    KFold,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    Shuffle,
    StratifiedKFold,
    StratifiedSplit,
    TimeSplit,
)
from perm_assets.tables import BASE_VERSION_KEY, where

ALGORITHM = "local-v1"
"""Identity of this engine's assignment: part of the data version, so a change of algorithm
that changes rows marks downstream assets stale."""

SPILL_PREFIX = "perm_assets-spill-"
_OWNER_FILE = "owner.json"
# A spill directory without an owner file is being created (or its creator died before writing
# it); only one older than this is reclaimed.
_ORPHAN_SECONDS = 3600.0
_OUT_BATCH_ROWS = 1 << 20
# Up to this many classes in a bucket, each class's keys are sorted on their own.
_SEGMENT_SORT_CLASSES = 4096

log = logging.getLogger(__name__)

SUPPORTED = (
    "every split kind (RandomSplit without clump_size), KFold, StratifiedKFold, GroupKFold; "
    "Shuffle without clump_size"
)


@dataclass(frozen=True)
class LocalSettings:
    """How the local engine uses memory and disk.

    Attributes:
        spill_dir: parent of the per-run spill directories; None: the system temporary
            directory (``tempfile.gettempdir()``).
        bucket_rows: rows sorted in memory at once (about 40 bytes each at peak).
        scan_batch_rows: rows per batch read from the base table.
    """

    spill_dir: str | None = None
    bucket_rows: int = 8_000_000
    scan_batch_rows: int = 1 << 20


# ------------------------------------------------------------------------- pure functions
def _key_bucket(keys: np.ndarray, bits: int) -> np.ndarray:
    if bits == 0:
        return np.zeros(keys.size, dtype=np.int64)
    return (keys >> np.uint64(64 - bits)).astype(np.int64)


def _bits_for(rows: int, bucket_rows: int) -> int:
    """log2 of the number of buckets that keeps each near ``bucket_rows`` rows."""
    return max(0, math.ceil(math.log2(max(1, -(-rows // max(1, bucket_rows))))))


def _groups(index: np.ndarray, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(value, positions)`` for each value of a small non-negative ``index`` present."""
    # numpy's stable sort of 8/16-bit keys is a radix sort: narrow the (small) index first.
    narrow = index.astype(np.uint16) if count <= 1 << 16 else index
    order = np.argsort(narrow, kind="stable")
    sizes = np.bincount(index, minlength=count)
    start = 0
    for value in np.flatnonzero(sizes).tolist():
        stop = start + int(sizes[value])
        yield value, order[start:stop]
        start = stop


# ---------------------------------------------------------------------------------- spill
# Owner files of this process's running builds. A child forked without exec (a DataLoader
# worker, a subprocess helper) would share their locks and keep a killed build's folder from
# being reclaimed until it exits: the child closes its copies (close(2) without LOCK_UN leaves
# the parent's lock in place).
_HELD: weakref.WeakSet[IO[str]] = weakref.WeakSet()


_AT_FORK: list[bool] = []  # the hook is registered on the first build, not at import


def _drop_inherited_locks() -> None:
    for owner in list(_HELD):
        with contextlib.suppress(OSError):
            # /dev/null over the inherited descriptor: its reference to the locked file goes
            # (without LOCK_UN: the parent keeps its lock) and a later close() still works.
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, owner.fileno())
            os.close(null)
    _HELD.clear()


class Spill:
    """A per-run spill directory under ``root``, removed on exit (whatever happens).

    The build holds an exclusive ``flock`` on the directory's owner file for as long as it
    runs; the kernel drops it when the process ends, SIGKILL included. Entering a new spill
    first removes the directories of this host whose lock is free (a SIGKILL leaves no chance
    to clean up). A lock, not a process id: a build in another PID namespace (a container, a
    ``unshare --pid`` sandbox) sharing this folder sees other pids or none, and once removed a
    live build's bucket files under it (a missing bucket file reads as an empty bucket).
    ``spill_dir`` must be a local file system: NFS turns ``flock`` into locks that a reader
    cannot take, so folders of killed builds there are never reclaimed.
    """

    def __init__(self, root: str | None) -> None:
        self.root = Path(root or tempfile.gettempdir())
        self.path: Path | None = None
        self.bytes_written = 0
        self.needed = 0
        self._owner: IO[str] | None = None

    def __enter__(self) -> Spill:
        self.root.mkdir(parents=True, exist_ok=True)
        if not _AT_FORK:
            os.register_at_fork(after_in_child=_drop_inherited_locks)
            _AT_FORK.append(True)
        reclaim(self.root)
        self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self.root))
        # Locked before anything is written to it: `reclaim` skips an owner file it cannot
        # parse, so it can never see a complete owner file whose lock is not yet held.
        owner = open(self.path / _OWNER_FILE, "w")  # held, so locked, until __exit__
        fcntl.flock(owner, fcntl.LOCK_EX)
        owner.write(
            json.dumps({"host": socket.gethostname(), "boot": boot_id(), "pid": os.getpid()})
        )
        owner.flush()
        self._owner = owner
        _HELD.add(owner)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        if self._owner is not None:
            _HELD.discard(self._owner)
            self._owner.close()  # releases the lock, after the folder is gone
            self._owner = None

    def _file(self, name: str) -> Path:
        assert self.path is not None, "spill used outside its with-block"
        return self.path / name

    def _intact(self) -> None:
        """RuntimeError when this build's folder was removed under it: its bucket files would
        otherwise read as empty buckets, and the build would write other rows."""
        assert self.path is not None, "spill used outside its with-block"
        if not (self.path / _OWNER_FILE).exists():
            raise RuntimeError(
                f"local engine: spill folder '{self.path}' was removed during the build (by "
                "another process sharing this spill_dir?); nothing was written; re-run"
            )

    def require_space(self, needed: int) -> None:
        """SpecError naming the directory when it lacks ``needed`` bytes."""
        self.needed = needed
        free = shutil.disk_usage(self._file(".")).free
        if free < needed:
            raise SpecError(
                f"local engine: spill directory '{self.root}' has {free / 2**30:.2f} GiB free "
                f"but this build needs about {needed / 2**30:.2f} GiB; free space there or set "
                "LanceDBResource(spill_dir=...) to a larger local disk"
            )

    def append(self, name: str, values: np.ndarray) -> None:
        try:
            with open(self._file(name), "ab") as out:
                values.tofile(out)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SpecError(
                    f"local engine: spill directory '{self.root}' filled up after "
                    f"{self.bytes_written / 2**30:.2f} GiB of spill files (this build needs "
                    f"about {self.needed / 2**30:.2f} GiB); free space there or set "
                    "LanceDBResource(spill_dir=...) to a larger local disk"
                ) from exc
            raise
        self.bytes_written += values.nbytes

    def read(self, name: str, dtype: type[np.generic]) -> np.ndarray:
        path = self._file(name)
        if not path.exists():
            self._intact()
            return np.zeros(0, dtype=dtype)
        return np.fromfile(path, dtype=dtype)

    def chunks(self, name: str, dtype: type[np.generic], rows: int) -> Iterator[np.ndarray]:
        path = self._file(name)
        if not path.exists():
            self._intact()
            return
        with open(path, "rb") as source:
            while True:
                chunk = np.fromfile(source, dtype=dtype, count=rows)
                if chunk.size == 0:
                    return
                yield chunk

    def remove(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


def reclaim(root: Path) -> int:
    """Remove spill directories under ``root`` left by ended builds of this host (their owner
    file's lock is free); their count. A running build's directory is left alone, whichever
    process or PID namespace it runs in; another host's too (its lock may not reach here)."""
    removed = 0
    host, boot = socket.gethostname(), boot_id()
    for entry in root.glob(SPILL_PREFIX + "*"):
        if not entry.is_dir():
            continue
        try:
            with open(entry / _OWNER_FILE) as owner_file:
                try:
                    owner = json.loads(owner_file.read())
                except ValueError:  # its build died between taking the lock and writing
                    owner = None
                # One kernel (one boot id: containers of one machine, whatever their host
                # names) makes the lock authoritative; otherwise only this host's folders.
                same_kernel = bool(boot) and owner is not None and owner.get("boot") == boot
                if owner is not None and not same_kernel and owner.get("host") != host:
                    continue
                try:
                    fcntl.flock(owner_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its build is running
                if owner is None and not _older_than(entry, _ORPHAN_SECONDS):
                    continue  # being created right now, or its creator just died
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        except FileNotFoundError:
            if _older_than(entry, _ORPHAN_SECONDS):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        except OSError:
            continue  # unreadable
    if removed:
        log.warning(
            "local engine: removed %d spill folder(s) of killed builds in %s", removed, root
        )
    return removed


# ------------------------------------------------------------------------------ the plan
class _Classes:
    """Distinct labels in order of first appearance and their running counts (columnar: a
    label with many distinct values costs no Python loop)."""

    def __init__(self) -> None:
        self.lookup: pa.Array | None = None
        self.counts = np.zeros(0, dtype=np.int64)

    @classmethod
    def of(cls, lookup: pa.Array, counts: np.ndarray) -> _Classes:
        """The classes of an already counted scan (the Ray engine's census): ``lookup`` in
        order of first appearance, ``counts`` their rows."""
        classes = cls()
        classes.lookup, classes.counts = lookup, np.asarray(counts, dtype=np.int64)
        return classes

    def codes(self, labels: pa.Array) -> np.ndarray:
        """Code of each label (its index in order of first appearance), counted."""
        unique = pc.unique(labels)  # pyright: ignore[reportAttributeAccessIssue]
        lookup = self.lookup
        if lookup is None:
            lookup = unique
        else:
            seen = pc.is_in(unique, value_set=lookup)  # pyright: ignore[reportAttributeAccessIssue]
            new = pc.filter(unique, pc.invert(seen))  # pyright: ignore[reportAttributeAccessIssue]
            if len(new):
                lookup = pa.concat_arrays([lookup, new])
        self.lookup = lookup
        grown = len(lookup) - self.counts.size
        if grown:
            self.counts = np.concatenate([self.counts, np.zeros(grown, dtype=np.int64)])
        codes = pc.index_in(labels, value_set=lookup)  # pyright: ignore[reportAttributeAccessIssue]
        codes = codes.to_numpy().astype(np.int64)
        self.counts += np.bincount(codes, minlength=self.counts.size)
        return codes

    def sorted_order(self) -> np.ndarray:
        """Code of each class in ascending label order (so the assignment does not depend on
        which class the scan met first)."""
        if self.lookup is None:
            return np.zeros(0, dtype=np.int64)
        order = np.asarray(pc.array_sort_indices(self.lookup))  # pyright: ignore[reportAttributeAccessIssue]
        remap = np.empty(order.size, dtype=np.int64)
        remap[order] = np.arange(order.size)
        return remap

    def fewer_than(self, rows: int) -> dict[str, int]:
        """``{label: count}`` of the classes with fewer than ``rows`` rows."""
        if self.lookup is None:
            return {}
        small = np.flatnonzero(self.counts < rows)
        values = self.lookup.take(pa.array(small)).to_pylist()
        return {str(v): int(c) for v, c in zip(values, self.counts[small].tolist(), strict=True)}


# ------------------------------------------------- kinds decided per row, group or time
def null_error(column: str, nulls: str, *, asset: str, table: str) -> SpecError:
    """The error for null values of a label, group or time column (``nulls``: how many)."""
    return SpecError(
        f"asset '{asset}': column '{column}' of table '{table}' has null values among the "
        f"selected rows ({nulls}); a row with no {column} cannot be placed safely. Drop them "
        f'with filter "{column} IS NOT NULL" (combined with AND)'
    )


def _no_nulls(values: pa.Array, column: str, *, asset: str, table: str) -> None:
    if values.null_count:
        raise null_error(
            column, f"{values.null_count} in one scanned batch", asset=asset, table=table
        )


def _to_splits(spill: Spill, row_ids: np.ndarray, split: np.ndarray, counts: np.ndarray) -> None:
    """Append each row id to its split's file ``p{s}``; a split of ``counts.size`` or more
    is left out (a discarding hash split)."""
    for s, at in _groups(split, counts.size + 1):
        if s < counts.size:
            spill.append(f"p{s}", row_ids[at])
            counts[s] += at.size


def _rank_in_code(codes: np.ndarray, count: int) -> np.ndarray:
    """Position of each row among the rows of its code in this array (in array order)."""
    order = np.argsort(codes, kind="stable")
    per_code = np.bincount(codes, minlength=count)
    starts = np.cumsum(per_code) - per_code
    rank = np.empty(codes.size, dtype=np.int64)
    rank[order] = np.arange(codes.size, dtype=np.int64) - np.repeat(starts, per_code)
    return rank


class _Assigner:
    """A split decided by something other than a rank in assignment-key order: a per-row
    function (hash, calculated), the row's group, its time, or its place in its class in
    table order. `scan` sees each scanned batch once and spills what it needs; `assign` then
    appends each kept row id to its split's file ``p{s}`` and returns the rows per split."""

    columns: list[str] | dict[str, Any]
    spill_bytes_per_row = 16  # peak spill bytes per row, for the free-space check
    what = "the scan"  # named when the scan fails

    def __init__(self, num_splits: int, *, asset: str, table: str) -> None:
        self.counts = np.zeros(num_splits, dtype=np.int64)
        self.asset, self.table = asset, table
        self.classes = _Classes()  # labels, for kinds that stratify

    def scan(self, batch: pa.RecordBatch, row_ids: np.ndarray, spill: Spill) -> None:
        raise NotImplementedError

    def assign(self, spill: Spill, settings: LocalSettings) -> np.ndarray:
        return self.counts


class _Calculated(_Assigner):
    """`CalculatedSplit`: the expression evaluated by the scan itself, range-checked."""

    def __init__(self, split: CalculatedSplit, names: list[str], *, asset: str, table: str):
        super().__init__(len(names), asset=asset, table=table)
        self.expression, self.names = split.expression, names
        self.columns = {"split": cast(str, where(split.expression))}
        self.what = f"calculated split expression {split.expression!r}"

    def splits(self, values: pa.Array, row_ids: np.ndarray) -> np.ndarray:
        """Split of each row from the expression's ``values`` (`calculated_splits`)."""
        return calculated_splits(values, row_ids, **self.check())

    def check(self) -> dict[str, Any]:
        """`calculated_splits`' arguments besides the rows: plain values, for Ray's tasks."""
        return {"names": self.names, "what": self.what, "asset": self.asset, "table": self.table}

    def scan(self, batch: pa.RecordBatch, row_ids: np.ndarray, spill: Spill) -> None:
        _to_splits(spill, row_ids, self.splits(batch.column("split"), row_ids), self.counts)


class _Hash(_Assigner):
    """`HashSplit` by lancedb's own hash, a batch at a time.

    lancedb exposes its hash split only as a whole-table builder (DataFusion's ``create_hashes``
    with a fixed seed over the columns, in Rust). Re-implementing that hash would risk moving
    rows between versions, which is what hash splits promise not to do, so each scanned batch
    of the hash columns is put in an in-memory Lance table and split by the same builder: a
    row's split is the one lancedb's in-memory path gives it (it depends on the values only).
    """

    def __init__(self, split: HashSplit, *, asset: str, table: str) -> None:
        super().__init__(split.num_splits, asset=asset, table=table)
        self.split = split
        self.columns = list(split.columns)
        self.name = f"hash_{os.getpid()}_{id(self)}"
        self.db = lancedb.connect("memory://")

    def scan(self, batch: pa.RecordBatch, row_ids: np.ndarray, spill: Spill) -> None:
        data = pa.Table.from_batches([batch]).select(self.columns)
        split = hash_splits(data, self.split, self.db, self.name)
        _to_splits(spill, row_ids, split, self.counts)

    def assign(self, spill: Spill, settings: LocalSettings) -> np.ndarray:
        self.db.drop_table(self.name)
        return self.counts


def group_splits(sizes: np.ndarray, ratios: list[float], seed: int) -> np.ndarray:
    """Split of each group of `assign.group_split` from the group sizes alone (groups in
    ascending key order): for integer keys the very splits `assign.group_split` gives."""
    r = assign._normalised_ratios(ratios)
    rng = assign._check_seed(seed)
    perm = rng.permutation(sizes.size)
    bounds = np.cumsum(assign.apportion(int(sizes.sum()), r.tolist()))[None, :-1]
    out = np.empty(sizes.size, dtype=np.int64)
    out[perm] = assign._cut(np.zeros(sizes.size, dtype=np.int64), sizes[perm], bounds)
    return out


def stratified_group_splits(
    sizes: np.ndarray,
    pairs: np.ndarray,
    pair_rows: np.ndarray,
    num_labels: int,
    ratios: list[float],
    seed: int,
) -> np.ndarray:
    """Split of each group of `assign.stratified_group_split` from counts alone: ``sizes``
    per group, ``pairs`` = ``group * num_labels + label`` (ascending, codes in ascending key
    order) with their row counts. The same steps and random draws, so for integer keys the
    same splits."""
    r = assign._normalised_ratios(ratios)
    rng = assign._check_seed(seed)
    pair_group = pairs // num_labels
    score = pair_rows + 0.5 * rng.random(pairs.size)
    group_start = np.flatnonzero(np.r_[True, pair_group[1:] != pair_group[:-1]])
    best = np.maximum.reduceat(score, group_start)
    winners = np.flatnonzero(score == best[pair_group])
    winners = winners[np.r_[True, pair_group[winners][1:] != pair_group[winners][:-1]]]
    stratum = np.empty(sizes.size, dtype=np.int64)
    stratum[pair_group[winners]] = pairs[winners] % num_labels
    stratum_rows = np.bincount(stratum, weights=sizes, minlength=num_labels).astype(np.int64)
    targets = np.cumsum(assign._round_matrix(stratum_rows, r, rng), axis=1)[:, :-1]
    order = assign._grouped_order(stratum.astype(assign._code_dtype(num_labels)), rng)
    out = np.empty(sizes.size, dtype=np.int64)
    out[order] = assign._cut(stratum[order], sizes[order], targets)
    return out


_PAIR_SHIFT = np.int64(32)


class _Group(_Assigner):
    """`GroupSplit` / `GroupKFold`: group sizes (and, stratified, rows per (group, label)) are
    counted in the scan, which spills each row id with its group's code; the groups' splits
    follow from the counts (far fewer than rows), then each row follows its group."""

    spill_bytes_per_row = 24

    def __init__(
        self,
        group: str,
        label: str | None,
        decide: Callable[..., np.ndarray],
        num_splits: int,
        *,
        asset: str,
        table: str,
    ) -> None:
        super().__init__(num_splits, asset=asset, table=table)
        self.group, self.label, self.decide = group, label, decide
        self.columns = [group] if label is None else [group, label]
        self.groups = _Classes()
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending, self.reduced = 0, 0

    def scan(self, batch: pa.RecordBatch, row_ids: np.ndarray, spill: Spill) -> None:
        groups = batch.column(self.group)
        _no_nulls(groups, self.group, asset=self.asset, table=self.table)
        codes = self.groups.codes(groups)
        spill.append("g", row_ids)
        spill.append("gc", codes)
        if self.label is not None:
            labels = batch.column(self.label)
            _no_nulls(labels, self.label, asset=self.asset, table=self.table)
            pairs = (codes << _PAIR_SHIFT) | self.classes.codes(labels)
            self.pairs.append(assign._unique_counts(pairs))
            self.pending += self.pairs[-1][0].size
            if self.pending > 2 * self.reduced + (1 << 22):  # bounded by the distinct pairs
                self._reduce()

    def _reduce(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.concatenate([p for p, _ in self.pairs])
        rows = np.concatenate([r for _, r in self.pairs])
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else keys
        merged = (keys[starts], np.add.reduceat(rows, starts) if keys.size else rows)
        self.pairs = [merged]
        self.pending = self.reduced = merged[0].size
        return merged

    def split_of_code(self, pairs: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Split of each group code of ``self.groups`` from its counts and, stratified, from
        ``pairs``: ``(group code << 32 | label code of self.classes, rows)``, each pair once.
        The Ray engine calls it with the classes of its census."""
        remap = self.groups.sorted_order()  # code -> rank in ascending key order
        sizes = np.zeros(remap.size, dtype=np.int64)
        sizes[remap] = self.groups.counts
        try:
            if self.label is None:
                sorted_splits = self.decide(sizes)
            else:
                assert pairs is not None
                keys, rows = pairs
                num_labels = self.classes.counts.size
                labels = self.classes.sorted_order()[keys & np.int64(0xFFFFFFFF)]
                pair_codes = remap[keys >> _PAIR_SHIFT] * num_labels + labels
                order = np.argsort(pair_codes)
                sorted_splits = self.decide(sizes, pair_codes[order], rows[order], num_labels)
        except ValueError as exc:
            raise SpecError(f"asset '{self.asset}', table '{self.table}': {exc}") from exc
        return sorted_splits[remap]

    def assign(self, spill: Spill, settings: LocalSettings) -> np.ndarray:
        split_of_code = self.split_of_code(None if self.label is None else self._reduce())
        chunks = zip(
            spill.chunks("g", np.uint64, settings.bucket_rows),
            spill.chunks("gc", np.int64, settings.bucket_rows),
            strict=True,
        )
        for row_ids, codes in chunks:
            _to_splits(spill, row_ids, split_of_code[codes], self.counts)
        spill.remove("g")
        spill.remove("gc")
        return self.counts


class _Time(_Assigner):
    """`TimeSplit`: the bucketed external sort on the time key. Bucket boundaries are time
    values (from a sample), so equal times share a bucket and buckets in order are times in
    order; each bucket is sorted in memory, and a run of equal times goes to the split holding
    its middle row (`assign.time_split`'s rule, on global positions): the same split per row
    as the in-memory path, whatever the bucket sizes. A bucket holds at least all rows of one
    time, so a single time shared by more rows than fit in memory does not fit here either."""

    spill_bytes_per_row = 32
    _SAMPLE_PER_BUCKET = 64

    def __init__(
        self, split: TimeSplit, n: int, settings: LocalSettings, *, asset: str, table: str
    ) -> None:
        super().__init__(split.num_splits, asset=asset, table=table)
        self.column, self.n = split.column, n
        self.columns = [split.column]
        self.bits = _bits_for(n, settings.bucket_rows)
        self.every = max(1, n // (self._SAMPLE_PER_BUCKET << self.bits))
        self.targets = np.cumsum(assign.apportion(n, list(split.ratios)))[:-1]
        self.sample: list[np.ndarray] = []
        self.position = 0

    def scan(self, batch: pa.RecordBatch, row_ids: np.ndarray, spill: Spill) -> None:
        values = batch.column(self.column)
        _no_nulls(values, self.column, asset=self.asset, table=self.table)
        try:
            keys = time_key(values, self.column)
        except ValueError as exc:
            raise SpecError(f"asset '{self.asset}', table '{self.table}': {exc}") from exc
        first = (-self.position) % self.every  # every k-th row of the scan: batch-size free
        self.sample.append(keys[first :: self.every].copy())
        self.position += keys.size
        spill.append("tk", keys)
        spill.append("tr", row_ids)

    def assign(self, spill: Spill, settings: LocalSettings) -> np.ndarray:
        pool = np.sort(np.concatenate(self.sample)) if self.sample else np.zeros(0, np.uint64)
        parts = 1 << self.bits
        bounds = np.unique(pool[(np.arange(1, parts) * pool.size) // parts])
        buckets = bounds.size + 1
        chunks = zip(
            spill.chunks("tk", np.uint64, settings.bucket_rows),
            spill.chunks("tr", np.uint64, settings.bucket_rows),
            strict=True,
        )
        for keys, row_ids in chunks:
            which = np.searchsorted(bounds, keys, side="right")
            for b, at in _groups(which, buckets):
                spill.append(f"tb{b}", keys[at])
                spill.append(f"tv{b}", row_ids[at])
        spill.remove("tk")
        spill.remove("tr")
        done = 0  # rows in earlier buckets: the global position of this bucket's first row
        for b in range(buckets):
            keys = spill.read(f"tb{b}", np.uint64)
            order = np.argsort(keys)  # rows of one time share a split: any order among them
            keys, row_ids = keys[order], spill.read(f"tv{b}", np.uint64)[order]
            spill.remove(f"tb{b}")
            spill.remove(f"tv{b}")
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else keys
            sizes = np.diff(np.r_[starts, keys.size]).astype(np.int64)
            twice_mid = 2 * (done + starts.astype(np.int64)) + sizes
            run_split = np.zeros(sizes.size, dtype=np.int64)
            for target in self.targets.tolist():  # a loop over splits only
                run_split += twice_mid >= 2 * target
            _to_splits(spill, row_ids, np.repeat(run_split, sizes), self.counts)
            done += keys.size
        return self.counts


class _FoldsInOrder(_Assigner):
    """`StratifiedKFold(shuffle=False)` as `assign.stratified_kfold`: classes in order of
    first appearance, each class's rows in table order. A row's place in its class is known in
    the scan; its class's rows per fold only once all classes are counted."""

    spill_bytes_per_row = 24

    def __init__(self, label: str, k: int, *, asset: str, table: str) -> None:
        super().__init__(k, asset=asset, table=table)
        self.label = label
        self.columns = [label]

    def scan(self, batch: pa.RecordBatch, row_ids: np.ndarray, spill: Spill) -> None:
        labels = batch.column(self.label)
        _no_nulls(labels, self.label, asset=self.asset, table=self.table)
        before = self.classes.counts.copy()  # codes() adds to it in place
        codes = self.classes.codes(labels)  # codes by first appearance, as scikit-learn's
        earlier = np.zeros(self.classes.counts.size, dtype=np.int64)
        earlier[: before.size] = before
        spill.append("fr", row_ids)
        spill.append("fc", codes)
        spill.append("fi", earlier[codes] + _rank_in_code(codes, earlier.size))

    def ends(self) -> np.ndarray:
        """Cumulative rows per (class, fold), classes by first appearance (their codes)."""
        return in_order_ends(self.classes.counts, self.counts.size)

    def assign(self, spill: Spill, settings: LocalSettings) -> np.ndarray:
        ends = self.ends()
        chunks = zip(
            spill.chunks("fr", np.uint64, settings.bucket_rows),
            spill.chunks("fc", np.int64, settings.bucket_rows),
            spill.chunks("fi", np.int64, settings.bucket_rows),
            strict=True,
        )
        for row_ids, codes, index in chunks:
            _to_splits(spill, row_ids, split_of_rank(index, ends, codes), self.counts)
        for name in ("fr", "fc", "fi"):
            spill.remove(name)
        return self.counts


def in_order_ends(counts: np.ndarray, k: int) -> np.ndarray:
    """`StratifiedKFold(shuffle=False)`'s cumulative rows per (class, fold) for classes of
    ``counts`` rows (in order of first appearance): the round-robin over the class-sorted rows,
    each class's rows filling its folds in table order, fold 0 first (as
    `assign.stratified_kfold` with shuffle=False)."""
    end = np.cumsum(counts)[:, None]
    start = end - counts[:, None]
    fold = np.arange(k)[None, :]
    return np.cumsum((end - fold - 1) // k - (start - fold - 1) // k, axis=1)


@dataclass(frozen=True)
class _Job:
    """One build: which rows, which label, how sizes follow from class counts, which keys."""

    filter: str | None
    label: str | None
    num_splits: int
    sizes: Callable[[np.ndarray], np.ndarray]
    """class counts (ascending label order) → rows per (class, split)."""
    split_seed: int | None
    """None: rank by scan position (sequential kinds, single class only)."""
    shuffle_seed: int | None
    assigner: _Assigner | None = None
    """Set: the split is decided by it (per row, group or time), not by a rank."""


@dataclass
class _Result:
    spill: Spill
    split_rows: np.ndarray
    bucket_bits: list[int]
    shuffle_seed: int | None
    filtered_rows: int
    classes: _Classes

    def batches(self, split: int) -> Iterator[pa.RecordBatch]:
        """Split ``split``'s rows in read order, bucket after bucket."""
        ids = pa.array(np.full(_OUT_BATCH_ROWS, split, dtype=np.uint64))
        for bucket in range(1 << self.bucket_bits[split]):
            name = f"c{split}_{bucket}"
            values = self.spill.read(name, np.uint64)
            values.sort()
            if self.shuffle_seed is not None:
                values = rows_of_keys(values, self.shuffle_seed, _DOMAIN_ORDER)
            for start in range(0, values.size, _OUT_BATCH_ROWS):
                chunk = values[start : start + _OUT_BATCH_ROWS]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(chunk), ids.slice(0, chunk.size)], schema=_SCHEMA
                )


_SCHEMA = PERMUTATION_SCHEMA


def _scanned(
    query: LanceQueryBuilder, batch_rows: int, *, what: str, asset: str, table: Table
) -> Iterator[pa.RecordBatch]:
    """The query's batches; a failing scan (e.g. a calculated split's expression that is not
    valid SQL on the table) is a SpecError naming the asset, the table and its columns."""
    batches: Iterator[pa.RecordBatch] | None = None
    while True:
        try:
            if batches is None:
                batches = iter(query.to_batches(batch_size=batch_rows))
            batch = next(batches)
        except StopIteration:
            return
        except (ValueError, RuntimeError, OSError) as exc:
            raise SpecError(
                f"asset '{asset}': {what} failed on table '{table.name}' (columns: "
                f"{', '.join(table.schema.names)}): {type(exc).__name__}: {exc}"
            ) from exc
        yield batch


def _run(table: Table, job: _Job, spill: Spill, settings: LocalSettings, *, n: int, asset: str):
    """Scan, assign and spill in read order (stages 1-3 up to the final sort); see the module
    docstring."""
    assigner = job.assigner
    bytes_per_row = 8 + (4 if job.label else 0)
    if assigner is not None:
        bytes_per_row = assigner.spill_bytes_per_row
    spill.require_space(n * (bytes_per_row + 8) + (64 << 20))
    bits = _bits_for(n, settings.bucket_rows)
    classes = _Classes()
    shuffled = job.shuffle_seed is not None
    # Sequential ranks and their sizes are known before the scan (one class, n rows).
    ends = np.zeros((1, 0), dtype=np.int64)
    if assigner is None and job.split_seed is None:
        ends = np.cumsum(job.sizes(np.array([n], dtype=np.int64)), axis=1)
    sample: list[np.ndarray] = []
    sample_every = max(1, n // 4096)
    position = 0
    columns: list[str] | dict[str, Any] = [job.label] if job.label else ["_rowid"]
    if assigner is not None:
        columns = assigner.columns
    query = table.search().select(columns).with_row_id(True)
    if job.filter is not None:
        query = query.where(cast(str, where(job.filter)))
    what = assigner.what if assigner is not None else "the scan"
    for batch in _scanned(query, settings.scan_batch_rows, what=what, asset=asset, table=table):
        row_ids = batch.column("_rowid").to_numpy().astype(np.uint64, copy=False)
        size = row_ids.size
        if size == 0:
            continue
        if not shuffled:  # row-id boundaries of the unshuffled read order, every k-th row
            first = (-position) % sample_every
            sample.append(row_ids[first::sample_every].copy())
        if assigner is not None:
            assigner.scan(batch, row_ids, spill)
        elif job.split_seed is None:
            rank = np.arange(position, position + size, dtype=np.int64)
            split = split_of_rank(rank, ends, None)
            for s, at in _groups(split, job.num_splits + 1):
                if s < job.num_splits:
                    spill.append(f"p{s}", row_ids[at])
        else:
            keys = order_key(row_ids, job.split_seed)
            codes = None
            if job.label is not None:
                labels = batch.column(job.label)
                _no_nulls(labels, job.label, asset=asset, table=table.name)
                codes = classes.codes(labels)
            for b, at in _groups(_key_bucket(keys, bits), 1 << bits):
                spill.append(f"a{b}", keys[at])
                if codes is not None:
                    spill.append(f"l{b}", codes[at].astype(np.int32))
        position += size
    if position != n:
        raise SpecError(
            f"asset '{asset}': table '{table.name}' changed during the build ({n} rows counted, "
            f"{position} scanned at version {table.version}); re-run"
        )

    # Sizes per (class, split), classes in ascending label order.
    if assigner is not None:
        remap, counts = None, np.array([n], dtype=np.int64)
        classes = assigner.classes
        matrix = assigner.assign(spill, settings)[None, :]
    else:
        if job.label is not None:
            remap = classes.sorted_order()
            counts = np.zeros(classes.counts.size, dtype=np.int64)
            counts[remap] = classes.counts
        else:
            remap, counts = None, np.array([n], dtype=np.int64)
        matrix = np.asarray(job.sizes(counts), dtype=np.int64)
    split_rows = matrix.sum(axis=0)
    out_bits = [_bits_for(int(r), settings.bucket_rows) for r in split_rows]
    bounds: list[np.ndarray] = []
    if not shuffled:
        pool = np.sort(np.concatenate(sample)) if sample else np.zeros(0, np.uint64)
        for b in out_bits:
            parts = 1 << b
            picks = (np.arange(1, parts) * pool.size) // parts
            bounds.append(pool[picks])

    emitted = np.zeros(job.num_splits, dtype=np.int64)

    def emit(row_ids: np.ndarray, split: np.ndarray) -> None:
        for s, at in _groups(split, job.num_splits + 1):
            if s >= job.num_splits:
                continue  # left out on purpose (counts, allow_discard)
            rows = row_ids[at]
            emitted[s] += rows.size
            if shuffled:
                values = order_key(rows, cast(int, job.shuffle_seed), _DOMAIN_ORDER)
                buckets = _key_bucket(values, out_bits[s])
            else:
                values = rows
                buckets = np.searchsorted(bounds[s], rows, side="right").astype(np.int64)
            for b, where_b in _groups(buckets, 1 << out_bits[s]):
                spill.append(f"c{s}_{b}", values[where_b])

    if assigner is not None or job.split_seed is None:  # rows already in split files p{s}
        for s in range(job.num_splits):
            for chunk in spill.chunks(f"p{s}", np.uint64, settings.bucket_rows):
                emit(chunk, np.full(chunk.size, s, dtype=np.int64))
            spill.remove(f"p{s}")
    else:
        ends_by_class = np.cumsum(matrix, axis=1)
        done = np.zeros(counts.size, dtype=np.int64)  # rows of each class in earlier buckets
        for b in range(1 << bits):
            keys = spill.read(f"a{b}", np.uint64)
            if job.label is None:
                keys.sort()
                rank = np.arange(done[0], done[0] + keys.size, dtype=np.int64)
                done[0] += keys.size
                split = split_of_rank(rank, ends_by_class, None)
            else:
                assert remap is not None
                codes = remap[spill.read(f"l{b}", np.int32)]
                per_class = np.bincount(codes, minlength=counts.size)
                present = np.flatnonzero(per_class)
                if present.size <= _SEGMENT_SORT_CLASSES:
                    # Rows grouped by class (a radix sort of the narrow codes), then each
                    # class's keys sorted in place: about half the time of an argsort.
                    narrow = codes.astype(np.uint16) if counts.size <= 1 << 16 else codes
                    keys = keys[np.argsort(narrow, kind="stable")]
                    starts = np.cumsum(per_class) - per_class
                    for c in present.tolist():  # a loop over classes, not rows
                        keys[starts[c] : starts[c] + per_class[c]].sort()
                    codes = np.repeat(np.arange(counts.size), per_class)
                else:  # many classes: one argsort by key, then rows grouped by class
                    order = np.lexsort((keys, codes))
                    keys, codes = keys[order], codes[order]
                    starts = np.cumsum(per_class) - per_class
                # Rank within the class: rows of it in earlier buckets, then position in it.
                rank = np.arange(keys.size, dtype=np.int64) - np.repeat(starts - done, per_class)
                done += per_class
                split = split_of_rank(rank, ends_by_class, codes)
            emit(rows_of_keys(keys, job.split_seed), split)
            spill.remove(f"a{b}")
            spill.remove(f"l{b}")
    if not np.array_equal(emitted, split_rows):
        raise RuntimeError(f"local engine: emitted {emitted.tolist()}, planned {split_rows}")
    return _Result(
        spill=spill,
        split_rows=split_rows,
        bucket_bits=out_bits,
        shuffle_seed=job.shuffle_seed,
        filtered_rows=n,
        classes=classes,
    )


# --------------------------------------------------------------------------- permutations
def unsupported(spec: PermutationSpec | FoldsSpec) -> str | None:
    """What of ``spec`` this engine cannot build yet (None: all of it)."""
    shuffle = spec.shuffle
    if shuffle is not None and shuffle.clump_size not in (None, 1):
        return "Shuffle(clump_size=...)"
    if isinstance(spec, PermutationSpec):
        split = spec.split
        if isinstance(split, RandomSplit) and split.clump_size not in (None, 1):
            return "RandomSplit(clump_size=...)"
        return None
    folds = spec.folds
    if isinstance(folds, KFold | StratifiedKFold | GroupKFold):
        return None
    return type(folds).__name__


def _refuse(spec: PermutationSpec | FoldsSpec, *, asset: str) -> None:
    missing = unsupported(spec)
    if missing is not None:
        raise SpecError(
            f"asset '{asset}': engine 'local' does not build {missing} yet (it builds: "
            f"{SUPPORTED}); use LanceDBResource(engine='lancedb') or engine='auto' for it"
        )


def _shuffle_seed(shuffle: Shuffle | None) -> int | None:
    if shuffle is None:
        return None
    assert shuffle.seed is not None  # seeds are resolved before building
    return shuffle.seed


def _single(sizes: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda counts: np.asarray(sizes, dtype=np.int64)[None, :]


def _split_job(
    table: Table, spec: PermutationSpec, n: int, settings: LocalSettings, *, asset: str
) -> _Job:
    split = spec.split
    shuffle_seed = _shuffle_seed(spec.shuffle)
    if split is None:
        return _Job(spec.filter, None, 1, _single(np.array([n])), None, shuffle_seed)
    num = split.num_splits
    where_ = {"asset": asset, "table": table.name}
    assigner: _Assigner | None = None
    if isinstance(split, HashSplit):
        assigner = _Hash(split, **where_)
    elif isinstance(split, CalculatedSplit):
        assigner = _Calculated(split, spec.split_names(), **where_)
    elif isinstance(split, TimeSplit):
        assigner = _Time(split, n, settings, **where_)
    elif isinstance(split, GroupSplit):
        assert split.seed is not None
        group_ratios, group_seed = list(split.ratios), int(split.seed)
        if split.label is None:

            def decide(sizes: np.ndarray, *pairs: object) -> np.ndarray:
                return group_splits(sizes, group_ratios, group_seed)
        else:

            def decide(sizes: np.ndarray, *pairs: object) -> np.ndarray:
                keys, rows, labels = cast(tuple[np.ndarray, np.ndarray, int], pairs)
                return stratified_group_splits(sizes, keys, rows, labels, group_ratios, group_seed)

        assigner = _Group(split.group, split.label, decide, num, **where_)
    if assigner is not None:
        return _Job(spec.filter, None, num, _single(np.zeros(num)), None, shuffle_seed, assigner)
    if isinstance(split, StratifiedSplit):
        assert split.seed is not None
        ratios, seed = list(split.ratios), split.seed

        def stratified(counts: np.ndarray) -> np.ndarray:
            return assign.stratified_counts(counts, ratios, seed)

        return _Job(spec.filter, split.label, len(ratios), stratified, seed, shuffle_seed)
    assert isinstance(split, RandomSplit | SequentialSplit)
    sizes = split_sizes(split, n, asset=asset)
    seed = split.seed if isinstance(split, RandomSplit) else None
    return _Job(spec.filter, None, sizes.size, _single(sizes), seed, shuffle_seed)


def _check_sizes(names: list[str], rows: np.ndarray, *, asset: str) -> None:
    sizes = dict(zip(names, rows.tolist(), strict=True))
    empty = [name for name, count in sizes.items() if count == 0]
    if empty:
        raise SpecError(
            f"asset '{asset}': split(s) {empty} would be empty (rows per split: {sizes}); "
            "use larger ratios or fewer splits, or loosen the filter"
        )


def _schema_only(*, base_version: int, base_table: str, names: list[str], spec) -> pa.Table:
    empty = _SCHEMA.empty_table().replace_schema_metadata({BASE_VERSION_KEY: str(base_version)})
    return with_permutation_metadata(empty, base_table=base_table, split_names=names, spec=spec)


def _filtered_rows(table: Table, spec: PermutationSpec | FoldsSpec, *, asset: str) -> int:
    """Rows ``spec``'s filter selects; a SpecError when none."""
    n = _count_filtered(table, spec.filter, asset=asset)
    if n == 0:
        raise SpecError(
            f"asset '{asset}': filter {spec.filter!r} selects no rows of table '{table.name}' "
            f"(version {table.version}); loosen the filter"
        )
    return n


def _check_k(table: Table, k: int, n: int, *, asset: str) -> None:
    if k > n:
        raise SpecError(
            f"asset '{asset}', table '{table.name}': k={k} folds need at least {k} rows; the "
            f"filter selects {n}"
        )


def _kfold_sizes(n: int, k: int) -> np.ndarray:
    """`KFold`'s fold sizes: ``n // k``, one more for the first ``n % k`` folds."""
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    return sizes


def _streamed(
    table: Table,
    spec: PermutationSpec | FoldsSpec,
    names: list[str],
    rows: np.ndarray,
    n: int,
    stream: Callable[[], Iterator[pa.RecordBatch]],
    *,
    kind: str | None = None,
) -> PermutationData:
    """The permutation (or, with ``kind``, folds) table streamed by ``stream`` in read order:
    ``rows`` per split of the ``n`` filtered rows of ``table`` at its checked-out version."""
    data = _schema_only(base_version=table.version, base_table=table.name, names=names, spec=spec)
    return PermutationData(
        data=data if kind is None else _of_kind(data, kind),
        base_table=table.name,
        base_version=table.version,
        split_names=tuple(names),
        split_rows=tuple(int(r) for r in rows),
        spec=spec,
        filtered_rows=n,
        stream=stream,
        algorithm=ALGORITHM,
    )


def _streamed_folds(
    table: Table,
    spec: FoldsSpec,
    rows: np.ndarray,
    n: int,
    validation: Callable[[], Iterator[pa.RecordBatch]],
    train: Callable[[], Iterator[pa.RecordBatch]],
    small: dict[str, int],
) -> FoldsData:
    """Folds of ``rows`` per fold: the folds table streamed by ``validation``, and the training
    table by ``train`` (the folds rotated: 1..k-1 then 0..k-2, see `perm_assets.folds`)."""
    k = len(rows)
    starts = np.r_[0, np.cumsum(rows)]
    ranges = tuple((int(starts[i + 1] - rows[0]), int(n - rows[i])) for i in range(k))
    train_table = _schema_only(
        base_version=table.version, base_table=table.name, names=[TRAIN_SPLIT], spec=spec
    )
    return FoldsData(
        validation=_streamed(table, spec, spec.split_names(), rows, n, validation, kind=FOLDS_KIND),
        train=_of_kind(train_table, TRAIN_KIND),
        train_ranges=ranges,
        small_classes=small,
        train_stream=train,
        train_total=int(2 * n - rows[0] - rows[-1]),
    )


def build_permutation(
    table: Table, spec: PermutationSpec, *, asset: str, spill: Spill, settings: LocalSettings
) -> PermutationData:
    """The permutation of ``spec`` over ``table`` (at its checked-out version), streamed from
    ``spill``: valid while ``spill`` is open. Seeds must be resolved."""
    _refuse(spec, asset=asset)
    n = _filtered_rows(table, spec, asset=asset)
    _check_key_columns(table, spec, expected=n, asset=asset)
    job = _split_job(table, spec, n, settings, asset=asset)
    names = spec.split_names()
    if job.assigner is None and (job.split_seed is None or job.label is None):
        # Sizes follow from n alone: refuse an empty split before scanning anything.
        _check_sizes(names, job.sizes(np.array([n]))[0], asset=asset)
    result = _run(table, job, spill, settings, n=n, asset=asset)
    _check_sizes(names, result.split_rows, asset=asset)
    _check_coverage(spec, kept=int(result.split_rows.sum()), expected=n, asset=asset)

    def stream() -> Iterator[pa.RecordBatch]:
        for split in range(len(names)):
            yield from result.batches(split)

    return _streamed(table, spec, names, result.split_rows, n, stream)


# ---------------------------------------------------------------------------------- folds
def build_folds(
    table: Table, spec: FoldsSpec, *, asset: str, spill: Spill, settings: LocalSettings
) -> FoldsData:
    """k-fold or stratified k-fold folds of ``table``, both tables streamed from ``spill``
    (see `perm_assets.folds` for their shape)."""
    _refuse(spec, asset=asset)
    folds = spec.folds
    assert isinstance(folds, KFold | StratifiedKFold | GroupKFold)
    k = folds.k
    n = _filtered_rows(table, spec, asset=asset)
    _check_k(table, k, n, asset=asset)
    job = _folds_job(table, spec, n, asset=asset)
    result = _run(table, job, spill, settings, n=n, asset=asset)
    small: dict[str, int] = {}
    if isinstance(folds, StratifiedKFold):
        small = _small_classes(result.classes, folds, table, asset=asset)
    rows = result.split_rows
    _check_folds(spec.split_names(), rows, n, k, asset=asset)

    def validation() -> Iterator[pa.RecordBatch]:
        for fold in range(k):
            yield from result.batches(fold)

    def train() -> Iterator[pa.RecordBatch]:
        # The folds table rotated: folds 1..k-1 then 0..k-2 (see perm_assets.folds._rotated).
        for fold in [*range(1, k), *range(0, k - 1)]:
            for batch in result.batches(fold):
                yield batch.set_column(1, "split_id", pa.array(np.zeros(batch.num_rows, np.uint64)))

    return _streamed_folds(table, spec, rows, n, validation, train, small)


def _folds_job(table: Table, spec: FoldsSpec, n: int, *, asset: str) -> _Job:
    """How ``spec``'s folds are assigned (the Ray engine builds from the same job)."""
    folds = spec.folds
    assert isinstance(folds, KFold | StratifiedKFold | GroupKFold)
    k = folds.k
    shuffle_seed = _shuffle_seed(spec.shuffle)
    seed = folds.seed if folds.seed is not None else 0
    where_ = {"asset": asset, "table": table.name}
    if isinstance(folds, GroupKFold):
        check_scalar_columns(table, [folds.group], role="group", asset=asset)
        shuffle = folds.shuffle

        def decide(sizes: np.ndarray, *pairs: object) -> np.ndarray:
            return assign.group_folds_of_sizes(sizes, k, seed, shuffle)

        assigner = _Group(folds.group, None, decide, k, **where_)
        job = _Job(spec.filter, None, k, _single(np.zeros(k)), None, shuffle_seed, assigner)
    elif isinstance(folds, StratifiedKFold) and not folds.shuffle:
        check_scalar_columns(table, [folds.label], role="stratify", asset=asset)
        assigner = _FoldsInOrder(folds.label, k, **where_)
        job = _Job(spec.filter, None, k, _single(np.zeros(k)), None, shuffle_seed, assigner)
    elif isinstance(folds, StratifiedKFold):
        check_scalar_columns(table, [folds.label], role="stratify", asset=asset)

        def stratified(counts: np.ndarray) -> np.ndarray:
            return assign.stratified_kfold_counts(counts, k, seed)

        job = _Job(spec.filter, folds.label, k, stratified, seed, shuffle_seed)
    else:
        sizes = _kfold_sizes(n, k)
        job = _Job(
            spec.filter, None, k, _single(sizes), seed if folds.shuffle else None, shuffle_seed
        )
    return job


def _small_classes(
    classes: _Classes, folds: StratifiedKFold, table: Table, *, asset: str
) -> dict[str, int]:
    """Classes with fewer rows than k; a SpecError for them with ``on_small_class="error"``."""
    k = folds.k
    small = classes.fewer_than(k)
    if small and folds.on_small_class == "error":
        raise SpecError(
            f"asset '{asset}', table '{table.name}': labels: {len(small)} class(es) have "
            f"fewer rows than k={k}, so some folds get none of them: {small}; use a smaller "
            "k or filter those classes out"
        )
    return small


def _check_folds(names: list[str], rows: np.ndarray, n: int, k: int, *, asset: str) -> None:
    empty = [name for name, r in zip(names, rows.tolist(), strict=True) if r == 0]
    if empty:
        raise SpecError(
            f"asset '{asset}': fold(s) {empty} would be empty ({n} rows for k={k}); "
            "use fewer folds or loosen the filter"
        )
