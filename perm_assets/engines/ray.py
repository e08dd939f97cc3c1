"""The distributed "ray" engine: the local engine's permutation, computed on a Ray cluster.

Same rows as `perm_assets.engines.local`, row for row, for one base table version, spec and
seed, whatever the number of Ray workers: it reuses that engine's pure functions of
``(seed, row id)`` (`local.order_key`, `local.split_of_rank`'s rank intervals), and only the
way the sort is distributed differs, which a total order on unique keys makes irrelevant.
So the data version's algorithm identity is the local engine's (`ALGORITHM`).

1. **Read**: Ray Data reads the filtered base table at the pinned version through lance-ray's
   ``read_lance(columns=[], with_metadata=True)``: each task reads only the row addresses
   (``_rowaddr``, ``fragment id << 32 | offset``) of its fragments, never a data column. These
   are exactly the ``row_id`` values lancedb's ``Permutation`` expects of a table without
   stable row ids (what ``with_row_id(True)`` returns and the local engine stores; a view over
   a Ray-built table reads the expected base rows: tests/test_ray_engine.py).
2. **Assign** (random splits, k-fold): each row gets an assignment key,
   ``order_key(row_id, split seed)``, or for ``KFold(shuffle=False)`` the row id itself (the
   local engine ranks those rows by scan position, which is row-id order: Lance lists
   fragments in id order, also after a compaction); Ray Data sorts the keys (a distributed,
   range-partitioned sort). With one split keeping every row, nothing is ranked. The split of
   a row of rank ``r`` is the interval of cumulative split sizes ``r`` falls in, so a split
   boundary is the key at rank ``ends[s]``: the driver reads those few keys from the sorted
   blocks' metadata and one block each, and every task places its rows with
   ``searchsorted`` against them.
3. **Order**: rows are sorted by ``(split_id, order_key(row_id, shuffle seed))`` (or by row id
   without a shuffle, as the local engine stores an unshuffled split).
4. **Write**: one Ray task per block of the sorted dataset writes its rows, from the object
   store, as Lance fragments of the permutation table (lance-ray's fragment writer,
   `_write_piece`); the driver collects the fragments' metadata, in order, and the IO manager
   commits them as one new version (`perm_assets.tables.commit_fragments`).

``KFold`` is a random split with counts ``n // k`` (+1 for the first ``n % k`` folds), as in
the local engine; its training table is the sorted dataset's folds rotated (folds 1..k-1, then
0..k-2; see `perm_assets.folds`), written from the same materialized blocks, addressed by
position so each task gets only its block of a range. Stratified and group k-fold are not
built here yet (refused, naming the engines that build them).

A worker node that dies mid-build loses its running tasks and the blocks in its object store;
Ray Data retries the tasks and Ray rebuilds lost blocks from their lineage on the surviving
nodes, so the build usually finishes with the same rows; when it fails instead, nothing is
committed (tests/test_ray_engine_s3.py kills a node with SIGKILL and accepts either outcome,
each checked strictly). With no CPU left in the whole cluster Ray would wait forever, so the build
fails after `NO_CPU_SECONDS`. Whatever fails, nothing is committed before every fragment has
been written, so the previous version stays the latest.

Driver memory does not grow with the row count: it holds the row count, the split sizes, one
key per boundary and one fragment's metadata per block. The row ids never pass through the
driver to be written; they do only for a split report with a label (`PermutationData.stream`,
read batch by batch before the write).

Credentials: workers read the base table and write the fragments with credentials from their
own environment (``AWS_*`` variables, instance roles); the driver commits with the resource's.
Storage options whose name suggests a secret are left out of what Ray ships to tasks (lance-ray
puts the storage options in every read task's arguments, visible in Ray's dashboard and logs).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
from lancedb.table import Table

from perm_assets.build import (
    PermutationData,
    _check_coverage,
    _check_key_columns,
    split_sizes,
)
from perm_assets.engines import local
from perm_assets.engines.local import _DOMAIN_ORDER, order_key
from perm_assets.errors import SpecError
from perm_assets.folds import FoldsData
from perm_assets.specs import FoldsSpec, KFold, PermutationSpec, RandomSplit
from perm_assets.tables import FragmentWrite, where

if TYPE_CHECKING:
    from lance.fragment import FragmentMetadata

ALGORITHM = local.ALGORITHM
"""The local engine's: the same rows for the same (base version, spec, seed)."""

