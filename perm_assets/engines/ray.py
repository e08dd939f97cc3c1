"""The distributed "ray" engine: the local engine's permutation, computed on a Ray cluster.

Same rows as `perm_assets.engines.local`, row for row, for one base table version, spec and
seed, whatever the number of Ray workers: it builds from that engine's own plan (the
`local._Job` of `local._split_job` / `local._folds_job`: sizes per class, seeds, the kind's
assigner) and reuses the pure functions both engines share (`perm_assets.engines.keys`:
`order_key`, `split_of_rank`'s rank intervals, `hash_splits`, `time_key`, ...; and
`local._Group.split_of_code`); only the way the work is distributed differs, which a total
order on unique keys makes irrelevant. So it builds exactly the kinds the local engine
builds, and the data version's algorithm identity is the local engine's (`ALGORITHM`). What
the workers run is in `perm_assets.engines.ray_tasks`, which imports neither dagster nor
lancedb.

1. **Read**: Ray Data reads the filtered base table at the pinned version through lance-ray's
   ``read_lance(with_metadata=True)``: each task reads the row addresses (``_rowaddr``,
   ``fragment id << 32 | offset``) of its fragments and only the columns the kind needs. These
   are exactly the ``row_id`` values lancedb's ``Permutation`` expects of a table without
   stable row ids (what ``with_row_id(True)`` returns and the local engine stores; a view over
   a Ray-built table reads the expected base rows: tests/test_ray_engine.py).
2. **Assign**, by kind:

   - *One class, by rank* (random split, sequential split, k-fold): each row gets an
     assignment key, ``order_key(row_id, split seed)``, or the row id itself for sequential
     splits and ``KFold(shuffle=False)`` (the local engine ranks those rows by scan position,
     which is row-id order: Lance lists fragments in id order, also after a compaction). A
     split boundary is the key at rank ``ends[s]``, and every task places its rows by
     comparing their keys with those few keys. Seeded keys are uniform over 64 bits, so the
     boundary keys come without a sort (`_Build.bounds`): tasks count rows per cell (top bits
     of the key), which names the cell holding each boundary rank, and a second pass sends
     the driver only those cells' keys. Row-id keys are sorted by Ray Data (a distributed,
     range-partitioned sort) and the driver reads the keys at those ranks from the sorted
     blocks. With one split keeping every row, nothing is ranked.
   - *Per class, by rank* (`StratifiedSplit`, `StratifiedKFold`): a census (tasks count each
     label's rows and first row id; the driver merges the counts) gives the classes and, by
     the local engine's size functions, each class's cumulative sizes per split. Seeded: each
     class's boundary keys as above, with cells per (class, top bits of the key). By row id
     (``StratifiedKFold(shuffle=False)``): rows are sorted by ``(class code, row id)``; one
     Ray task per sorted block knows the block's global position, so a row's rank in its
     class is its global rank less its class's first, and its split follows from
     `split_of_rank`. Codes follow ascending label order, or for
     ``StratifiedKFold(shuffle=False)`` first appearance.
   - *Per row* (`HashSplit`, `CalculatedSplit`): each task computes its rows' splits with the
     local engine's per-batch functions (lancedb's hash split on an in-memory table; the
     calculated expression evaluated by the scan, range-checked).
   - *Per group* (`GroupSplit`, `GroupKFold`): a census of the groups (and, stratified, of
     the (group, label) pairs); the driver decides each group's split from the counts with
     `local._Group.split_of_code`, and each task maps its rows' groups to their splits.
   - *By time* (`TimeSplit`): rows sorted by `time_key`; the first time of each split
     follows from the key at each target rank and the count of rows below it
     (`_Build.time_bounds`: the local engine's "a run of equal times goes to the split of
     its middle row"), then each row's split from its time.
3. **Order**: rows are sorted by ``(split_id, order_key(row_id, shuffle seed))`` (or by row id
   without a shuffle, as the local engine stores an unshuffled split).
4. **Write**: one Ray task per block of the sorted dataset writes its rows, from the object
   store, as Lance fragments of the permutation table (lance-ray's fragment writer,
   `_write_piece`); the driver collects the fragments' metadata, in order, and the IO manager
   commits them as one new version (`perm_assets.tables.commit_fragments`).

Folds are a split with ``k`` folds; their training table is the sorted dataset's folds
rotated (folds 1..k-1, then 0..k-2; see `perm_assets.folds`), written from the same
materialized blocks, addressed by position so each task gets only its block of a range.

Bad input fails with the local engine's error before anything is written: nulls in a label,
group or time column and a time column without an order are counted on the driver before Ray
is touched (`_prechecked`); a value only a task meets (a calculated split out of range, a NaN
time) fails that task with the local engine's SpecError, which reaches the caller as such.

A worker node that dies mid-build loses its running tasks and the blocks in its object store;
Ray Data retries the tasks and Ray rebuilds lost blocks from their lineage on the surviving
nodes, so the build usually finishes with the same rows; when it fails instead, nothing is
committed (tests/test_ray_engine_s3.py kills a node with SIGKILL and accepts either outcome,
each checked strictly). With no CPU left in the whole cluster Ray would wait forever, so the build
fails after `NO_CPU_SECONDS`. Whatever fails, nothing is committed before every fragment has
been written, so the previous version stays the latest.

Driver memory does not grow with the row count: it holds the row count, the split sizes, one
key per boundary, the census (one entry per class, group or (group, label) pair, merged one
block's counts at a time) and one fragment's metadata per block. The row ids never pass
through the driver to be written; they do only for a split report with a label
(`PermutationData.stream`, read batch by batch before the write).

Credentials: workers read the base table and write the fragments with credentials from their
own environment (``AWS_*`` variables, instance roles); the driver commits with the resource's.
Storage options whose name suggests a secret are left out of what Ray ships to tasks (lance-ray
puts the storage options in every read task's arguments, visible in Ray's dashboard and logs).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

import numpy as np
import pyarrow as pa
from lancedb.table import Table

from perm_assets.build import PermutationData, _check_coverage, _check_key_columns
from perm_assets.engines import local
from perm_assets.engines.ray_tasks import (
    _arrow,
    _assignment_keys,
    _calculated,
    _cell_counts,
    _census_counts,
    _class_keys,
    _codes,
    _grouped,
    _hashed,
    _key_counts,
    _keys_in,
    _place,
    _place_keyed,
    _place_ranked,
    _row_ids,
    _split_counts,
    _time_keys,
    _timed,
    _write_piece,
)
from perm_assets.errors import SpecError
from perm_assets.folds import FoldsData
from perm_assets.specs import (
    FoldsSpec,
    GroupKFold,
    KFold,
    PermutationSpec,
    StratifiedKFold,
)
from perm_assets.tables import FragmentWrite, where

if TYPE_CHECKING:
    from lance.fragment import FragmentMetadata

ALGORITHM = local.ALGORITHM
"""The local engine's: the same rows for the same (base version, spec, seed)."""

