"""Cross-validation folds → two permutation tables of row ids (no row data is copied).

A `Permutation` reads exactly one ``split_id``, so "train on every fold but one" cannot be a
split of the folds table itself. A folds asset therefore persists:

- the **folds table** (named after the asset): one split per validation fold, ``fold_0`` ...
  ``fold_{k-1}``, stored fold after fold; every filtered row is in exactly one (time-series
  folds: the earliest block, which is never validated, is in none);
- the **training table** (``<name>__train``, one split ``train``): a sequence of row ids in
  which fold ``i``'s training rows are one contiguous range, read with `Permutation`'s
  skip/take. For k-fold kinds it is the folds table rotated: folds 1..k-1 then 0..k-2, so the
  complement of fold ``i`` (folds i+1..k-1, 0..i-1) is contiguous. For time-series folds it is
  the rows in time order, and fold ``i`` trains on a prefix (or, with ``max_train_size``, a
  window) of it; with a read ``Shuffle`` it holds each fold's training set instead, shuffled
  on its own, one after another (about ``k n / 2`` rows for expanding windows).

It is written first; the folds table records its name, Lance version and the ``(offset, rows)``
range of every fold, so one folds version always pins the training sets it was built with.
For k folds over n rows the two hold ``n + (2 - 2/k) n`` row ids (2.6n for k = 5; 416 MB of
uint64 pairs at 10M rows), not the ``k n`` of one training copy per fold.

The training order of fold ``i`` is fold after fold, each in the folds table's order: table
order, or the spec's read ``Shuffle``. With that shuffle (no ``clump_size``) and random k-fold
it is a uniformly random order of the training rows, since each fold is a random subset
shuffled on its own; stratified folds read stratified blocks. Without it, each fold's block is
in table order. DataLoader samplers reshuffle per epoch regardless.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from lancedb.table import Table

from perm_assets import assign
from perm_assets.build import (
    PermutationData,
    Scanned,
    check_scalar_columns,
    permutation_table,
    read_order,
    scan_columns,
    with_permutation_metadata,
)
from perm_assets.errors import SpecError
from perm_assets.specs import (
    FoldsSpec,
    GroupKFold,
    KFold,
    StratifiedKFold,
    TimeSeriesFolds,
    key_columns,
)
from perm_assets.tables import (
    KIND_META_KEY,
    TRAIN_RANGES_KEY,
    TRAIN_TABLE_KEY,
    TRAIN_VERSION_KEY,
    FragmentWrite,
)

TRAIN_SUFFIX = "__train"
TRAIN_SPLIT = "train"
"""The training table's one split."""
FOLDS_KIND = "folds"
TRAIN_KIND = "folds_train"


@dataclass(frozen=True)
class FoldsData:
    """Validation folds and the training sequence, in memory, ready to persist.

    Attributes:
        validation: the folds table (split ``i`` = validation rows of fold ``i``), fold after
            fold.
        train: the training table: one split, ``train``; fold ``i`` trains on its rows
            ``train_ranges[i]``. For k-fold kinds its columns are zero-copy slices of
            ``validation``'s.
        train_ranges: ``(offset, rows)`` of each fold's training rows in ``train``.
        small_classes: classes with fewer rows than k (stratified k-fold), as ``{label: rows}``.
        train_stream: set by out-of-core engines: the training table's rows, batch by batch;
            ``train`` then holds its schema and metadata only (see `PermutationData.stream`).
        train_total: rows of a streamed training table.
        train_fragments: the training table's rows as an engine writes them itself (see
            `PermutationData.fragments`; the folds table's are ``validation.fragments``).
    """

    validation: PermutationData
    train: pa.Table
    train_ranges: tuple[tuple[int, int], ...]
    small_classes: dict[str, int]
    train_stream: Callable[[], Iterator[pa.RecordBatch]] | None = None
    train_total: int | None = None
    train_fragments: FragmentWrite | None = None

    @property
    def train_num_rows(self) -> int:
        return self.train.num_rows if self.train_total is None else self.train_total

    def train_persistable(self, metadata: Mapping[bytes, bytes]) -> pa.Table | pa.RecordBatchReader:
        """The training table's rows to write, ``metadata`` added (streamed when built so)."""
        schema_metadata = {**(self.train.schema.metadata or {}), **metadata}
        if self.train_stream is None:
            return self.train.replace_schema_metadata(schema_metadata)
        schema = self.train.schema.with_metadata(schema_metadata)
        return pa.RecordBatchReader.from_batches(schema, self.train_stream())

    def train_schema(self, metadata: Mapping[bytes, bytes]) -> pa.Schema:
        """The training table's schema with ``metadata`` added, as `train_persistable`'s."""
        return self.train.schema.with_metadata({**(self.train.schema.metadata or {}), **metadata})

    @property
    def k(self) -> int:
        return len(self.validation.split_names)

    def train_rows(self) -> dict[str, int]:
        """Training rows per fold name."""
        return {
            name: rows
            for name, (_, rows) in zip(self.validation.split_names, self.train_ranges, strict=True)
        }

    def with_train_table(self, name: str, version: int) -> pa.Table:
        """The folds table with the persisted training table's name, version and ranges."""
        data = self.validation.data
        metadata = dict(data.schema.metadata or {})
        metadata[TRAIN_TABLE_KEY.encode()] = name.encode()
        metadata[TRAIN_VERSION_KEY.encode()] = str(version).encode()
        metadata[TRAIN_RANGES_KEY.encode()] = json.dumps(self.train_ranges).encode()
        return data.replace_schema_metadata(metadata)