SUPPORTED = (
    "no split, RandomSplit (ratios, counts or fixed; no clump_size), KFold; Shuffle without "
    "clump_size"
)
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


def unsupported(spec: PermutationSpec | FoldsSpec) -> str | None:
    """What of ``spec`` this engine cannot build yet (None: all of it)."""
    shuffle = spec.shuffle
    if shuffle is not None and shuffle.clump_size not in (None, 1):
        return "Shuffle(clump_size=...)"
    if isinstance(spec, FoldsSpec):
        return None if isinstance(spec.folds, KFold) else type(spec.folds).__name__
    split = spec.split
    if split is None:
        return None
    if isinstance(split, RandomSplit):
        return "RandomSplit(clump_size=...)" if split.clump_size not in (None, 1) else None
    return type(split).__name__


def _refuse(what: str, *, asset: str) -> None:
    raise SpecError(
        f"asset '{asset}': engine 'ray' does not build {what} yet (it builds: {SUPPORTED}); "
        "use LanceDBResource(engine='local') for the same kind on one machine, or "
        "engine='lancedb'"
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


# ------------------------------------------------------------------- Ray Data batch functions
# Module-level (picklable by reference): workers import perm_assets, so it must be installed on
# the cluster's nodes.


def _assignment_keys(batch: pa.Table, *, seed: int | None) -> pa.Table:
    """Each row's assignment key: ``order_key(row_id, seed)``, or without a seed the row id
    itself (rank by row id: unshuffled k-fold, the local engine's scan position)."""
    row_ids = batch.column("_rowaddr").to_numpy().astype(np.uint64, copy=False)
    keys = row_ids if seed is None else order_key(row_ids, seed)
    return pa.table({"row_id": row_ids, "akey": keys})


def _place(
    batch: pa.Table, *, boundaries: np.ndarray, splits: int, shuffle_seed: int | None
) -> pa.Table:
    """Split of each row from its assignment key (rank intervals as key intervals), and its
    read key; rows past the last split (counts, allow_discard) are dropped."""
    row_ids = batch.column("row_id").to_numpy().astype(np.uint64, copy=False)
    if "akey" in batch.column_names:
        keys = batch.column("akey").to_numpy().astype(np.uint64, copy=False)
        split = np.searchsorted(boundaries, keys, side="right").astype(np.uint64)
        kept = split < splits
        row_ids, split = row_ids[kept], split[kept]
    else:
        split = np.zeros(row_ids.size, dtype=np.uint64)
    read = row_ids if shuffle_seed is None else order_key(row_ids, shuffle_seed, _DOMAIN_ORDER)
    return pa.table({"row_id": row_ids, "split_id": split, "rkey": read})


def _row_ids(batch: pa.Table) -> pa.Table:
    row_ids = batch.column("_rowaddr").to_numpy().astype(np.uint64, copy=False)
    return pa.table({"row_id": row_ids})


def _write_piece(
    block: pa.Table,
    first: int,
    rows: int,
    *,
    uri: str,
    split_id: int | None,
    storage_options: dict[str, str] | None,
) -> list[FragmentMetadata]:
    """A Ray task: rows ``[first, first + rows)`` of one block of the sorted dataset, written
    by lance-ray's fragment writer as data files of the table at ``uri`` (uncommitted: invisible
    until the driver commits them); ``split_id`` set: every row gets that split. Ray hands the
    block over from its object store, so the rows never pass through the driver."""
    from lance_ray.fragment import write_fragment

    piece = block.slice(first, rows).select(["row_id", "split_id"]).cast(_SCHEMA)
    if split_id is not None:
        ids = pa.array(np.full(piece.num_rows, split_id, dtype=np.uint64))
        piece = piece.set_column(1, _SCHEMA.field("split_id"), ids)
    written = write_fragment([piece], uri, schema=_SCHEMA, storage_options=storage_options)
    return [fragment for fragment, _ in written]


# ----------------------------------------------------------------------------- the build
_SCHEMA = local._SCHEMA


@contextmanager
def _on_cluster(ray: Any, *, asset: str) -> Iterator[None]:
    """Ray's errors (a lost object whose lineage cannot be rebuilt, a task out of retries, a
    lost connection) as one that names the asset and the engine and says what was kept: Ray's
    own message names internal operators and object ids, not what to do."""
    try:
        yield
    except ray.exceptions.RayError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"asset '{asset}': engine 'ray': the build failed on the Ray cluster "
            f"({type(exc).__name__}: {first}); no new permutation version was committed, the "
            "previous one stays the latest; re-run when the cluster is healthy"
        ) from exc