SUPPORTED = local.SUPPORTED
INSTALL = "pip install 'perm-assets[ray]'"

log = logging.getLogger(__name__)

# Storage options that must not travel in Ray task arguments: workers take credentials from
# their own environment instead.
_SECRET = re.compile(r"secret|key|token|password|credential|session", re.IGNORECASE)
_CONNECT_SECONDS = 5.0
_STREAM_BATCH_ROWS = 1 << 20
# Ray Data retries a dead node's tasks without limit (max_retries=-1) and Ray waits for CPUs
# without limit (an autoscaler may add nodes); Ray Data's own no-progress guard
# (DataContext.execution_no_progress_timeout_s) is off for datasets with a sort. So with every
# worker node dead a build would wait forever: it fails instead once the cluster has had no
# CPU for this long (long enough for an autoscaler to start a node).
NO_CPU_SECONDS = 600.0
_POLL_SECONDS = 1.0
# Seeded ranks come from a histogram of the keys' top bits instead of a distributed sort
# (`_Build.bounds`): cells of about `_CELL_ROWS` rows, at most `_HISTOGRAM_CELLS` of them
# (classes x 2**bits) per task result and on the driver, and at most `_FETCH_KEYS` keys
# fetched to the driver from the cells holding a split end; past that (very many classes),
# the sort.
_CELL_ROWS = 1 << 12
_HISTOGRAM_CELLS = 1 << 18
_FETCH_KEYS = 1 << 23


def unsupported(spec: PermutationSpec | FoldsSpec) -> str | None:
    """What of ``spec`` this engine cannot build yet (None: all of it): what the local engine
    cannot, as it builds from the local engine's plan (`local._Job`)."""
    return local.unsupported(spec)


def _refuse(what: str, *, asset: str) -> None:
    raise SpecError(
        f"asset '{asset}': engine 'ray' does not build {what} yet (it builds: {SUPPORTED}); "
        "use LanceDBResource(engine='lancedb') for it"
    )


def _import_ray() -> Any:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("lance_ray") is None:
        raise SpecError(
            "LanceDBResource(engine='ray') needs Ray and lance-ray, which are not installed: "
            f"{INSTALL}"
        )
    import ray

    return ray


def _probe(address: str) -> None:
    """A SpecError naming ``address`` when nothing answers there: Ray's own connect retries
    for about a minute and then fails with a message that does not say what to fix."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or another form Ray resolves itself
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_SECONDS):
            pass
    except OSError as exc:
        raise SpecError(
            f"engine 'ray': no Ray cluster answers at ray_address {address!r} ({exc}); start "
            "one there (ray start --head) or set LanceDBResource(ray_address=...) to the "
            "cluster's head (host:port, or ray://host:10001 for Ray client); nothing was written"
        ) from exc


def connect(address: str | None) -> Any:
    """The ``ray`` module, connected to ``address`` (None: ``$RAY_ADDRESS`` or a local Ray);
    an already connected driver is reused."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _probe(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise SpecError(
            f"engine 'ray': cannot connect to the Ray cluster at ray_address {address!r}: {exc}"
        ) from exc
    return ray


def _public_options(options: dict[str, str]) -> dict[str, str] | None:
    kept = {k: v for k, v in options.items() if not _SECRET.search(k)}
    return kept or None


def _histogram_bits(counts: np.ndarray, ends: np.ndarray) -> int | None:
    """Key bits per class for `_Build.bounds`' cells: enough that a cell holds about
    `_CELL_ROWS` rows of the largest class, at most `_HISTOGRAM_CELLS` cells in all. None
    when no histogram fits: fewer than 2 cells per class, or an expected fetch (the rows of
    one cell per split end) above half of `_FETCH_KEYS` (decided before any pass)."""
    classes = counts.size
    per_class = _HISTOGRAM_CELLS // max(1, classes)
    if per_class < 2:
        return None
    largest = int(counts.max()) if classes else 0
    wanted = math.ceil(math.log2(max(1.0, largest / _CELL_ROWS)))
    bits = max(1, min(per_class.bit_length() - 1, wanted))
    valid = ends < counts[:, None]
    expected = np.ceil(np.broadcast_to(counts[:, None], ends.shape)[valid] / (1 << bits)).sum()
    return None if expected > _FETCH_KEYS // 2 else bits