def build_folds(table: Table, spec: FoldsSpec, *, asset: str) -> FoldsData:
    """Assign the filtered rows of ``table`` to folds as ``spec`` says (seeds resolved)."""
    folds = spec.folds
    if isinstance(folds, StratifiedKFold | GroupKFold):
        role = "stratify" if isinstance(folds, StratifiedKFold) else "group"
        check_scalar_columns(table, key_columns(folds), role=role, asset=asset)
    scanned = scan_columns(table, spec.filter, key_columns(folds), asset=asset)
    n = scanned.num_rows
    if n == 0:
        raise SpecError(
            f"asset '{asset}': filter {spec.filter!r} selects no rows of table '{table.name}' "
            f"(version {table.version}); loosen the filter"
        )
    small: dict[str, int] = {}
    try:
        if isinstance(folds, TimeSeriesFolds):
            validation, train, ranges = _time_series(scanned, folds, spec, table.version)
            rows = np.bincount(
                validation.column("split_id").to_numpy().astype(np.intp), minlength=folds.k
            )
        else:
            fold_ids = _fold_ids(scanned, folds).astype(np.min_scalar_type(folds.k))
            if isinstance(folds, StratifiedKFold):
                small = _small_classes(scanned.columns[folds.label], folds.k)
            rows = np.bincount(fold_ids, minlength=folds.k)
            order = read_order(fold_ids, spec.shuffle)
            # Fold after fold: the ids of the table in this order are runs, not a gather.
            validation = permutation_table(
                scanned.row_ids[order],
                np.repeat(np.arange(folds.k, dtype=np.uint64), rows),
                base_version=table.version,
            )
            train, ranges = None, ()
    except ValueError as exc:
        raise SpecError(f"asset '{asset}', table '{table.name}': {exc}") from exc

    names = spec.split_names()
    empty = [name for name, r in zip(names, rows.tolist(), strict=True) if r == 0]
    if empty:
        raise SpecError(
            f"asset '{asset}': fold(s) {empty} would be empty ({n} rows for k={folds.k}); "
            "use fewer folds or loosen the filter"
        )
    if train is None:
        train, ranges = _rotated(validation, rows)
    validation, train = (
        _of_kind(
            with_permutation_metadata(data, base_table=table.name, split_names=s, spec=spec), kind
        )
        for data, s, kind in ((validation, names, FOLDS_KIND), (train, [TRAIN_SPLIT], TRAIN_KIND))
    )
    return FoldsData(
        validation=PermutationData(
            data=validation,
            base_table=table.name,
            base_version=table.version,
            split_names=tuple(names),
            split_rows=tuple(int(r) for r in rows),
            spec=spec,
            filtered_rows=n,
        ),
        train=train,
        train_ranges=tuple(ranges),
        small_classes=small,
    )


def _rotated(validation: pa.Table, rows: np.ndarray) -> tuple[pa.Table, list[tuple[int, int]]]:
    """The training sequence of k-fold kinds: folds 1..k-1 then 0..k-2 (zero-copy slices).

    Fold ``i`` is stored at ``starts[i]``; its complement starts with fold ``i + 1``, at
    ``starts[i + 1] - rows[0]`` in the sequence, and runs ``n - rows[i]`` rows.
    """
    n = validation.num_rows
    starts = np.r_[0, np.cumsum(rows)]
    ids = validation.column("row_id")
    head, tail = ids.slice(int(rows[0])), ids.slice(0, n - int(rows[-1]))
    row_ids = pa.chunked_array(head.chunks + tail.chunks, type=pa.uint64())
    train = pa.table(
        {"row_id": row_ids, "split_id": _zeros(len(row_ids))},
        schema=validation.schema,
    )
    ranges = [(int(starts[i + 1] - rows[0]), int(n - rows[i])) for i in range(rows.size)]
    return train, ranges