class _Watch:
    """Fails a wait on the cluster once it has had no CPU for `NO_CPU_SECONDS` (see there)."""

    def __init__(self, ray: Any, *, asset: str) -> None:
        self.ray, self.asset = ray, asset
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
                "build cannot go on; no new permutation version was committed, the previous "
                "one stays the latest; re-run when the cluster has workers (the abandoned Ray "
                "Data execution waits in a background thread until this process exits)"
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


def _blocks(watch: _Watch, ds: Any, start: int, stop: int) -> Iterator[tuple[int, pa.Table]]:
    """``(global row of its first row, rows)`` of each block piece of the materialized ``ds``
    overlapping rows ``[start, stop)``, in order, trimmed to that range. Block sizes come from
    the bundles' metadata (Ray Data internals: ``RefBundle.blocks`` / ``slices``; Ray Data has
    no public "rows at positions"), so only the blocks in range are fetched, one at a time."""
    at = 0
    for bundle in ds.iter_internal_ref_bundles():
        slices = bundle.slices or (None,) * len(bundle.blocks)
        for entry, part in zip(bundle.blocks, slices, strict=True):
            first = 0 if part is None else part.start_offset
            rows = int(entry.metadata.num_rows or 0) if part is None else part.num_rows
            lo, hi = max(start, at), min(stop, at + rows)
            if lo < hi:
                block = watch.get(entry.ref)
                yield lo, block.slice(first + lo - at, hi - lo)
            at += rows
            if at >= stop:
                return


def _keys_at_ranks(watch: _Watch, sorted_ds: Any, ranks: list[int]) -> np.ndarray:
    """The ``akey`` at each global rank of a materialized dataset sorted by it."""
    found = []
    for rank in ranks:  # a loop over split boundaries, not rows
        for _, rows in _blocks(watch, sorted_ds, rank, rank + 1):
            found.append(rows.column("akey")[0].as_py())
    if len(found) != len(ranks):
        raise RuntimeError(f"engine 'ray': ranks {ranks} past the sorted rows")
    return np.array(found, dtype=np.uint64)


