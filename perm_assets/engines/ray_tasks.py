"""The functions Ray workers run for `perm_assets.engines.ray`: Ray Data batch functions and
tasks over blocks of a materialized dataset.

Ray pickles them by reference, so each worker process imports this module (perm_assets must be
installed on the cluster's nodes). It imports numpy, pyarrow and the engines' pure keys
(`perm_assets.engines.keys`), not dagster or lancedb: a new worker process starts its first
task ~3 s sooner and ~150 MB smaller (tests/test_ray_ranks.py unpickles every kind of task
and checks). Only ``HashSplit`` tasks import lancedb (its hash); every argument a task gets is
a plain value, a numpy or Arrow array, or a spec model (pydantic).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perm_assets.engines.keys import (
    _DOMAIN_ORDER,
    PERMUTATION_SCHEMA,
    calculated_splits,
    hash_splits,
    order_key,
    split_of_rank,
    time_key,
)
from perm_assets.errors import SpecError

if TYPE_CHECKING:
    from lance.fragment import FragmentMetadata

    from perm_assets.specs import HashSplit


def _rowaddr(batch: pa.Table) -> np.ndarray:
    return batch.column("_rowaddr").to_numpy().astype(np.uint64, copy=False)


def _assignment_keys(batch: pa.Table, *, seed: int | None) -> pa.Table:
    """Each row's assignment key: ``order_key(row_id, seed)``, or without a seed the row id
    itself (rank by row id: unshuffled k-fold, the local engine's scan position)."""
    row_ids = _rowaddr(batch)
    keys = row_ids if seed is None else order_key(row_ids, seed)
    return pa.table({"row_id": row_ids, "akey": keys})


def _placed(
    row_ids: np.ndarray, split: np.ndarray, *, splits: int, shuffle_seed: int | None
) -> pa.Table:
    """``(row_id, split_id, rkey)`` of the rows with a split below ``splits`` (the others are
    left out: counts, allow_discard, a discarding hash split), ``rkey`` their read key."""
    kept = split < splits
    row_ids, split = row_ids[kept], split[kept].astype(np.uint64)
    read = row_ids if shuffle_seed is None else order_key(row_ids, shuffle_seed, _DOMAIN_ORDER)
    return pa.table({"row_id": row_ids, "split_id": split, "rkey": read})


def _place(
    batch: pa.Table, *, boundaries: np.ndarray, splits: int, shuffle_seed: int | None
) -> pa.Table:
    """Split of each row from its assignment key (rank intervals as key intervals), and its
    read key."""
    row_ids = batch.column("row_id").to_numpy().astype(np.uint64, copy=False)
    if "akey" in batch.column_names:
        keys = batch.column("akey").to_numpy().astype(np.uint64, copy=False)
        split = np.searchsorted(boundaries, keys, side="right")
    else:
        split = np.zeros(row_ids.size, dtype=np.int64)
    return _placed(row_ids, split, splits=splits, shuffle_seed=shuffle_seed)


def _cells(batch: pa.Table, bits: int) -> np.ndarray:
    """Each row's histogram cell: its class code (0 without one) then the top ``bits`` bits
    of its assignment key."""
    keys = batch.column("akey").to_numpy().astype(np.uint64, copy=False)
    cells = (keys >> np.uint64(64 - bits)).astype(np.int64)
    if "code" in batch.column_names:
        cells |= batch.column("code").to_numpy().astype(np.int64) << bits
    return cells


def _cell_counts(batch: pa.Table, *, bits: int, cells: int) -> pa.Table:
    """Rows per non-empty cell of the batch (`_cells`, ``cells`` of them in all)."""
    rows = np.bincount(_cells(batch, bits), minlength=cells)  # linear: no sort
    present = np.flatnonzero(rows)
    return pa.table({"cell": present, "rows": rows[present].astype(np.int64)})


def _keys_in(batch: pa.Table, *, bits: int, cells: int, wanted: np.ndarray) -> pa.Table:
    """``(cell, akey)`` of the batch's rows in the ``wanted`` cells (of ``cells``)."""
    of = _cells(batch, bits)
    lookup = np.zeros(cells, dtype=bool)
    lookup[wanted] = True
    hit = lookup[of]  # one pass, however many cells are wanted
    return pa.table({"cell": of[hit], "akey": batch.column("akey").filter(pa.array(hit))})


def _place_keyed(
    batch: pa.Table,
    *,
    bounds: np.ndarray,
    valid: np.ndarray,
    splits: int,
    shuffle_seed: int | None,
) -> pa.Table:
    """Split of each row from its assignment key: ``bounds[c, s]`` is the key at rank
    ``ends[c, s]`` of class ``c`` (where ``valid``), so a row's rank in its class is past that
    end exactly when its key is at least that key (keys are unique: `order_key` is a
    bijection); `split_of_rank`'s count of ends passed, without ranking any row."""
    keys = batch.column("akey").to_numpy().astype(np.uint64, copy=False)
    codes = (
        batch.column("code").to_numpy().astype(np.int64, copy=False)
        if "code" in batch.column_names
        else np.zeros(keys.size, dtype=np.int64)
    )
    split = np.zeros(keys.size, dtype=np.int64)
    for s in range(bounds.shape[1]):  # a loop over splits only
        split += (keys >= bounds[codes, s]) & valid[codes, s]
    row_ids = batch.column("row_id").to_numpy().astype(np.uint64, copy=False)
    return _placed(row_ids, split, splits=splits, shuffle_seed=shuffle_seed)


def _row_ids(batch: pa.Table) -> pa.Table:
    return pa.table({"row_id": _rowaddr(batch)})


def _codes(values: pa.Array, lookup: pa.Array) -> np.ndarray:
    """Index of each value in ``lookup`` (the census's distinct values, so every value is in
    it), as `local._Classes.codes` gives it."""
    codes = pc.index_in(values, value_set=lookup)  # pyright: ignore[reportAttributeAccessIssue]
    return codes.to_numpy().astype(np.int64)


def _census_counts(batch: pa.Table, *, columns: list[str]) -> pa.Table:
    """Rows and first row id of each distinct value (tuple) of ``columns`` in this batch,
    keyed ``k0, k1, ...``: partial counts, summed across batches by a Ray Data groupby."""
    keys = {f"k{i}": batch.column(column) for i, column in enumerate(columns)}
    rows = pa.table({**keys, "row_id": _rowaddr(batch)})
    counted = rows.group_by(list(keys)).aggregate([("row_id", "count"), ("row_id", "min")])
    return pa.table(
        {
            **{key: counted.column(key) for key in keys},
            "rows": counted.column("row_id_count").cast(pa.int64()),
            "first": counted.column("row_id_min").cast(pa.uint64()),
        }
    )


def _class_keys(
    batch: pa.Table, *, column: str, lookup: pa.Array, remap: np.ndarray | None, seed: int | None
) -> pa.Table:
    """Each row's class code (its label's index in ``lookup``, through ``remap``) and
    assignment key (`_assignment_keys`), to sort by ``(code, akey)``."""
    codes = _codes(batch.column(column), lookup)
    keyed = _assignment_keys(batch, seed=seed)
    return keyed.append_column("code", pa.array(codes if remap is None else remap[codes]))


def _calculated(
    batch: pa.Table, *, check: dict[str, Any], splits: int, shuffle_seed: int | None
) -> pa.Table:
    """`CalculatedSplit`: the split the expression gives each row, range-checked by
    `calculated_splits` (the local engine's check; ``check``: its plain-value arguments)."""
    row_ids = _rowaddr(batch)
    split = calculated_splits(batch.column("split"), row_ids, **check)
    return _placed(row_ids, split, splits=splits, shuffle_seed=shuffle_seed)


def _hashed(batch: pa.Table, *, split: HashSplit, shuffle_seed: int | None) -> pa.Table:
    """`HashSplit`: lancedb's hash split of the batch's hash columns (`hash_splits`): only
    these tasks import lancedb."""
    import lancedb

    db = lancedb.connect("memory://")
    name = f"hash_{os.getpid()}_{threading.get_ident()}"
    try:
        splits = hash_splits(batch.select(list(split.columns)), split, db, name)
    finally:
        if name in db.table_names():
            db.drop_table(name)
    return _placed(_rowaddr(batch), splits, splits=split.num_splits, shuffle_seed=shuffle_seed)


def _grouped(
    batch: pa.Table,
    *,
    column: str,
    lookup: pa.Array,
    split_of_code: np.ndarray,
    splits: int,
    shuffle_seed: int | None,
) -> pa.Table:
    """`GroupSplit` / `GroupKFold`: each row follows its group (the driver decided the
    group's split from the census)."""
    split = split_of_code[_codes(batch.column(column), lookup)]
    return _placed(_rowaddr(batch), split, splits=splits, shuffle_seed=shuffle_seed)


def _time_keys(batch: pa.Table, *, column: str, asset: str, table: str) -> pa.Table:
    """Each row's `time_key`; its ValueError (NaN) as the local engine's SpecError."""
    try:
        keys = time_key(batch.column(column), column)
    except ValueError as exc:
        raise SpecError(f"asset '{asset}', table '{table}': {exc}") from exc
    return pa.table({"row_id": _rowaddr(batch), "tkey": keys})


def _timed(
    batch: pa.Table, *, bounds: np.ndarray, splits: int, shuffle_seed: int | None
) -> pa.Table:
    """`TimeSplit`: the split of each row from its time key, ``bounds[s]`` the first time of
    split ``s + 1`` (see `_time_bounds`)."""
    keys = batch.column("tkey").to_numpy().astype(np.uint64, copy=False)
    split = np.searchsorted(bounds, keys, side="right")
    row_ids = batch.column("row_id").to_numpy().astype(np.uint64, copy=False)
    return _placed(row_ids, split, splits=splits, shuffle_seed=shuffle_seed)


# Ray tasks over the pieces of a materialized dataset (`_pieces`), given its global position.


def _arrow(block: Any, first: int, rows: int) -> pa.Table:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow().slice(first, rows)


def _place_ranked(
    block: Any,
    first: int,
    rows: int,
    start: int,
    *,
    starts: np.ndarray,
    ends: np.ndarray,
    splits: int,
    shuffle_seed: int | None,
) -> pa.Table:
    """Rows sorted by ``(code, akey)``, the first at global rank ``start``: a row's rank in
    its class is its global rank less its class's first (``starts[code]``), and its split the
    interval of its class's cumulative sizes ``ends[code]`` that rank falls in
    (`split_of_rank`, as the local engine's stratified ranks)."""
    part = _arrow(block, first, rows)
    codes = part.column("code").to_numpy().astype(np.int64, copy=False)
    rank = np.arange(start, start + part.num_rows, dtype=np.int64) - starts[codes]
    split = split_of_rank(rank, ends, codes)
    row_ids = part.column("row_id").to_numpy().astype(np.uint64, copy=False)
    return _placed(row_ids, split, splits=splits, shuffle_seed=shuffle_seed)


def _split_counts(block: Any, first: int, rows: int, start: int, *, splits: int) -> np.ndarray:
    ids = _arrow(block, first, rows).column("split_id").to_numpy().astype(np.int64)
    return np.bincount(ids, minlength=splits)


def _key_counts(
    block: Any, first: int, rows: int, start: int, *, column: str, value: int
) -> np.ndarray:
    """Rows of a block sorted by ``column`` below ``value``, and at most ``value``."""
    keys = _arrow(block, first, rows).column(column).to_numpy().astype(np.uint64)
    at = np.uint64(value)
    return np.array([np.searchsorted(keys, at, "left"), np.searchsorted(keys, at, "right")])


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

    piece = block.slice(first, rows).select(["row_id", "split_id"]).cast(PERMUTATION_SCHEMA)
    if split_id is not None:
        ids = pa.array(np.full(piece.num_rows, split_id, dtype=np.uint64))
        piece = piece.set_column(1, PERMUTATION_SCHEMA.field("split_id"), ids)
    written = write_fragment(
        [piece], uri, schema=PERMUTATION_SCHEMA, storage_options=storage_options
    )
    return [fragment for fragment, _ in written]


# ---------------------------------------------------------------------- the blocking checks
_ROUTE_BATCH_ROWS = 1 << 18


def _route_rows(
    uri: str,
    version: int,
    fragment_ids: list[int],
    *,
    shard_of: np.ndarray,
    shards: int,
    storage_options: dict[str, str] | None,
) -> pa.Table | tuple[pa.Table, ...]:
    """A Ray task (``num_returns=shards``): the ``row_id``/``split_id`` rows of fragments
    ``fragment_ids`` of the permutation table at ``uri`` / ``version``, one table per shard
    of base fragments: base fragment ``f``'s rows go to ``shard_of[f]``, an id of a fragment
    past ``shard_of`` (no base row: a stray) to ``f % shards``. Split ids are narrowed to a
    byte (at most `membership.STRAY_SPLIT`: still out of range), so 9 bytes a row move."""
    import lance

    from perm_assets.membership import STRAY_SPLIT

    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    parts: list[list[pa.Table]] = [[] for _ in range(shards)]
    for fragment_id in fragment_ids:
        fragment = dataset.get_fragment(fragment_id)
        if fragment is None:  # the plan read the table at this version: it has them all
            raise RuntimeError(f"permutation table {uri}@{version}: no fragment {fragment_id}")
        for batch in fragment.to_batches(
            columns=["row_id", "split_id"], batch_size=_ROUTE_BATCH_ROWS
        ):
            row_ids = batch.column(0).to_numpy().astype(np.uint64, copy=False)
            splits = np.minimum(batch.column(1).to_numpy(), STRAY_SPLIT).astype(np.uint8)
            base_fragment = (row_ids >> np.uint64(32)).astype(np.int64)
            known = base_fragment < shard_of.size
            shard = np.where(
                known, shard_of[np.where(known, base_fragment, 0)], base_fragment % shards
            ).astype(np.int64)
            order = np.argsort(shard, kind="stable")
            ends = np.searchsorted(shard[order], np.arange(shards + 1))
            for s in range(shards):
                mine = order[ends[s] : ends[s + 1]]
                if mine.size:
                    parts[s].append(pa.table({"row_id": row_ids[mine], "split_id": splits[mine]}))
    empty = pa.table({"row_id": pa.array([], pa.uint64()), "split_id": pa.array([], pa.uint8())})
    out = tuple(pa.concat_tables(p) if p else empty for p in parts)
    return out[0] if shards == 1 else out


def _check_shard(
    *parts: pa.Table,
    base_uri: str,
    base_version: int,
    fragments: list[int],
    num_splits: int,
    filter: str | None,
    label: str | None,
    group: str | None,
    time: str | None,
    asset: str,
    table: str,
    among: str,
    storage_options: dict[str, str] | None,
) -> tuple[Any, Any]:
    """A Ray task: the permutation's rows of one shard of base fragments (``parts``, one per
    `_route_rows` task: Ray has them local before the task starts, so it never waits holding
    a CPU) against those fragments' filtered rows: ``(Membership, ScanCounts)`` of the shard,
    as `perm_assets.membership` computes them for the whole base (``split_of`` dropped)."""
    import lance

    from perm_assets.membership import Membership, ScanCounts, key_columns

    base = lance.dataset(base_uri, version=base_version, storage_options=storage_options)
    chosen = []
    for fragment_id in fragments:
        fragment = base.get_fragment(fragment_id)
        if fragment is None:  # the plan read the base at this version: it has them all
            raise RuntimeError(f"base {base_uri}@{base_version}: no fragment {fragment_id}")
        chosen.append(fragment)
    rows = (b for part in parts for b in part.to_batches())
    lengths = [f.metadata.physical_rows for f in chosen]
    counts = ScanCounts.of(num_splits, label=label, group=group, time=time)
    with Membership.over(fragments, lengths, rows, num_splits) as member:
        scanner = base.scanner(
            columns=key_columns(label, group, time),
            filter=filter,
            fragments=chosen,
            with_row_address=True,
            batch_size=_ROUTE_BATCH_ROWS,
        )
        counts.scan(
            member,
            scanner.to_batches(),
            "_rowaddr",
            nulls_allowed=False,
            table=table,
            among=among,
            asset=asset,
        )
    return member, counts


def _rows_at(dataset: Any, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows ``[start, stop)`` of a Lance ``dataset`` (table order; no deleted rows, as the
    permutation tables the engine writes): only the fragments holding them are read."""
    parts, at = [], 0
    for fragment in dataset.get_fragments():
        rows = fragment.count_rows()
        lo, hi = max(start, at), min(stop, at + rows)
        if lo < hi:
            parts.append(fragment.to_table(columns=columns, offset=lo - at, limit=hi - lo))
        at += rows
        if at >= stop:
            break
    if not parts:
        return dataset.schema.empty_table().select(columns)
    return pa.concat_tables(parts)


def _training_range(
    start: int,
    stop: int,
    *,
    folds_uri: str,
    folds_version: int,
    train_uri: str,
    train_version: int,
    first: int,
    ranges: list[list[int]],
    storage_options: dict[str, str] | None,
) -> tuple[bool, int, list[int]]:
    """A Ray task: training positions ``[start, stop)`` of a k-fold training table against
    the folds table rotated (position ``p`` holds folds row ``(p + first) % n``):
    ``(row ids equal, training rows read, own)``, ``own[i]`` the positions of fold ``i``'s
    training range (``ranges[i]``) here that hold one of fold ``i``'s own rows."""
    import lance

    from perm_assets.membership import own_fold_rows

    train = lance.dataset(train_uri, version=train_version, storage_options=storage_options)
    folds = lance.dataset(folds_uri, version=folds_version, storage_options=storage_options)
    n = folds.count_rows()
    got = _rows_at(train, start, stop, ["row_id"]).column("row_id").to_numpy()
    # Positions p + first in [start + first, stop + first): past n they wrap (once: the
    # training table has fewer than 2n rows).
    low, high = start + first, start + first + got.size
    pieces = [_rows_at(folds, low, min(high, n), ["row_id", "split_id"])]
    if high > n:
        pieces.append(_rows_at(folds, max(low, n) - n, high - n, ["row_id", "split_id"]))
    want = pa.concat_tables(pieces)
    want_ids = want.column("row_id").to_numpy()
    equal = bool(np.array_equal(got, want_ids))
    own = own_fold_rows(want.column("split_id").to_numpy(), start, ranges) if equal else []
    return equal, int(got.size), own
