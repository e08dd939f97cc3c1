"""A pinned local column cache: a view's selected base columns, fetched once, gathered locally.

Random reads of a shuffled view from object storage cost one or more GET requests per batch of
scattered rows. A pinned version never changes, so its selected columns can be fetched once,
sequentially, into local memory-mappable files; every shuffled batch is then a gather from
page cache (or RAM) in the view's exact order.

An entry is keyed by (table location, pinned version, the version's commit time, the pin, the
columns): a table dropped and re-created with the same version numbers has another commit time,
so it never hits an old entry. Layout under ``cache_dir``::

    <key>/manifest.json   what the entry holds, file sizes and checksums (written last)
    <key>/slots.npy       int32/int64: position of each row address (fragment start + offset)
    <key>/starts.npy      int64: first slot of each fragment id (-1: none)
    <key>/extents.npy     int64: slots of each fragment id
    <key>/col_<i>.npy     one file per fixed-width column (numbers, booleans, vectors)
    <key>/other.arrow     Arrow IPC file with the other columns (strings, lists), if any
    <key>/verified.json   the boot and file stats whose checksums last matched (see _intact)
    <key>.lock            flock: one process fetches, the others wait and reuse

Publishing is atomic (``<key>.tmp-<pid>`` renamed to ``<key>``), so readers never see a torn
entry; one being evicted stays readable by processes that have it open (POSIX unlink). An
entry whose files are truncated or whose checksums differ is removed and fetched again: sizes
on every open, checksums on first use in a process unless a process on this node verified the
same unchanged files since boot (`verified.json`). The cache is bounded by ``max_bytes``: least
recently used entries (the manifest's mtime, touched on every open) go first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from lancedb.table import Table

from perm_assets.errors import LineageError
from perm_assets.identity import version_stamp
from perm_assets.node import boot_id

__all__ = ["CacheEntry", "ColumnCache", "cache_key"]

log = logging.getLogger(__name__)

FETCH_BATCH_ROWS = 1 << 20
"""Rows per sequential read batch while fetching (1M)."""
_OFFSET_BITS = 32
_ROWID = "_rowid"
_FORMAT = 1  # bump when the layout changes: old entries are then refetched, never misread
# Entries whose checksums this process verified (once per process: ~0.3 s per GB).
_VERIFIED: set[str] = set()
_VERIFIED_LOCK = threading.Lock()
_VERIFIED_FILE = "verified.json"
"""Per entry: the boot and the (size, mtime, inode) of each file whose checksums matched. A
process finding it unchanged skips the checksums: a write to a file changes its mtime, and a
reboot (after which a crash may have left damage on disk) changes the boot id."""
_VOUCHED_AGE_NS = 10 * 1_000_000_000


def _stats(stats: Mapping[str, os.stat_result]) -> dict[str, list[int]]:
    return {name: [st.st_size, st.st_mtime_ns, st.st_ino] for name, st in stats.items()}


def _vouch(folder: Path, names: list[str]) -> None:
    """Write ``folder``'s `_VERIFIED_FILE` for files whose checksums just matched. Their mtimes
    are first set 10 s into the past: any later write sets "now", which then differs, even
    within the clock's coarseness (a few ms) of the verification."""
    boot = boot_id()
    if not boot:
        return
    past = time.time_ns() - _VOUCHED_AGE_NS
    marker = folder / _VERIFIED_FILE
    staged = marker.with_name(f"{marker.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with contextlib.suppress(OSError):  # a read-only cache: every process verifies
        for name in names:
            os.utime(folder / name, ns=(past, past))
        stats = {name: (folder / name).stat() for name in names}
        staged.write_text(json.dumps({"boot": boot, "files": _stats(stats)}))
        os.replace(staged, marker)  # atomic: a reader sees a whole marker or none


def cache_key(table: Table, columns: Sequence[str], *, pin: str | None) -> dict[str, Any]:
    """What identifies an entry: location, version, its commit time, pin and columns."""
    return {
        "format": _FORMAT,
        "table": str(getattr(table, "uri", table.name)),  # LanceTable: its storage location
        "version": int(table.version),
        "stamp": version_stamp(table),
        "pin": pin,
        "columns": list(columns),
    }


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _checksum(path: Path) -> str:
    """A cheap whole-file checksum (sum and xor of its 8-byte words, memory speed): detects
    truncation, torn writes and any single-bit flip."""
    size = path.stat().st_size
    words = size // 8
    total = np.uint64(0)
    mixed = np.uint64(0)
    if words:
        data = np.memmap(path, dtype=np.uint64, mode="r", shape=(words,))
        with np.errstate(over="ignore"):
            total = np.add.reduce(data, dtype=np.uint64)
            mixed = np.bitwise_xor.reduce(data)
        del data
    tail = path.read_bytes()[words * 8 :] if size % 8 else b""
    return f"{size}:{int(total):016x}:{int(mixed):016x}:{tail.hex()}"


class CacheEntry:
    """One published entry, memory-mapped: `take` gathers rows by row id, in the given order."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(manifest["schema"])))
        self.rows = int(manifest["rows"])
        self._slots = np.load(folder / "slots.npy", mmap_mode="r")
        self._starts = np.load(folder / "starts.npy")
        self._extents = np.load(folder / "extents.npy")
        self._fixed: dict[str, np.ndarray] = {
            name: np.load(folder / file, mmap_mode="r") for name, file in manifest["fixed"].items()
        }
        self._other: pa.Table | None = None
        if manifest["other"]:
            source = pa.memory_map(str(folder / "other.arrow"))
            self._other = pa.ipc.open_file(source).read_all().combine_chunks()

    def positions(self, row_ids: np.ndarray) -> np.ndarray:
        """Row of each row id in the entry; LineageError when one is not cached."""
        ids = np.asarray(row_ids, dtype=np.uint64)
        fragment = (ids >> np.uint64(_OFFSET_BITS)).astype(np.int64)
        offset = (ids & np.uint64((1 << _OFFSET_BITS) - 1)).astype(np.int64)
        top = self._starts.size - 1
        known = fragment <= top
        clipped = np.where(known, fragment, 0)
        known &= (self._starts[clipped] >= 0) & (offset < self._extents[clipped])
        slot = np.where(known, self._starts[clipped] + offset, 0)
        found = np.where(known, self._slots[slot], -1)
        if found.size and int(found.min()) < 0:
            stray = ids[found < 0][:5].tolist()
            raise LineageError(
                f"cache entry {self.folder.name} of table '{self.manifest['key']['table']}' "
                f"version {self.manifest['key']['version']} has no row ids {stray}: the view's "
                "rows are not rows of its pinned base version"
            )
        return found.astype(np.intp, copy=False)

    def take(self, row_ids: np.ndarray, selection: Mapping[str, str]) -> pa.RecordBatch:
        """Rows ``row_ids`` in that order, columns ``selection`` (output name → column)."""
        at = self.positions(row_ids)
        arrays: list[pa.Array] = []
        fields: list[pa.Field] = []
        other = self._other.take(pa.array(at)) if self._other is not None else None
        for name, source in selection.items():
            if source == _ROWID:
                arrays.append(pa.array(np.asarray(row_ids, dtype=np.uint64)))
                fields.append(pa.field(name, pa.uint64()))
                continue
            field = self.schema.field(source)
            if source in self._fixed:
                arrays.append(_to_arrow(np.take(self._fixed[source], at, axis=0), field.type))
            else:
                assert other is not None
                arrays.append(other.column(source).combine_chunks())
            fields.append(field.with_name(name))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _fixed_width(kind: pa.DataType) -> bool:
    """Columns stored as one .npy array: numbers, booleans, fixed-size lists of numbers."""
    if pa.types.is_fixed_size_list(kind):
        return _fixed_width(kind.value_type) and not pa.types.is_boolean(kind.value_type)
    return (
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    ) and not pa.types.is_float16(kind)


def _to_numpy(values: pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_list(values.type):
        width = values.type.list_size
        flat = values.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(-1, width)
    return values.to_numpy(zero_copy_only=False)


def _to_arrow(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(kind):
        flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=kind.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
    return pa.array(values, type=kind)


@dataclass(frozen=True)
class _Plan:
    folder: Path
    lock: Path
    key: dict[str, Any]


class ColumnCache:
    """Entries under ``root``, at most ``max_bytes`` together (least recently used out).

    Thread- and process-safe: one process fetches an entry, the others wait on its lock and
    map the published files. ``open`` verifies an entry once per process.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"cache max_bytes={max_bytes}: give a positive size in bytes")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def open(
        self, table: Table, columns: Sequence[str], *, pin: str | None, what: str
    ) -> CacheEntry:
        """The entry of ``columns`` of ``table`` at its checked-out version, fetched first if
        needed (sequentially, once, whichever process gets there first)."""
        columns = list(dict.fromkeys(c for c in columns if c != _ROWID))
        missing = [c for c in columns if c not in table.schema.names]
        if missing:
            raise LineageError(
                f"{what}: cannot cache columns {missing} of table '{table.name}': it has "
                f"{', '.join(table.schema.names)}"
            )
        plan = self._plan(table, columns, pin=pin)
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self._published(plan)
        if entry is not None:
            return entry
        with _locked(plan.lock):
            entry = self._published(plan)  # another process published it while we waited
            if entry is not None:
                return entry
            self._fetch(table, columns, plan, what=what)
            entry = self._published(plan)
            assert entry is not None, f"entry {plan.folder} did not verify right after its fetch"
            return entry

    # ------------------------------------------------------------------------- internals
    def _plan(self, table: Table, columns: list[str], *, pin: str | None) -> _Plan:
        key = cache_key(table, columns, pin=pin)
        digest = _digest(key)
        return _Plan(self.root / digest, self.root / f"{digest}.lock", key)

    def _published(self, plan: _Plan) -> CacheEntry | None:
        """The verified entry, or None (absent; a damaged one is removed)."""
        manifest_path = plan.folder / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            manifest = None
        if manifest is None or manifest.get("key") != plan.key or not self._intact(plan, manifest):
            log.warning("column cache entry %s is damaged or stale: fetching it again", plan.folder)
            shutil.rmtree(plan.folder, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):
            # Least recently used goes first. An explicit nanosecond time: the kernel's own
            # "now" is coarse (a few ms), which let two uses in a row tie.
            now = time.time_ns()
            os.utime(manifest_path, ns=(now, now))
        return CacheEntry(plan.folder, manifest)

    def _intact(self, plan: _Plan, manifest: dict[str, Any]) -> bool:
        """Sizes always; checksums once per node and boot while the files stay unchanged
        (`_VERIFIED_FILE`), else once per process."""
        files: dict[str, str] = manifest.get("files", {})
        try:
            stats = {name: (plan.folder / name).stat() for name in files}
        except OSError:
            return False
        for name, checksum in files.items():
            if stats[name].st_size != int(checksum.split(":", 1)[0]):
                return False
        with _VERIFIED_LOCK:
            if str(plan.folder) in _VERIFIED:
                return True
        # Every DDP rank and DataLoader worker opens the entry: re-checksumming it in each
        # (~1.5 GB/s: 2-3 s per process for two columns of 100M rows) made a cached view's first
        # batch slower than an uncached one's.
        with contextlib.suppress(OSError, ValueError):
            marker = json.loads((plan.folder / _VERIFIED_FILE).read_text())
            if boot_id() and marker == {"boot": boot_id(), "files": _stats(stats)}:
                with _VERIFIED_LOCK:
                    _VERIFIED.add(str(plan.folder))
                return True
        if any(_checksum(plan.folder / name) != checksum for name, checksum in files.items()):
            return False
        with _VERIFIED_LOCK:
            _VERIFIED.add(str(plan.folder))
        _vouch(plan.folder, list(files))
        return True

    def _fetch(self, table: Table, columns: list[str], plan: _Plan, *, what: str) -> None:
        started = time.monotonic()
        schema = pa.schema([table.schema.field(c) for c in columns])
        fixed = [c for c in columns if _fixed_width(schema.field(c).type)]
        others = [c for c in columns if c not in fixed]
        rows = table.count_rows()
        estimate = (_row_bytes(schema) + (4 if rows < 1 << 31 else 8)) * rows  # + the slots
        if estimate > self.max_bytes:
            raise LineageError(
                f"{what}: caching {columns} of table '{table.name}' version {table.version} "
                f"needs about {estimate:,} bytes, above the cache's max_bytes={self.max_bytes:,}; "
                "raise cache_max_bytes or cache fewer columns"
            )
        self._evict(room_for=estimate, keep=plan.folder)
        staging = plan.folder.with_name(f"{plan.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            arrays = {
                c: np.lib.format.open_memmap(
                    staging / f"col_{i}.npy",
                    mode="w+",
                    dtype=_numpy_dtype(schema.field(c).type),
                    shape=(rows, *_inner_shape(schema.field(c).type)),
                )
                for i, c in enumerate(fixed)
            }
            row_ids = np.lib.format.open_memmap(
                staging / "rowids.npy", mode="w+", dtype=np.uint64, shape=(rows,)
            )
            writer = (
                pa.ipc.new_file(
                    str(staging / "other.arrow"), pa.schema([schema.field(c) for c in others])
                )
                if others
                else None
            )
            done = 0
            query = table.search().select(columns).with_row_id(True)
            for batch in query.to_batches(FETCH_BATCH_ROWS):
                n = batch.num_rows
                if done + n > rows:
                    raise LineageError(f"{what}: table '{table.name}' changed while cached")
                row_ids[done : done + n] = batch.column(_ROWID).to_numpy()
                for c, target in arrays.items():
                    target[done : done + n] = _to_numpy(batch.column(c))
                if writer is not None:
                    writer.write_batch(
                        pa.RecordBatch.from_arrays([batch.column(c) for c in others], names=others)
                    )
                done += n
            if writer is not None:
                writer.close()
            if done != rows:
                raise LineageError(
                    f"{what}: table '{table.name}' version {table.version} returned {done:,} "
                    f"rows, {rows:,} counted"
                )
            for target in arrays.values():
                target.flush()
            _write_slots(np.asarray(row_ids), staging)
            row_ids.flush()
            del row_ids, arrays
            (staging / "rowids.npy").unlink()  # the slots hold what the gathers need
            names = {c: f"col_{i}.npy" for i, c in enumerate(fixed)}
            files = ["slots.npy", "starts.npy", "extents.npy", *names.values()]
            files += ["other.arrow"] if others else []
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, schema):
                pass
            manifest = {
                "key": plan.key,
                "rows": rows,
                "schema": sink.getvalue().to_pybytes().hex(),
                "fixed": names,
                "other": bool(others),
                "files": {f: _checksum(staging / f) for f in files},
                "fetched_seconds": round(time.monotonic() - started, 3),
                "fetched_by_pid": os.getpid(),
            }
            (staging / "manifest.json").write_text(json.dumps(manifest))
            # What is left of a damaged or half-evicted entry (a marker written while it was
            # removed) would make the rename fail on every open: nothing there verified.
            shutil.rmtree(plan.folder, ignore_errors=True)
            os.replace(staging, plan.folder)  # atomic: readers see all of it or nothing
            # The checksums above read back the files just written: this process and the
            # node's others need not read them again.
            _vouch(plan.folder, files)
            with _VERIFIED_LOCK:
                _VERIFIED.add(str(plan.folder))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info(
            "column cache: fetched %s of '%s' v%s (%s rows) in %.1f s",
            columns,
            table.name,
            table.version,
            f"{rows:,}",
            time.monotonic() - started,
        )

    def entries(self) -> Iterator[tuple[Path, int, float]]:
        """(folder, bytes, last use) of every published entry."""
        if not self.root.exists():
            return
        for folder in self.root.iterdir():
            manifest = folder / "manifest.json"
            if not folder.is_dir() or ".tmp-" in folder.name or not manifest.exists():
                continue
            with contextlib.suppress(OSError):
                size = sum(p.stat().st_size for p in folder.iterdir())
                yield folder, size, manifest.stat().st_mtime

    def _evict(self, *, room_for: int, keep: Path) -> None:
        """Remove least recently used entries until ``room_for`` more bytes fit."""
        with _locked(self.root / ".evict.lock"):
            entries = sorted(self.entries(), key=lambda e: e[2])
            used = sum(size for _, size, _ in entries)
            for folder, size, _ in entries:
                if used + room_for <= self.max_bytes:
                    break
                if folder == keep:
                    continue
                log.info("column cache: evicting %s (%s bytes, least recently used)", folder, size)
                shutil.rmtree(folder, ignore_errors=True)
                used -= size