def _batches(
    ray: Any, ordered: Any, start: int, stop: int, *, asset: str, split_id: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Rows ``[start, stop)`` of the materialized ``ordered`` dataset as permutation batches of
    at most ``_STREAM_BATCH_ROWS``; ``split_id`` set: every row gets that split."""
    with _on_cluster(ray, asset=asset):
        for _, rows in _blocks(_Watch(ray, asset=asset), ordered, start, stop):
            for batch in rows.cast(_SCHEMA).to_batches(max_chunksize=_STREAM_BATCH_ROWS):
                if split_id is not None:
                    ids = pa.array(np.full(batch.num_rows, split_id, dtype=np.uint64))
                    batch = batch.set_column(1, _SCHEMA.field("split_id"), ids)
                yield batch


def _pieces(ds: Any, start: int, stop: int) -> Iterator[tuple[Any, int, int]]:
    """``(block ref, first row in the block, rows)`` of each block piece of the materialized
    ``ds`` overlapping rows ``[start, stop)``, in order: `_blocks` without fetching any block
    (the ref goes to a task instead)."""
    at = 0
    for bundle in ds.iter_internal_ref_bundles():
        slices = bundle.slices or (None,) * len(bundle.blocks)
        for entry, part in zip(bundle.blocks, slices, strict=True):
            first = 0 if part is None else part.start_offset
            rows = int(entry.metadata.num_rows or 0) if part is None else part.num_rows
            lo, hi = max(start, at), min(stop, at + rows)
            if lo < hi:
                yield entry.ref, first + lo - at, hi - lo
            at += rows
            if at >= stop:
                return


def _fragments(
    ray: Any,
    ordered: Any,
    ranges: list[tuple[int, int, int | None]],
    *,
    storage_options: dict[str, str],
    asset: str,
) -> FragmentWrite:
    """Rows ``[start, stop)`` of the materialized ``ordered`` dataset for each ``(start, stop,
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
                for block, first, rows in _pieces(ordered, start, stop)
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


def _ordered(
    ray: Any,
    table: Table,
    *,
    filter: str | None,
    n: int,
    sizes: np.ndarray,
    rank_seed: int | None,
    shuffle_seed: int | None,
    storage_options: dict[str, str],
    asset: str,
) -> Any:
    """The materialized dataset of ``(row_id, split_id)`` in read order: the ``n`` filtered
    rows ranked by their assignment key (``order_key(row_id, rank_seed)``, or the row id
    without a seed), split ``s`` the ranks ``[ends[s-1], ends[s])`` of the cumulative
    ``sizes`` (ranks past the last end are left out), each split ordered by its read key.
    The local engine's rank intervals (`local._run`), as a distributed sort."""
    import lance_ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # blocks of a sort, in key order
    context.enable_progress_bars = False
    watch = _Watch(ray, asset=asset)
    with _on_cluster(ray, asset=asset):
        # Ray Data's stubs do not accept keyword-only batch functions: datasets are typed Any.
        rows: Any = lance_ray.read_lance(
            cast(Any, table).uri,
            columns=[],
            filter=where(filter),
            with_metadata=True,
            storage_options=_public_options(storage_options),
            dataset_options={"version": table.version},
        )
        boundaries = np.zeros(0, dtype=np.uint64)
        keyed: Any
        if sizes.size == 1 and int(sizes[0]) == n:
            # One split holding every row: every rank is in it, so nothing needs ranking.
            keyed = rows.map_batches(_row_ids, batch_format="pyarrow")
        else:
            keyed = watch.run(
                rows.map_batches(
                    _assignment_keys, batch_format="pyarrow", fn_kwargs={"seed": rank_seed}
                )
                .sort("akey")
                .materialize
            )
            if keyed.count() != n:
                raise SpecError(
                    f"asset '{asset}': table '{table.name}' read {keyed.count()} rows at version "
                    f"{table.version}, {n} counted; re-run"
                )
            ends = np.cumsum(sizes)
            boundaries = _keys_at_ranks(watch, keyed, [int(e) for e in ends if e < n])
        ordered: Any = watch.run(
            keyed.map_batches(
                _place,
                batch_format="pyarrow",
                fn_kwargs={
                    "boundaries": boundaries,
                    "splits": int(sizes.size),
                    "shuffle_seed": shuffle_seed,
                },
            )
            .sort(["split_id", "rkey"])
            .select_columns(["row_id", "split_id"])
            .materialize
        )
        kept = ordered.count()
    if kept != int(sizes.sum()):
        raise SpecError(
            f"asset '{asset}': engine 'ray' placed {kept} rows, planned {int(sizes.sum())} "
            f"(table '{table.name}' changed during the build?); re-run"
        )
    return ordered


def build_permutation(
    table: Table,
    spec: PermutationSpec,
    *,
    asset: str,
    address: str | None,
    storage_options: dict[str, str],
) -> PermutationData:
    """The permutation of ``spec`` over ``table`` (at its checked-out version) on the Ray
    cluster at ``address``, streamed: each call of ``stream`` yields it in read order. Seeds
    must be resolved."""
    missing = unsupported(spec)
    if missing is not None:
        _refuse(missing, asset=asset)
    ray = connect(address)
    n = local._filtered_rows(table, spec, asset=asset)
    _check_key_columns(table, spec, expected=n, asset=asset)
    names = spec.split_names()
    split = spec.split
    assert split is None or isinstance(split, RandomSplit)  # unsupported() refused the rest
    assert split is None or split.seed is not None  # seeds are resolved before building
    sizes = np.array([n]) if split is None else split_sizes(split, n, asset=asset)
    local._check_sizes(names, sizes, asset=asset)
    _check_coverage(spec, kept=int(sizes.sum()), expected=n, asset=asset)
    ordered = _ordered(
        ray,
        table,
        filter=spec.filter,
        n=n,
        sizes=sizes,
        rank_seed=None if split is None else split.seed,
        shuffle_seed=local._shuffle_seed(spec.shuffle),
        storage_options=storage_options,
        asset=asset,
    )
    kept = int(sizes.sum())
    written = _fragments(
        ray, ordered, [(0, kept, None)], storage_options=storage_options, asset=asset
    )
    # The stream stays for readers in the driver (a label's split report); the write is the
    # workers' (written).
    return replace(
        local._streamed(
            table, spec, names, sizes, n, lambda: _batches(ray, ordered, 0, kept, asset=asset)
        ),
        fragments=written,
    )


def build_folds(
    table: Table,
    spec: FoldsSpec,
    *,
    asset: str,
    address: str | None,
    storage_options: dict[str, str],
) -> FoldsData:
    """`KFold` folds of ``table`` on the Ray cluster at ``address``: the local engine's
    (`local.build_folds`) row for row. Fold sizes ``n // k`` (+1 for the first ``n % k``)
    are rank intervals of ``order_key(row_id, seed)``, or of the row id without
    ``shuffle``, as a random split with counts; both tables are streamed from one sorted
    dataset (the training table is its folds rotated, see `perm_assets.folds`)."""
    missing = unsupported(spec)
    if missing is not None:
        _refuse(missing, asset=asset)
    folds = spec.folds
    assert isinstance(folds, KFold)  # unsupported() refused the rest
    ray = connect(address)
    k = folds.k
    n = local._filtered_rows(table, spec, asset=asset)
    local._check_k(table, k, n, asset=asset)
    sizes = local._kfold_sizes(n, k)
    seed = folds.seed if folds.seed is not None else 0  # as local.build_folds
    ordered = _ordered(
        ray,
        table,
        filter=spec.filter,
        n=n,
        sizes=sizes,
        rank_seed=seed if folds.shuffle else None,
        shuffle_seed=local._shuffle_seed(spec.shuffle),
        storage_options=storage_options,
        asset=asset,
    )
    first, last = int(sizes[0]), int(sizes[-1])

    def train() -> Iterator[pa.RecordBatch]:
        # The folds rotated: folds 1..k-1 (rows from the end of fold 0), then 0..k-2.
        yield from _batches(ray, ordered, first, n, asset=asset, split_id=0)
        yield from _batches(ray, ordered, 0, n - last, asset=asset, split_id=0)

    folds_data = local._streamed_folds(
        table, spec, sizes, n, lambda: _batches(ray, ordered, 0, n, asset=asset), train, {}
    )
    # Both tables written by the workers; the streams stay for readers in the driver.
    common = {"storage_options": storage_options, "asset": asset}
    return replace(
        folds_data,
        validation=replace(
            folds_data.validation, fragments=_fragments(ray, ordered, [(0, n, None)], **common)
        ),
        train_fragments=_fragments(ray, ordered, [(first, n, 0), (0, n - last, 0)], **common),
    )