def _end_cells(
    rows: np.ndarray, counts: np.ndarray, ends: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(class, split, cell, within)`` of each valid split end: the cell holding the row at
    rank ``ends[class, split]`` of its class, and that row's rank within the cell, from
    ``rows`` per cell (`_cells` order: by class, then key bits)."""
    cls, split = np.nonzero(valid)
    # An end's rank among all the cells' rows: its class's first row plus the end.
    target = (np.cumsum(counts) - counts)[cls] + ends[cls, split]
    upto = np.cumsum(rows)
    cell = np.searchsorted(upto, target, side="right")
    return cls, split, cell, target - (upto[cell] - rows[cell])


def _end_keys(
    parts: list[pa.Table],
    rows: np.ndarray,
    ranks: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    shape: tuple[int, ...],
) -> np.ndarray | None:
    """``bounds[class, split]``: the key of each `_end_cells` end, from the fetched
    ``(cell, akey)`` rows of the wanted cells (`_keys_in`); None when a cell's fetched keys
    are not the rows counted for it (the table changed between the passes)."""
    cls, split, cell, within = ranks
    wanted = np.unique(cell)
    fetched = pa.concat_tables(parts) if parts else None
    if fetched is None:
        return None
    cells = fetched.column("cell").to_numpy().astype(np.int64)
    keys = fetched.column("akey").to_numpy().astype(np.uint64)
    order = np.lexsort((keys, cells))
    cells, keys = cells[order], keys[order]
    first = np.searchsorted(cells, wanted, side="left")
    if not np.array_equal(np.searchsorted(cells, wanted, side="right") - first, rows[wanted]):
        return None
    bounds = np.zeros(shape, dtype=np.uint64)
    bounds[cls, split] = keys[first[np.searchsorted(wanted, cell)] + within]
    return bounds


# ----------------------------------------------------------------------------- the build
_SCHEMA = local._SCHEMA


Phase = Literal["build", "checks"]
_KEPT: dict[str, str] = {
    "build": "no new permutation version was committed, the previous one stays the latest",
    "checks": "the new permutation version is committed but its blocking checks did not "
    "finish, so nothing downstream runs on it",
}


@contextmanager
def _on_cluster(ray: Any, *, asset: str, during: Phase = "build") -> Iterator[None]:
    """Ray's errors (a lost object whose lineage cannot be rebuilt, a task out of retries, a
    lost connection) as one that names the asset, the engine and the phase and says what was
    kept: Ray's own message names internal operators and object ids, not what to do."""
    try:
        yield
    except ray.exceptions.RayError as exc:
        # A task's own exception is its cause: a RayTaskError's first line names the task.
        cause = getattr(exc, "cause", None) or exc
        if isinstance(exc, SpecError):
            # A task's own SpecError (bad input met in a block: a calculated split's value, a
            # NaN time), kept as such by `raise_original_map_exception`; Ray Data appends its
            # retry advice after the first line.
            raise SpecError(str(cause).splitlines()[0]) from exc
        first = (str(cause).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"asset '{asset}': engine 'ray': the {during} failed on the Ray cluster "
            f"({type(cause).__name__}: {first}); {_KEPT[during]}; re-run when the cluster is "
            "healthy"
        ) from exc


class _Watch:
    """Fails a wait on the cluster once it has had no CPU for `NO_CPU_SECONDS` (see there)."""

    def __init__(self, ray: Any, *, asset: str, during: Phase = "build") -> None:
        self.ray, self.asset, self.during = ray, asset, during
        self.since: float | None = None

    def check(self) -> None:
        if float(self.ray.cluster_resources().get("CPU", 0)) > 0:
            self.since = None
            return
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since >= NO_CPU_SECONDS:
            raise RuntimeError(
                f"asset '{self.asset}': engine 'ray': the Ray cluster has had no CPU for "
                f"{now - self.since:.0f} s (its worker nodes died or were removed), so the "
                f"{self.during} cannot go on; {_KEPT[self.during]}; re-run when the cluster "
                "has workers (the abandoned Ray work waits in a background thread until this "
                "process exits)"
            )

    def run(self, call: Callable[[], Any]) -> Any:
        """``call()`` (a blocking Ray Data execution), checked every `_POLL_SECONDS`; given
        up on, it is left waiting in a daemon thread."""
        done: dict[str, Any] = {}

        def target() -> None:
            try:
                done["value"] = call()
            except BaseException as exc:  # handed to the caller's thread
                done["error"] = exc

        thread = threading.Thread(target=target, name="perm_assets-ray-build", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_POLL_SECONDS)
            if thread.is_alive():
                self.check()
        if "error" in done:
            raise done["error"]
        return done["value"]

    def get(self, ref: Any) -> Any:
        """``ray.get(ref)``, checked every `_POLL_SECONDS` (a lost block is rebuilt from its
        lineage, which needs a CPU)."""
        while True:
            try:
                return self.ray.get(ref, timeout=_POLL_SECONDS)
            except self.ray.exceptions.GetTimeoutError:
                self.check()


def _pieces(ds: Any) -> Iterator[tuple[Any, int, int]]:
    """``(block ref, first row, rows)`` of each block piece of the materialized ``ds``, in
    order. Sizes come from the bundles' metadata (Ray Data internals: ``RefBundle.blocks`` /
    ``slices``; Ray Data has no public "rows at positions" nor a map that knows a block's
    position), so blocks are fetched only where needed."""
    for bundle in ds.iter_internal_ref_bundles():
        slices = bundle.slices or (None,) * len(bundle.blocks)
        for entry, part in zip(bundle.blocks, slices, strict=True):
            first = 0 if part is None else part.start_offset
            rows = int(entry.metadata.num_rows or 0) if part is None else part.num_rows
            yield entry.ref, first, rows


def _blocks(watch: _Watch, ds: Any, start: int, stop: int) -> Iterator[tuple[int, pa.Table]]:
    """``(global row of its first row, rows)`` of each block piece of the materialized ``ds``
    overlapping rows ``[start, stop)``, in order, trimmed to that range; only the blocks in
    range are fetched, one at a time."""
    at = 0
    for ref, first, rows in _pieces(ds):
        lo, hi = max(start, at), min(stop, at + rows)
        if lo < hi:
            block = watch.get(ref)
            yield lo, block.slice(first + lo - at, hi - lo)
        at += rows
        if at >= stop:
            return