def _zeros(length: int, chunk: int = 1 << 20) -> pa.ChunkedArray:
    """``length`` uint64 zeros as slices of one shared chunk (split ids of a one-split table)."""
    zeros = pa.array(np.zeros(min(length, chunk), dtype=np.uint64))
    full, rest = divmod(length, chunk)
    chunks = [zeros] * full + ([zeros.slice(0, rest)] if rest else [])
    return pa.chunked_array(chunks, type=pa.uint64())


def _fold_ids(scanned: Scanned, folds: KFold | StratifiedKFold | GroupKFold) -> np.ndarray:
    seed = folds.seed if folds.seed is not None else 0  # unused when shuffle is off
    if isinstance(folds, StratifiedKFold):
        with warnings.catch_warnings():
            # Small classes are counted by the caller, logged and recorded as metadata.
            warnings.simplefilter("ignore", UserWarning)
            return assign.stratified_kfold(
                scanned.codes(folds.label),
                folds.k,
                seed=seed,
                shuffle=folds.shuffle,
                on_small_class=folds.on_small_class,
            )
    if isinstance(folds, GroupKFold):
        return assign.group_kfold(
            scanned.codes(folds.group), folds.k, seed=seed, shuffle=folds.shuffle
        )
    return assign.kfold(scanned.num_rows, folds.k, seed=seed, shuffle=folds.shuffle)


def _time_series(
    scanned: Scanned, folds: TimeSeriesFolds, spec: FoldsSpec, base_version: int
) -> tuple[pa.Table, pa.Table, list[tuple[int, int]]]:
    """Validation folds, the training sequence and each fold's training range in it.

    Without a shuffle the sequence is the time order and fold ``i`` trains on a prefix (or a
    window) of it. A shuffle must not move a later row into an earlier range, and one shared
    sequence could only be shuffled within blocks (oldest block first); so each fold's training
    set is stored shuffled on its own instead, one after another.
    """
    result = assign.time_series_folds(
        scanned.orderable(folds.column),
        folds.k,
        gap=folds.gap,
        test_size=folds.test_size,
        max_train_size=folds.max_train_size,
    )
    tests = [fold.test() for fold in result]
    if spec.shuffle is not None:
        tests = [_shuffled(pos, spec) for pos in tests]
    positions = np.concatenate(tests)
    fold_ids = np.repeat(np.arange(len(tests), dtype=np.uint64), [t.size for t in tests])
    validation = permutation_table(scanned.row_ids[positions], fold_ids, base_version=base_version)

    if spec.shuffle is None:
        sequence = result[0].order[: max(fold.train_end for fold in result)]
        ranges = [(f.train_start, f.train_end - f.train_start) for f in result]
    else:
        parts = [_shuffled(fold.train(), spec) for fold in result]
        sequence = np.concatenate(parts)
        starts = np.r_[0, np.cumsum([p.size for p in parts])]
        ranges = [(int(starts[i]), int(p.size)) for i, p in enumerate(parts)]
    train = permutation_table(
        scanned.row_ids[sequence],
        np.zeros(sequence.size, dtype=np.uint64),
        base_version=base_version,
    )
    return validation, train, ranges


def _shuffled(positions: np.ndarray, spec: FoldsSpec) -> np.ndarray:
    return positions[read_order(np.zeros(positions.size, dtype=np.uint8), spec.shuffle)]


def _small_classes(labels: pa.Array, k: int) -> dict[str, int]:
    counts = labels.value_counts()
    values = counts.field("values").to_pylist()
    sizes = counts.field("counts").to_pylist()
    return {str(v): int(c) for v, c in zip(values, sizes, strict=True) if c < k}


def _of_kind(data: pa.Table, kind: str) -> pa.Table:
    metadata = dict(data.schema.metadata or {})
    metadata[KIND_META_KEY.encode()] = kind.encode()
    return data.replace_schema_metadata(metadata)


def fold_index(fold: str | int, k: int, *, asset: str) -> int:
    """Index of ``fold`` (``'fold_3'``, ``'3'`` or ``3``), or a SpecError listing the folds."""
    names = [f"fold_{i}" for i in range(k)]
    if isinstance(fold, str):
        if fold in names:
            return names.index(fold)
        if fold.isdigit() and int(fold) < k:
            return int(fold)
    elif 0 <= fold < k:
        return fold
    raise SpecError(
        f"fold {fold!r} is not in folds asset '{asset}' (folds: {json.dumps(names)[1:-1]})"
    )
