"""Specs → permutation tables.

Split kinds lancedb's builder has (random, sequential, hash, calculated) and its shuffle run in
lancedb. The leakage-safe kinds it lacks (stratified, group, time) are assigned in numpy
(`perm_assets.assign`) over a scan of the row ids and the one or two columns they need, never
the rest of the table. The result stays columnar: two uint64 columns (``row_id``, ``split_id``)
in Arrow, checked with numpy (split sizes, range of split ids) and handed to the IO manager.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from lancedb.permutation import PermutationBuilder, permutation_builder
from lancedb.table import Table

from perm_assets import assign
from perm_assets.errors import SpecError
from perm_assets.specs import (
    CUSTOM_SPLITS,
    CalculatedSplit,
    FoldsSpec,
    GroupSplit,
    HashSplit,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    Shuffle,
    StratifiedSplit,
    TimeSplit,
)
from perm_assets.tables import (
    BASE_TABLE_KEY,
    BASE_VERSION_KEY,
    SPEC_KEY,
    SPLIT_NAMES_KEY,
    read_all,
)


@dataclass(frozen=True)
class PermutationData:
    """A permutation table in memory, ready to persist: which rows of which table version.

    Attributes:
        data: ``row_id: uint64, split_id: uint64`` in read order, with schema metadata
            ``split_names`` (JSON), ``base_version`` and ``perm_assets.base_table``.
        base_table: name of the LanceDB table the row ids point into.
        base_version: the Lance version of ``base_table`` they point into.
        split_names: name of each split, in split-id order.
        split_rows: number of rows in each split, in split-id order.
        spec: the resolved spec (seeds filled in), or None when built outside this project.
    """

    data: pa.Table
    base_table: str
    base_version: int
    split_names: tuple[str, ...]
    split_rows: tuple[int, ...]
    spec: PermutationSpec | FoldsSpec | None = None
    filtered_rows: int | None = None

    @property
    def num_rows(self) -> int:
        return self.data.num_rows

    def rows_by_split(self) -> dict[str, int]:
        return dict(zip(self.split_names, self.split_rows, strict=True))


def build_permutation(table: Table, spec: PermutationSpec, *, asset: str) -> PermutationData:
    """Run lancedb's permutation builder for ``spec`` over ``table`` at its current version.

    Seeds must already be resolved (``spec.resolve_seeds()``) so that the recorded spec
    reproduces the rows. Raises SpecError naming ``asset`` when the filter is invalid or
    selects nothing, or when the split would silently lose or misplace rows.
    """
    expected = _count_filtered(table, spec.filter, asset=asset)
    if expected == 0:
        raise SpecError(
            f"asset '{asset}': filter {spec.filter!r} selects no rows of table '{table.name}' "
            f"(version {table.version}, {table.count_rows()} rows); loosen the filter"
        )
    if isinstance(spec.split, CUSTOM_SPLITS):
        result = _build_assigned(table, spec, asset=asset)
    else:
        builder = _configure(permutation_builder(table), spec)
        try:
            result = read_all(builder.execute())
        except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
            raise SpecError(
                f"asset '{asset}': lancedb could not build the permutation of table "
                f"'{table.name}' with {spec.model_dump_json(exclude_none=True)}: {exc}"
            ) from exc
    names = spec.split_names()
    rows = _split_rows(result, len(names), spec=spec, asset=asset)
    _check_coverage(spec, kept=int(rows.sum()), expected=expected, asset=asset)
    return PermutationData(
        data=with_permutation_metadata(result, base_table=table.name, split_names=names, spec=spec),
        base_table=table.name,
        base_version=int(result.schema.metadata[BASE_VERSION_KEY.encode()]),
        split_names=tuple(names),
        split_rows=tuple(int(r) for r in rows),
        spec=spec,
        filtered_rows=expected,
    )


def with_permutation_metadata(
    data: pa.Table,
    *,
    base_table: str,
    split_names: Sequence[str],
    spec: PermutationSpec | FoldsSpec | None,
) -> pa.Table:
    """``data`` with the schema metadata that makes it self-describing once persisted."""
    metadata = dict(data.schema.metadata or {})
    metadata[SPLIT_NAMES_KEY.encode()] = json.dumps(list(split_names)).encode()
    metadata[BASE_TABLE_KEY.encode()] = base_table.encode()
    if spec is not None:
        metadata[SPEC_KEY.encode()] = spec.model_dump_json().encode()
    return data.replace_schema_metadata(metadata)


def split_rows_of(data: pa.Table, num_splits: int) -> np.ndarray:
    """Rows per split id, ``num_splits`` entries.

    Counted chunk by chunk on zero-copy views of the uint64 column: no concatenated copy of a
    10M-row column. Raises ValueError naming the first split id outside ``0..num_splits-1``
    (checked before counting, so a stray huge id never sizes an array).
    """
    rows = np.zeros(num_splits, dtype=np.int64)
    for chunk in data.column("split_id").chunks:
        if len(chunk) == 0:
            continue
        ids = chunk.to_numpy(zero_copy_only=chunk.null_count == 0)
        largest = int(ids.max())
        if largest >= num_splits:
            raise ValueError(f"split id {largest} is outside 0..{num_splits - 1}")
        rows += np.bincount(ids.view(np.int64), minlength=num_splits)
    return rows


def _configure(builder: PermutationBuilder, spec: PermutationSpec) -> PermutationBuilder:
    if spec.filter is not None:
        builder = builder.filter(spec.filter)
    split = spec.split
    names = spec.split_names()
    if isinstance(split, RandomSplit):
        ratios, counts = split.builder_sizes()
        builder = builder.split_random(
            ratios=ratios,
            counts=counts,
            seed=split.seed,
            clump_size=split.clump_size,
            split_names=names,
        )
    elif isinstance(split, SequentialSplit):
        ratios, counts = split.builder_sizes()
        builder = builder.split_sequential(ratios=ratios, counts=counts, split_names=names)
    elif isinstance(split, HashSplit):
        builder = builder.split_hash(
            split.columns,
            split.weights,
            discard_weight=split.discard_weight,
            split_names=names,
        )
    elif isinstance(split, CalculatedSplit):
        builder = builder.split_calculated(split.expression, split_names=names)
    if spec.shuffle is not None:
        builder = builder.shuffle(seed=spec.shuffle.seed, clump_size=spec.shuffle.clump_size)
    return builder


def _count_filtered(table: Table, filter: str | None, *, asset: str) -> int:
    try:
        return table.count_rows(filter)
    except (ValueError, RuntimeError) as exc:
        raise SpecError(
            f"asset '{asset}': filter {filter!r} is not valid on table '{table.name}' "
            f"(columns: {', '.join(table.schema.names)}): {exc}"
        ) from exc


def _split_rows(data: pa.Table, num_splits: int, *, spec: PermutationSpec, asset: str):
    try:
        rows = split_rows_of(data, num_splits)
    except ValueError as exc:
        raise SpecError(
            f"asset '{asset}': {exc}, but only {num_splits} splits ({spec.split_names()}) are "
            "declared; fix the expression or declare more splits"
        ) from exc
    sizes = dict(zip(spec.split_names(), rows.tolist(), strict=True))
    empty = [name for name, count in sizes.items() if count == 0]
    if empty:
        raise SpecError(
            f"asset '{asset}': split(s) {empty} would be empty (rows per split: {sizes}); "
            "use larger ratios or fewer splits, or loosen the filter"
        )
    return rows


def _check_coverage(spec: PermutationSpec, *, kept: int, expected: int, asset: str) -> None:
    """Every filtered row must be in a split unless the spec asked for rows to be dropped."""
    split = spec.split
    drops = (
        isinstance(split, RandomSplit | SequentialSplit) and (split.counts or split.allow_discard)
    ) or (isinstance(split, HashSplit) and split.discard_weight > 0)
    if drops:
        return
    if kept != expected:
        raise SpecError(
            f"asset '{asset}': the permutation holds {kept} rows but the filter selects "
            f"{expected}; {expected - kept} rows would be lost silently"
        )


# ------------------------------------------------------------------ splits lancedb lacks
def _build_assigned(table: Table, spec: PermutationSpec, *, asset: str) -> pa.Table:
    """A stratified, group or time split of the filtered rows, assigned in numpy."""
    split = spec.split
    assert isinstance(split, CUSTOM_SPLITS)
    scanned = scan_columns(table, spec.filter, _needed_columns(split), asset=asset)
    try:
        split_ids = _assign(split, scanned)
    except ValueError as exc:
        raise SpecError(f"asset '{asset}', table '{table.name}': {exc}") from exc
    order = read_order(split_ids, spec.shuffle)
    return permutation_table(scanned.row_ids[order], split_ids[order], base_version=table.version)


def _needed_columns(split: StratifiedSplit | GroupSplit | TimeSplit) -> list[str]:
    if isinstance(split, StratifiedSplit):
        return [split.label]
    if isinstance(split, GroupSplit):
        return [split.group] if split.label is None else [split.label, split.group]
    return [split.column]


def _assign(split: StratifiedSplit | GroupSplit | TimeSplit, scanned: Scanned) -> np.ndarray:
    if isinstance(split, StratifiedSplit):
        assert split.seed is not None  # seeds are resolved before building
        return assign.stratified_split(scanned.codes(split.label), split.ratios, split.seed)
    if isinstance(split, GroupSplit):
        assert split.seed is not None
        groups = scanned.codes(split.group)
        if split.label is None:
            return assign.group_split(groups, split.ratios, split.seed)
        labels = scanned.codes(split.label)
        return assign.stratified_group_split(labels, groups, split.ratios, split.seed)
    return assign.time_split(scanned.orderable(split.column), split.ratios)


@dataclass(frozen=True)
class Scanned:
    """Row ids of the filtered rows (table order) and the few columns a split needs."""

    row_ids: np.ndarray
    columns: dict[str, pa.Array]

    @property
    def num_rows(self) -> int:
        return int(self.row_ids.size)

    def codes(self, column: str) -> np.ndarray:
        """Values as numbers: integers as they are, anything else dictionary-encoded."""
        values = self.columns[column]
        if pa.types.is_integer(values.type):
            return values.to_numpy()
        return values.dictionary_encode().indices.to_numpy()

    def orderable(self, column: str) -> np.ndarray:
        """Values of a column compared by order (numbers, dates, timestamps)."""
        values = self.columns[column]
        kind = values.type
        if not (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind)
        ):
            raise ValueError(
                f"column '{column}' has type {kind}, which has no time order; use a number, "
                "date or timestamp column"
            )
        return values.to_numpy()


def scan_columns(table: Table, filter: str | None, columns: list[str], *, asset: str) -> Scanned:
    """Row ids and ``columns`` of the rows ``filter`` selects, in table order.

    Only these columns are read. Raises SpecError listing the table's columns when one is
    missing, and counting the nulls (with the filter that drops them) when one has nulls.
    """
    available = table.schema.names
    missing = [c for c in columns if c not in available]
    if missing:
        raise SpecError(
            f"asset '{asset}': column(s) {missing} are not in table '{table.name}' (columns: "
            f"{', '.join(available)})"
        )
    query = table.search().select(list(dict.fromkeys(columns))).with_row_id(True)
    if filter is not None:
        query = query.where(filter)
    data = read_all(query)
    scanned = Scanned(
        row_ids=data.column("_rowid").to_numpy(),
        columns={c: data.column(c).combine_chunks() for c in columns},
    )
    for column, values in scanned.columns.items():
        if values.null_count:
            where = f" among the rows of filter {filter!r}" if filter else ""
            raise SpecError(
                f"asset '{asset}': column '{column}' of table '{table.name}' has "
                f"{values.null_count} null value(s){where} out of {scanned.num_rows}; a row "
                f"with no {column} cannot be placed safely. Drop them with filter "
                f'"{column} IS NOT NULL" (combined with AND)'
            )
    return scanned


def read_order(split_ids: np.ndarray, shuffle: Shuffle | None) -> np.ndarray:
    """Positions sorted by split, then by table order or by a seeded shuffle.

    With ``clump_size`` the shuffle moves runs of that many consecutive rows (in table order)
    together, as lancedb's clumped shuffle does: fewer, larger reads, less random order.
    """
    n = split_ids.size
    # Split ids are small: a stable sort of them as uint8 is a radix sort (10M rows: ~50 ms).
    splits = split_ids.astype(np.uint8) if split_ids.size and split_ids.max() < 256 else split_ids
    if shuffle is None:
        return np.argsort(splits, kind="stable")
    assert shuffle.seed is not None  # seeds are resolved before building
    rng = np.random.default_rng(shuffle.seed)
    if shuffle.clump_size is None or shuffle.clump_size == 1:
        shuffled = rng.permutation(n)
    else:
        clumps = -(-n // shuffle.clump_size)
        key = rng.permutation(clumps)[np.arange(n) // shuffle.clump_size]
        # Stable: rows of one clump stay together, in table order.
        shuffled = np.argsort(key, kind="stable")
    # Group by split keeping the shuffled order within each split.
    return shuffled[np.argsort(splits[shuffled], kind="stable")]


def permutation_table(row_ids: np.ndarray, split_ids: np.ndarray, *, base_version: int) -> pa.Table:
    """A permutation table as lancedb's builder makes it: ``row_id``, ``split_id`` (uint64)."""
    schema = pa.schema(
        [pa.field("row_id", pa.uint64()), pa.field("split_id", pa.uint64(), nullable=False)],
        metadata={BASE_VERSION_KEY: str(base_version)},
    )
    return pa.table(
        [
            pa.array(row_ids.astype(np.uint64, copy=False)),
            pa.array(split_ids.astype(np.uint64, copy=False)),
        ],
        schema=schema,
    )