def _by_position(ray: Any, ds: Any, fn: Callable[..., Any], **kwargs: Any) -> list[Any]:
    """One Ray task ``fn(block, first, rows, start, **kwargs)`` per block piece of the
    materialized ``ds`` (``start``: the global row of its first row), their result refs in
    order. Arrays are put in the object store once, not shipped with every task."""
    kwargs = {
        k: ray.put(v) if isinstance(v, np.ndarray | pa.Array) else v for k, v in kwargs.items()
    }
    remote = ray.remote(fn)
    refs, at = [], 0
    for ref, first, rows in _pieces(ds):
        refs.append(remote.remote(ref, first, rows, at, **kwargs))
        at += rows
    return refs


def _column_at_ranks(watch: _Watch, ds: Any, ranks: list[int], column: str) -> list[int]:
    """``column`` at each global rank of a materialized dataset sorted by it."""
    found = []
    for rank in ranks:  # a loop over split boundaries, not rows
        for _, rows in _blocks(watch, ds, rank, rank + 1):
            found.append(int(rows.column(column)[0].as_py()))
    if len(found) != len(ranks):
        raise RuntimeError(f"engine 'ray': ranks {ranks} past the sorted rows")
    return found


def _configure(ray: Any) -> None:
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # blocks of a sort, in key order
    context.enable_progress_bars = False
    # A task's SpecError reaches the driver as one (Ray Data wraps it in a UserCodeException
    # that keeps only its text otherwise).
    context.raise_original_map_exception = True


class _Held:
    """A build's materialized rows in read order, until `release`.

    Their blocks stay in the cluster's object stores (spilled: about 16 bytes a row) for as
    long as the driver references them, and Ray rebuilds a referenced block lost with its node
    by re-running its lineage, the build's sort included. Held past the asset's block (Dagster
    keeps a run's outputs, and with them the data's streams), a finished build's blocks leaked
    store space and, after a node died, their rebuild took the CPUs a later build waited for:
    the two-worker S3 test hung that way (a resubmitted shuffle reduce task held the surviving
    node's only CPU, waiting for map tasks that needed it)."""

    def __init__(self, ds: Any) -> None:
        self._ds: Any | None = ds

    @property
    def ds(self) -> Any:
        if self._ds is None:
            raise RuntimeError(
                "engine 'ray': the build's rows were released when its block ended; read or "
                "write them inside `engines.build_permutation` / `build_folds`"
            )
        return self._ds

    def release(self) -> None:
        self._ds = None


def _release(held: _Held) -> None:
    """Drop the build's rows, then collect garbage: Ray Data's datasets sit in reference
    cycles, and the build's intermediate datasets (and their blocks) would otherwise stay
    referenced until Python's next collection, at an unknown time (measured: 10 object refs
    of a small build held after its block ended, none after `gc.collect`)."""
    held.release()
    gc.collect()