def _row_bytes(schema: pa.Schema) -> int:
    total = 0
    for field in schema:
        kind = field.type
        if pa.types.is_fixed_size_list(kind):
            total += kind.list_size * max(kind.value_type.bit_width // 8, 1)
        elif _fixed_width(kind):
            total += max(kind.bit_width // 8, 1)
        else:
            total += 32  # a guess for strings and lists; the bound is checked again on disk
    return total


def _numpy_dtype(kind: pa.DataType) -> np.dtype[Any]:
    inner = kind.value_type if pa.types.is_fixed_size_list(kind) else kind
    return np.dtype(inner.to_pandas_dtype())


def _inner_shape(kind: pa.DataType) -> tuple[int, ...]:
    return (kind.list_size,) if pa.types.is_fixed_size_list(kind) else ()


def _write_slots(row_ids: np.ndarray, folder: Path) -> None:
    """The row address → position table: fragment starts and extents, and one slot per
    address up to each fragment's highest offset (deleted rows leave -1)."""
    n = row_ids.size
    if n == 0:
        raise LineageError("the table has no rows to cache")
    if not bool(np.all(row_ids[1:] > row_ids[:-1])):
        raise LineageError("the table scan returned row ids out of order; cannot cache it")
    fragment = (row_ids >> np.uint64(_OFFSET_BITS)).astype(np.int64)
    offset = (row_ids & np.uint64((1 << _OFFSET_BITS) - 1)).astype(np.int64)
    last = (
        np.append(np.flatnonzero(fragment[1:] != fragment[:-1]), n - 1)
        if n
        else np.empty(0, np.int64)
    )
    fragments = fragment[last]
    extents_of = offset[last] + 1
    top = int(fragments[-1])
    starts = np.full(top + 1, -1, dtype=np.int64)
    starts[fragments] = np.cumsum(extents_of) - extents_of
    extents = np.zeros(top + 1, dtype=np.int64)
    extents[fragments] = extents_of
    span = int(extents_of.sum())
    kind = np.int32 if n < 1 << 31 else np.int64
    slots = np.lib.format.open_memmap(folder / "slots.npy", mode="w+", dtype=kind, shape=(span,))
    slots[:] = -1
    slots[starts[fragment] + offset] = np.arange(n, dtype=kind)
    slots.flush()
    del slots
    np.save(folder / "starts.npy", starts)
    np.save(folder / "extents.npy", extents)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if needed), released when the block ends or
    the process dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