def _batches(
    ray: Any, held: _Held, start: int, stop: int, *, asset: str, split_id: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Rows ``[start, stop)`` of the build's ``held`` rows as permutation batches of at most
    ``_STREAM_BATCH_ROWS``; ``split_id`` set: every row gets that split."""
    with _on_cluster(ray, asset=asset):
        for _, rows in _blocks(_Watch(ray, asset=asset), held.ds, start, stop):
            for batch in rows.cast(_SCHEMA).to_batches(max_chunksize=_STREAM_BATCH_ROWS):
                if split_id is not None:
                    ids = pa.array(np.full(batch.num_rows, split_id, dtype=np.uint64))
                    batch = batch.set_column(1, _SCHEMA.field("split_id"), ids)
                yield batch


def _pieces_in(ds: Any, start: int, stop: int) -> Iterator[tuple[Any, int, int]]:
    """``(block ref, first row in the block, rows)`` of each block piece of the materialized
    ``ds`` overlapping rows ``[start, stop)``, in order, trimmed to that range: `_blocks`
    without fetching any block (the ref goes to a task instead)."""
    at = 0
    for ref, first, rows in _pieces(ds):
        lo, hi = max(start, at), min(stop, at + rows)
        if lo < hi:
            yield ref, first + lo - at, hi - lo
        at += rows
        if at >= stop:
            return


def _fragments(
    ray: Any,
    held: _Held,
    ranges: list[tuple[int, int, int | None]],
    *,
    storage_options: dict[str, str],
    asset: str,
) -> FragmentWrite:
    """Rows ``[start, stop)`` of the build's ``held`` rows for each ``(start, stop,
    split_id)`` of ``ranges``, one after another (``split_id`` set: every row of that range gets
    it), written by the cluster's workers for the IO manager's one commit: a Ray task per block
    piece writes it as Lance fragments (`_write_piece`), and the driver only collects the
    fragments' metadata, in table order. Workers take credentials from their own environment,
    as for the read (`_public_options`).

    Not lance-ray's ``LanceDatasink`` / ``Dataset.write_datasink``: it commits by itself
    (``on_write_complete``), and the permutation's commit is the IO manager's, after the pins
    and with the schema metadata it adds. Not ``map_batches(LanceFragmentWriter(...))`` either:
    Ray Data has no "rows at positions", and the training table is two ranges of the folds."""
    options = _public_options(storage_options)

    def write(uri: str) -> list[FragmentMetadata]:
        # As Ray Data retries its own tasks: a task lost with its node runs again elsewhere
        # (its lost input block is rebuilt from lineage); `_Watch` bounds the wait for a CPU.
        task = ray.remote(_write_piece).options(num_cpus=1, max_retries=-1)
        with _on_cluster(ray, asset=asset):
            refs = [
                task.remote(block, first, rows, uri=uri, split_id=split, storage_options=options)
                for start, stop, split in ranges
                for block, first, rows in _pieces_in(held.ds, start, stop)
            ]
            try:
                written = _Watch(ray, asset=asset).get(refs)
            except BaseException:
                # Nothing is committed: the others' files would be left unreferenced anyway
                # (see tables.commit_fragments), so stop them writing more.
                for ref in refs:
                    ray.cancel(ref)
                raise
        fragments = [fragment for part in written for fragment in part]
        # Checked before the commit: rows lost or doubled between the sort and the files
        # (block metadata that does not match the blocks) must never become a version.
        wrote = sum(int(fragment.physical_rows) for fragment in fragments)
        planned = sum(stop - start for start, stop, _ in ranges)
        if wrote != planned:
            raise RuntimeError(
                f"asset '{asset}': engine 'ray': the workers wrote {wrote} rows, {planned} "
                "planned; no new permutation version was committed, the previous one stays "
                "the latest; re-run"
            )
        return fragments

    return FragmentWrite(write)


class _Build:
    """One Ray build of a local engine `local._Job`: the same rows as `local._run` gives it.

    `ordered` returns the materialized dataset of ``(row_id, split_id)`` in read order and
    the rows per split; `classes` is the census of the label (stratified kinds), for the
    small-class check."""

    def __init__(
        self,
        ray: Any,
        table: Table,
        job: local._Job,
        *,
        n: int,
        asset: str,
        storage_options: dict[str, str],
    ) -> None:
        self.ray, self.table, self.job, self.n, self.asset = ray, table, job, n, asset
        self.storage_options = storage_options
        self.watch = _Watch(ray, asset=asset)
        self.classes: local._Classes | None = None

    def read(self, columns: list[str] | dict[str, str]) -> Any:
        """The filtered base table at the pinned version: ``columns`` (a dict: SQL
        expressions by name) and the row addresses ``_rowaddr``."""
        import lance_ray

        return lance_ray.read_lance(
            cast(Any, self.table).uri,
            columns=cast(Any, columns),
            filter=where(self.job.filter),
            with_metadata=True,
            storage_options=_public_options(self.storage_options),
            dataset_options={"version": self.table.version},
        )

    def map(self, ds: Any, fn: Callable[..., pa.Table], **kwargs: Any) -> Any:
        # Ray Data's stubs do not accept keyword-only batch functions: datasets are typed Any.
        return ds.map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs)

    def materialize(self, ds: Any) -> Any:
        return self.watch.run(ds.materialize)

    def census(self, columns: list[str]) -> pa.Table:
        """Rows (``rows``) and first row id (``first``) of each distinct value (tuple) of
        ``columns`` among the filtered rows, keyed ``k0, k1, ...``: one row per class (or
        (group, label) pair). Tasks count their blocks; the driver merges their counts one
        block at a time, so it holds the census and one block's counts, not the rows. (Ray
        Data's groupby starts a hash shuffle with actors: seconds of overhead per build.)"""
        counted = self.materialize(self.map(self.read(columns), _census_counts, columns=columns))
        keys = [f"k{i}" for i in range(len(columns))]
        census: pa.Table | None = None
        for ref, first, rows in _pieces(counted):
            part = _arrow(self.watch.get(ref), first, rows)
            if census is not None:
                part = pa.concat_tables([census, part])
            merged = part.group_by(keys).aggregate([("rows", "sum"), ("first", "min")])
            census = pa.table(
                {
                    **{k: merged.column(k) for k in keys},
                    "rows": merged.column("rows_sum"),
                    "first": merged.column("first_min"),
                }
            )
        assert census is not None  # n > 0 rows were read
        read = int(census.column("rows").to_numpy().sum())
        if read != self.n:
            self.changed(read)
        return census

    def batches(self, ds: Any, collect: Callable[[pa.Table], None]) -> None:
        """``collect`` each block of ``ds`` on the driver, one block at a time, after
        materializing it. Not ``iter_batches``: with a worker node SIGKILLed during a streamed
        pass, the CI's two-worker S3 test once hung past its 240 s limit, while materialized
        blocks are rebuilt from lineage (the census's way, which those tests have passed)."""
        done = self.materialize(ds)
        for ref, first, rows in _pieces(done):
            collect(_arrow(self.watch.get(ref), first, rows))

    def placed_by_keys(self, keyed: Any, ends: np.ndarray, counts: np.ndarray) -> Any | None:
        """``keyed``'s rows placed by comparing their keys with `bounds` (`_place_keyed`);
        None when `bounds` refuses (the caller sorts)."""
        found = self.bounds(keyed, ends, counts)
        if found is None:
            return None
        return self.map(
            keyed,
            _place_keyed,
            bounds=found[0],
            valid=found[1],
            splits=self.job.num_splits,
            shuffle_seed=self.job.shuffle_seed,
        )

    def bounds(
        self, keyed: Any, ends: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(bounds, valid)``: ``bounds[c, s]`` the assignment key at rank ``ends[c, s]`` of
        class ``c`` (its rows ranked by key), for each end below the class's ``counts[c]`` rows
        (``valid``), as a sort would give it, from two passes over ``keyed``
        (``row_id``, ``akey``, ``code`` when several classes) instead of a distributed sort:

        1. rows per cell (class, top bits of the key; `_cell_counts`): the cell holding each
           end's rank and that rank within the cell (`_end_cells`);
        2. the keys of those cells only (`_keys_in`, a few thousand rows each), sorted on the
           driver: the key at that rank (`_end_keys`).

        Keys are uniform over 64 bits (`order_key`), so cells hold about equal rows. None
        (the caller sorts) when `_histogram_bits` finds no histogram that fits (very many
        classes), or when the cells holding an end have more than `_FETCH_KEYS` keys."""
        bits = _histogram_bits(counts, ends)
        if bits is None:
            return None
        rows = np.zeros(counts.size << bits, dtype=np.int64)

        def count(part: pa.Table) -> None:
            np.add.at(rows, part.column("cell").to_numpy(), part.column("rows").to_numpy())

        self.batches(self.map(keyed, _cell_counts, bits=bits, cells=rows.size), count)
        per_class = rows.reshape(counts.size, 1 << bits).sum(axis=1)
        if not np.array_equal(per_class, counts):
            self.changed(int(per_class.sum()))
        valid = ends < counts[:, None]
        ranks = _end_cells(rows, counts, ends, valid)
        wanted = np.unique(ranks[2])
        if wanted.size == 0:  # every split end at or past its class's rows
            return np.zeros(valid.shape, dtype=np.uint64), valid
        if int(rows[wanted].sum()) > _FETCH_KEYS:  # skewed past `_histogram_bits`' estimate
            return None
        parts: list[pa.Table] = []
        fetch = self.map(keyed, _keys_in, bits=bits, cells=rows.size, wanted=wanted)
        self.batches(fetch, parts.append)
        bounds = _end_keys(parts, rows, ranks, valid.shape)
        if bounds is None:
            self.changed(sum(part.num_rows for part in parts))
        return bounds, valid

    def classes_of(self, values: pa.Array, rows: np.ndarray, first: np.ndarray) -> local._Classes:
        """`local._Classes` of a census: distinct values in order of first appearance (the
        local engine's scan meets rows in row-id order), their rows."""
        order = np.argsort(first, kind="stable")
        return local._Classes.of(values.take(pa.array(order)), rows[order])

    def changed(self, read: int) -> NoReturn:
        raise SpecError(
            f"asset '{self.asset}': table '{self.table.name}' read {read} rows at version "
            f"{self.table.version}, {self.n} counted; re-run"
        )

    def finish(self, placed: Any, planned: np.ndarray | None) -> tuple[Any, np.ndarray]:
        """``placed`` rows sorted into read order (split, then read key), and their rows per
        split (checked against ``planned`` when the sizes were known in advance)."""
        splits = self.job.num_splits
        ordered = self.materialize(
            placed.sort(["split_id", "rkey"]).select_columns(["row_id", "split_id"])
        )
        if planned is not None:  # the row count is in the blocks' metadata: no tasks
            kept = ordered.count()
            if kept != int(planned.sum()):
                raise SpecError(
                    f"asset '{self.asset}': engine 'ray' placed {kept} rows, planned "
                    f"{int(planned.sum())} (table '{self.table.name}' changed during the "
                    "build?); re-run"
                )
            return ordered, planned
        rows = np.zeros(splits, dtype=np.int64)
        for counts in self.watch.get(_by_position(self.ray, ordered, _split_counts, splits=splits)):
            rows += counts
        return ordered, rows

    def ordered(self) -> tuple[Any, np.ndarray]:
        job, assigner = self.job, self.job.assigner
        with _on_cluster(self.ray, asset=self.asset):
            if assigner is None and job.label is None:
                return self.ranked()
            if assigner is None or isinstance(assigner, local._FoldsInOrder):
                return self.stratified()
            if isinstance(assigner, local._Group):
                return self.grouped(assigner)
            if isinstance(assigner, local._Time):
                return self.timed(assigner)
            if isinstance(assigner, local._Hash):
                placed = self.map(
                    self.read(list(assigner.split.columns)),
                    _hashed,
                    split=assigner.split,
                    shuffle_seed=job.shuffle_seed,
                )
                return self.finish(placed, None)
            assert isinstance(assigner, local._Calculated)
            placed = self.map(
                self.read(cast(dict[str, str], assigner.columns)),
                _calculated,
                check=assigner.check(),
                splits=job.num_splits,
                shuffle_seed=job.shuffle_seed,
            )
            return self.finish(placed, None)

    def ranked(self) -> tuple[Any, np.ndarray]:
        """One class: the ``n`` rows ranked by their assignment key (``order_key(row_id,
        split seed)``, or the row id without a seed: sequential splits, unshuffled k-fold),
        split ``s`` the ranks ``[ends[s-1], ends[s])`` (ranks past the last end are left out):
        one key per split boundary, from a histogram of seeded keys (`bounds`) or a
        distributed sort of row ids."""
        job, n = self.job, self.n
        sizes = np.asarray(job.sizes(np.array([n], dtype=np.int64))[0], dtype=np.int64)
        rows = self.read([])
        boundaries = np.zeros(0, dtype=np.uint64)
        if sizes.size == 1 and int(sizes[0]) == n:
            # One split holding every row: every rank is in it, so nothing needs ranking.
            keyed = self.map(rows, _row_ids)
        else:
            if job.split_seed is not None:  # keys are `order_key`s: uniform, see `bounds`
                keyed = self.map(rows, _assignment_keys, seed=job.split_seed)
                ranks = np.cumsum(sizes)[None, :]  # one class
                placed = self.placed_by_keys(keyed, ranks, np.array([n], dtype=np.int64))
                if placed is not None:
                    return self.finish(placed, sizes)
            # Ranked by row id (sequential, unshuffled k-fold): a sort.
            keyed = self.materialize(
                self.map(rows, _assignment_keys, seed=job.split_seed).sort("akey")
            )
            if keyed.count() != n:
                self.changed(keyed.count())
            ends = [int(e) for e in np.cumsum(sizes) if e < n]
            boundaries = np.array(_column_at_ranks(self.watch, keyed, ends, "akey"), np.uint64)
        placed = self.map(
            keyed,
            _place,
            boundaries=boundaries,
            splits=job.num_splits,
            shuffle_seed=job.shuffle_seed,
        )
        return self.finish(placed, sizes)

    def stratified(self) -> tuple[Any, np.ndarray]:
        """Per-class rank intervals (`StratifiedSplit`, `StratifiedKFold`): the census gives
        the classes and their sizes per split (the local engine's: classes in ascending label
        order for a random rank, by first appearance for `StratifiedKFold(shuffle=False)`,
        which ranks by row id); seeded, each class's boundary keys come from `bounds`,
        otherwise rows are sorted by ``(class, key)`` and each task places its rows by their
        global rank (`_place_ranked`)."""
        job, assigner = self.job, self.job.assigner
        label = job.label if assigner is None else cast(local._FoldsInOrder, assigner).label
        assert label is not None
        census = self.census([label])
        classes = self.classes_of(
            census.column("k0").combine_chunks(),
            census.column("rows").to_numpy(),
            census.column("first").to_numpy(),
        )
        self.classes = classes
        if assigner is None:
            remap = classes.sorted_order()  # code -> class in ascending label order
            counts = np.zeros(classes.counts.size, dtype=np.int64)
            counts[remap] = classes.counts
            ends = np.cumsum(np.asarray(job.sizes(counts), dtype=np.int64), axis=1)
        else:
            remap, counts = None, classes.counts
            assigner.classes = classes
            ends = cast(local._FoldsInOrder, assigner).ends()
        assert classes.lookup is not None
        keyed = self.map(
            self.read([label]),
            _class_keys,
            column=label,
            lookup=classes.lookup,
            remap=remap,
            seed=job.split_seed,
        )
        planned = np.diff(ends, axis=1, prepend=0).sum(axis=0)
        if job.split_seed is not None:  # keys are `order_key`s: uniform, see `bounds`
            placed = self.placed_by_keys(keyed, ends, counts)
            if placed is not None:
                return self.finish(placed, planned)
        keyed = self.materialize(keyed.sort(["code", "akey"]))
        refs = _by_position(
            self.ray,
            keyed,
            _place_ranked,
            starts=np.cumsum(counts) - counts,
            ends=ends,
            splits=job.num_splits,
            shuffle_seed=job.shuffle_seed,
        )
        placed = self.ray.data.from_arrow_refs(refs)
        return self.finish(placed, planned)

    def grouped(self, assigner: local._Group) -> tuple[Any, np.ndarray]:
        """`GroupSplit` / `GroupKFold`: the census counts each group (and, stratified, each
        (group, label) pair); the driver decides each group's split with the local engine's
        `local._Group.split_of_code`; each task then places its rows by their group."""
        columns = [assigner.group] if assigner.label is None else [assigner.group, assigner.label]
        census = self.census(columns)
        rows = census.column("rows").to_numpy()
        first = census.column("first").to_numpy()
        per_group = (
            pa.table({"k0": census.column("k0"), "rows": rows, "first": first})
            .group_by("k0")
            .aggregate([("rows", "sum"), ("first", "min")])
        )
        assigner.groups = self.classes_of(
            per_group.column("k0").combine_chunks(),
            per_group.column("rows_sum").to_numpy(),
            per_group.column("first_min").to_numpy(),
        )
        group_lookup = assigner.groups.lookup
        assert group_lookup is not None
        pairs = None
        if assigner.label is not None:
            per_label = (
                pa.table({"k1": census.column("k1"), "rows": rows, "first": first})
                .group_by("k1")
                .aggregate([("rows", "sum"), ("first", "min")])
            )
            assigner.classes = self.classes_of(
                per_label.column("k1").combine_chunks(),
                per_label.column("rows_sum").to_numpy(),
                per_label.column("first_min").to_numpy(),
            )
            assert assigner.classes.lookup is not None
            group_codes = _codes(census.column("k0").combine_chunks(), group_lookup)
            label_codes = _codes(census.column("k1").combine_chunks(), assigner.classes.lookup)
            pairs = ((group_codes << local._PAIR_SHIFT) | label_codes, rows.astype(np.int64))
        split_of_code = assigner.split_of_code(pairs)
        placed = self.map(
            self.read([assigner.group]),
            _grouped,
            column=assigner.group,
            lookup=group_lookup,
            split_of_code=split_of_code,
            splits=self.job.num_splits,
            shuffle_seed=self.job.shuffle_seed,
        )
        return self.finish(placed, None)

    def timed(self, assigner: local._Time) -> tuple[Any, np.ndarray]:
        """`TimeSplit`: rows sorted by time key; the first time of each split follows from a
        few keys and counts (`_time_bounds`), then each row's split from its time."""
        keyed = self.materialize(
            self.map(
                self.read([assigner.column]),
                _time_keys,
                column=assigner.column,
                asset=self.asset,
                table=self.table.name,
            ).sort("tkey")
        )
        if keyed.count() != self.n:
            self.changed(keyed.count())
        bounds = self.time_bounds(keyed, [int(t) for t in assigner.targets])
        placed = self.map(
            keyed,
            _timed,
            bounds=bounds,
            splits=self.job.num_splits,
            shuffle_seed=self.job.shuffle_seed,
        )
        return self.finish(placed, None)

    def time_bounds(self, keyed: Any, targets: list[int]) -> np.ndarray:
        """The first time key of each split after the first, from the sorted keys.

        The local engine (`local._Time`) gives a run of equal times the split holding its
        middle row: the run starting at position ``p`` with ``m`` rows is past target ``t``
        when ``2p + m >= 2t``. That holds for every run after the one holding position ``t``
        and for no run before it, so target ``t``'s bound is that run's time when it holds,
        else the next time (none when the run ends the table: no row is past ``t``)."""
        bounds = []
        for target in targets:  # a loop over splits, not rows
            if target >= self.n:
                continue
            (value,) = _column_at_ranks(self.watch, keyed, [target], "tkey")
            refs = _by_position(self.ray, keyed, _key_counts, column="tkey", value=value)
            below, upto = np.sum(self.watch.get(refs), axis=0).tolist() if refs else (0, 0)
            if below + upto >= 2 * target:  # 2p + m with p = below, m = upto - below
                bounds.append(value)
            elif upto < self.n:
                bounds.extend(_column_at_ranks(self.watch, keyed, [upto], "tkey"))
        return np.array(bounds, dtype=np.uint64)


def _prechecked(table: Table, job: local._Job, *, n: int, asset: str) -> None:
    """The local engine's bad-input errors that its scan would raise (nulls in a label, group
    or time column; a time column without an order), before Ray is touched: a task's error
    would name one block, not the table."""
    assigner = job.assigner
    columns = [job.label] if job.label is not None else []
    if isinstance(assigner, local._FoldsInOrder):
        columns = [assigner.label]
    elif isinstance(assigner, local._Group):
        columns = [assigner.group] + ([assigner.label] if assigner.label is not None else [])
    elif isinstance(assigner, local._Time):
        columns = [assigner.column]
        kind = table.schema.field(assigner.column).type
        try:
            local.time_key(pa.array([], type=kind), assigner.column)
        except ValueError as exc:
            raise SpecError(f"asset '{asset}', table '{table.name}': {exc}") from exc
    for column in columns:
        condition = f"`{column.replace('`', '``')}` IS NULL"
        if job.filter is not None:
            condition = f"({job.filter}\n) AND {condition}"
        nulls = table.count_rows(condition)
        if nulls:
            raise local.null_error(column, f"{nulls} of the {n}", asset=asset, table=table.name)


@contextmanager
def build_permutation(
    table: Table,
    spec: PermutationSpec,
    *,
    asset: str,
    address: str | None,
    storage_options: dict[str, str],
) -> Iterator[PermutationData]:
    """The permutation of ``spec`` over ``table`` (at its checked-out version) on the Ray
    cluster at ``address``, streamed: each call of ``stream`` yields it in read order, and
    ``fragments`` writes it, inside the block only (the rows are released when it ends, see
    `_Held`). Seeds must be resolved."""
    missing = unsupported(spec)
    if missing is not None:
        _refuse(missing, asset=asset)
    n = local._filtered_rows(table, spec, asset=asset)
    _check_key_columns(table, spec, expected=n, asset=asset)
    names = spec.split_names()
    job = local._split_job(table, spec, n, local.LocalSettings(), asset=asset)
    if job.assigner is None and (job.split_seed is None or job.label is None):
        # Sizes follow from n alone: refuse an empty split before touching the cluster.
        local._check_sizes(names, job.sizes(np.array([n]))[0], asset=asset)
    _prechecked(table, job, n=n, asset=asset)
    ray = connect(address)
    _configure(ray)
    build = _Build(ray, table, job, n=n, asset=asset, storage_options=storage_options)
    ordered, sizes = build.ordered()
    held = _Held(ordered)
    del ordered  # only `held` references the rows: `release` frees them
    try:
        local._check_sizes(names, sizes, asset=asset)
        kept = int(sizes.sum())
        _check_coverage(spec, kept=kept, expected=n, asset=asset)
        written = _fragments(
            ray, held, [(0, kept, None)], storage_options=storage_options, asset=asset
        )
        # The stream stays for readers in the driver (a label's split report); the write is
        # the workers' (written).
        yield replace(
            local._streamed(
                table, spec, names, sizes, n, lambda: _batches(ray, held, 0, kept, asset=asset)
            ),
            fragments=written,
        )
    finally:
        _release(held)


@contextmanager
def build_folds(
    table: Table,
    spec: FoldsSpec,
    *,
    asset: str,
    address: str | None,
    storage_options: dict[str, str],
) -> Iterator[FoldsData]:
    """`KFold`, `StratifiedKFold` or `GroupKFold` folds of ``table`` on the Ray cluster at
    ``address``: the local engine's (`local.build_folds`, the same `local._Job`) row for row;
    both tables are streamed from one sorted dataset (the training table is its folds
    rotated, see `perm_assets.folds`), inside the block only (as `build_permutation`)."""
    missing = unsupported(spec)
    if missing is not None:
        _refuse(missing, asset=asset)
    folds = spec.folds
    assert isinstance(folds, KFold | StratifiedKFold | GroupKFold)  # unsupported() refused the rest
    k = folds.k
    n = local._filtered_rows(table, spec, asset=asset)
    local._check_k(table, k, n, asset=asset)
    job = local._folds_job(table, spec, n, asset=asset)
    _prechecked(table, job, n=n, asset=asset)
    ray = connect(address)
    _configure(ray)
    build = _Build(ray, table, job, n=n, asset=asset, storage_options=storage_options)
    ordered, sizes = build.ordered()
    held = _Held(ordered)
    del ordered  # only `held` references the rows: `release` frees them
    try:
        yield _folds_data(ray, held, build, table, spec, sizes, n, storage_options, asset=asset)
    finally:
        _release(held)


def _folds_data(
    ray: Any,
    held: _Held,
    build: _Build,
    table: Table,
    spec: FoldsSpec,
    sizes: np.ndarray,
    n: int,
    storage_options: dict[str, str],
    *,
    asset: str,
) -> FoldsData:
    """`build_folds`' result over the build's ``held`` rows (``sizes``: rows per fold)."""
    folds = spec.folds
    assert isinstance(folds, KFold | StratifiedKFold | GroupKFold)  # unsupported() refused the rest
    k = folds.k
    small: dict[str, int] = {}
    if isinstance(folds, StratifiedKFold):
        assert build.classes is not None
        small = local._small_classes(build.classes, folds, table, asset=asset)
    local._check_folds(spec.split_names(), sizes, n, k, asset=asset)
    first, last = int(sizes[0]), int(sizes[-1])

    def train() -> Iterator[pa.RecordBatch]:
        # The folds rotated: folds 1..k-1 (rows from the end of fold 0), then 0..k-2.
        yield from _batches(ray, held, first, n, asset=asset, split_id=0)
        yield from _batches(ray, held, 0, n - last, asset=asset, split_id=0)

    folds_data = local._streamed_folds(
        table, spec, sizes, n, lambda: _batches(ray, held, 0, n, asset=asset), train, small
    )
    # Both tables written by the workers; the streams stay for readers in the driver.
    common = {"storage_options": storage_options, "asset": asset}
    return replace(
        folds_data,
        validation=replace(
            folds_data.validation, fragments=_fragments(ray, held, [(0, n, None)], **common)
        ),
        train_fragments=_fragments(ray, held, [(first, n, 0), (0, n - last, 0)], **common),
    )
