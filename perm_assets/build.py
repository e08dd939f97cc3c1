"""Specs → permutation tables.

Split kinds lancedb's builder has (random, sequential, hash, calculated) and its shuffle run in
lancedb. The leakage-safe kinds it lacks (stratified, group, time) are assigned in numpy
(`perm_assets.assign`) over a scan of the row ids and the one or two columns they need, never
the rest of the table. The result stays columnar: two uint64 columns (``row_id``, ``split_id``)
in Arrow, checked with numpy (split sizes, range of split ids) and handed to the IO manager.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
    FragmentWrite,
    read_all,
    where,
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
        stream: set by out-of-core engines (`perm_assets.engines`): the rows, batch by batch
            in read order, each time it is called; ``data`` then holds the schema and its
            metadata only (no rows), and the rows are never all in memory.
        algorithm: the engine's assignment algorithm when it is not lancedb's builder (part of
            the data version: other rows for the same spec).
        fragments: set by an engine that writes the rows itself (the Ray engine, on its
            workers): the IO manager commits what it writes (`commit_fragments`) instead of
            writing ``stream``, which stays for whatever reads the rows in this process first
            (the split report's label counts).
    """

    data: pa.Table
    base_table: str
    base_version: int
    split_names: tuple[str, ...]
    split_rows: tuple[int, ...]
    spec: PermutationSpec | FoldsSpec | None = None
    filtered_rows: int | None = None
    stream: Callable[[], Iterator[pa.RecordBatch]] | None = None
    algorithm: str | None = None
    fragments: FragmentWrite | None = None

    @property
    def num_rows(self) -> int:
        return sum(self.split_rows) if self.stream is not None else self.data.num_rows

    def persistable(self, metadata: Mapping[bytes, bytes]) -> pa.Table | pa.RecordBatchReader:
        """The rows to write, with ``metadata`` added to the schema's: the table, or for a
        streamed permutation a reader over its stream (written batch by batch)."""
        schema_metadata = {**(self.data.schema.metadata or {}), **metadata}
        if self.stream is None:
            return self.data.replace_schema_metadata(schema_metadata)
        schema = self.data.schema.with_metadata(schema_metadata)
        return pa.RecordBatchReader.from_batches(schema, self.stream())

    def schema_with(self, metadata: Mapping[bytes, bytes]) -> pa.Schema:
        """The table's schema with ``metadata`` added to its own, as `persistable` writes it."""
        return self.data.schema.with_metadata({**(self.data.schema.metadata or {}), **metadata})

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
    _check_key_columns(table, spec, expected=expected, asset=asset)
    if isinstance(spec.split, CUSTOM_SPLITS):
        result = _build_assigned(table, spec, asset=asset)
    elif _builder_panics_on(table):
        result = _build_without_builder(table, spec, asset=asset)
    else:
        builder = _configure(permutation_builder(table), spec)
        try:
            result = read_all(builder.execute())
        except Exception as exc:  # RustPanic included: never a raw panic to the user
            raise SpecError(
                f"asset '{asset}': lancedb could not build the permutation of table "
                f"'{table.name}' with {spec.model_dump_json(exclude_none=True)}: "
                f"{type(exc).__name__}: {exc}. Check the spec against the table's columns; "
                "a lancedb panic ('rust future panicked') is a lancedb bug: report it with this "
                "spec"
            ) from exc
    # lancedb's calculated split stores split_id as int64: such a table is no permutation
    # table to lancedb's reader (a consumer asking split 0 got the table itself as data).
    result = _uint64_split_ids(result, spec, asset=asset)
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


def require_columns(table: Table, columns: list[str], *, role: str, asset: str) -> None:
    """SpecError listing the table's columns when one of ``columns`` is not among them."""
    available = table.schema.names
    missing = [c for c in columns if c not in available]
    if missing:
        raise SpecError(
            f"asset '{asset}': {role}column(s) {missing} are not in table '{table.name}' "
            f"(columns: {', '.join(available)})"
        )


def check_scalar_columns(table: Table, columns: list[str], *, role: str, asset: str) -> None:
    """Columns a split hashes, stratifies or groups by must exist and hold one scalar per row
    (a vector or list has no hash or class here: lancedb and Arrow fail with raw errors)."""
    require_columns(table, columns, role=f"{role} ", asset=asset)
    for column in columns:
        kind = table.schema.field(column).type
        if pa.types.is_nested(kind):
            raise SpecError(
                f"asset '{asset}': {role} column '{column}' of table '{table.name}' has type "
                f"{kind}, which has no single value per row to {role} by; use an integer, "
                "string, boolean, date or timestamp column"
            )


def _check_key_columns(table: Table, spec: PermutationSpec, *, expected: int, asset: str) -> None:
    """Types (and, for hash splits, nulls) of the columns a split reads, before any build."""
    split = spec.split
    if isinstance(split, HashSplit):
        check_scalar_columns(table, split.columns, role="hash", asset=asset)
        for column in split.columns:
            # Quoted: a column named "user id" or "user-id" is not SQL as it stands.
            condition = f"`{column.replace('`', '``')}` IS NULL"
            if spec.filter is not None:
                condition = f"({spec.filter}\n) AND {condition}"
            try:
                nulls = table.count_rows(condition)
            except (ValueError, RuntimeError) as exc:
                raise SpecError(
                    f"asset '{asset}': could not count the nulls of hash column '{column}' of "
                    f"table '{table.name}': {exc}"
                ) from exc
            if nulls:
                # lancedb hashes every null to one value: all of them would land in one split.
                raise SpecError(
                    f"asset '{asset}': hash column '{column}' of table '{table.name}' has "
                    f"{nulls} null value(s) among the {expected} selected rows; they would all "
                    f'land in one split. Drop them with filter "{column} IS NOT NULL" (combined '
                    "with AND) or hash another column"
                )
    elif isinstance(split, StratifiedSplit):
        check_scalar_columns(table, [split.label], role="stratify", asset=asset)
    elif isinstance(split, GroupSplit):
        check_scalar_columns(table, [split.group], role="group", asset=asset)
        if split.label is not None:
            check_scalar_columns(table, [split.label], role="stratify", asset=asset)
    clump = split.clump_size if isinstance(split, RandomSplit) else None
    clump = clump or (spec.shuffle.clump_size if spec.shuffle is not None else None)
    if clump is not None and clump > expected:
        raise SpecError(
            f"asset '{asset}': clump_size {clump} is larger than the {expected} selected rows, so "
            "the whole selection would move as one clump (no randomness at all); use a "
            f"clump_size below {expected}"
        )


def _uint64_split_ids(data: pa.Table, spec: PermutationSpec, *, asset: str) -> pa.Table:
    """``data`` with ``split_id`` as uint64, the type lancedb's reader requires.

    lancedb's calculated split stores whatever type the expression gives (int64 for
    ``id % 2``, int32 for a ``CAST(... AS INT)``, floats, strings): refuse anything that is not
    a whole number for every row, before any count or write.
    """
    index = data.schema.get_field_index("split_id")
    field = data.schema.field(index)
    if pa.types.is_uint64(field.type):
        return data
    column = data.column(index)
    what = (
        f"calculated split expression {spec.split.expression!r}"
        if isinstance(spec.split, CalculatedSplit)
        else "the split"
    )
    if not pa.types.is_integer(field.type) or column.null_count:
        nulls = f" with {column.null_count} null(s)" if column.null_count else ""
        raise SpecError(
            f"asset '{asset}': {what} gives {field.type}{nulls}; it must give a whole number, "
            "the split index 0, 1, ..., for every row (e.g. 'id % 3', or CAST(... AS BIGINT); "
            "add 'IS NOT NULL' conditions to the filter for nulls)"
        )
    lowest = pc.min(column).as_py()  # pyright: ignore[reportAttributeAccessIssue]
    if lowest is not None and lowest < 0:
        raise SpecError(
            f"asset '{asset}': {what} gives split index {lowest}, below 0; declared splits are "
            f"0..{len(spec.split_names()) - 1}"
        )
    return data.set_column(index, field.with_type(pa.uint64()), column.cast(pa.uint64()))


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
        builder = builder.filter(cast(str, where(spec.filter)))
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
        builder = builder.split_calculated(cast(str, where(split.expression)), split_names=names)
    if spec.shuffle is not None:
        builder = builder.shuffle(seed=spec.shuffle.seed, clump_size=spec.shuffle.clump_size)
    return builder


def _count_filtered(table: Table, filter: str | None, *, asset: str) -> int:
    try:
        return table.count_rows(where(filter))
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


# ----------------------------------------------- lancedb's kinds without lancedb's builder
def _builder_panics_on(table: Table) -> bool:
    """Whether lancedb 0.40's builder would panic: any schema-level metadata on the base table
    (pandas writes some) makes it call ``RecordBatch.with_schema(...).unwrap()`` on batches
    that still carry that metadata (``SchemaError: target schema is not superset``). Only its
    hash assignment survives (`_hash_then_shuffle` uses it)."""
    # Every kind lancedb builds is routed (a hash split too, to keep one order).
    return bool(table.schema.metadata)


def _build_without_builder(table: Table, spec: PermutationSpec, *, asset: str) -> pa.Table:
    """A none, random, sequential, calculated or hash split, and its shuffle, in numpy.

    Replaces lancedb's builder only where it panics (`_builder_panics_on`): the assignment is
    this project's (seeded numpy), so a table with schema metadata gets other rows than the same
    seed gives through lancedb on a table without; both are deterministic for their table.
    Random sizes follow `assign.apportion` (each split within 1 row of its share).
    """
    split = spec.split
    if isinstance(split, HashSplit):  # lancedb's hash assignment survives; this project orders
        return _hash_then_shuffle(table, spec, asset=asset)
    if isinstance(split, CalculatedSplit):
        row_ids, split_ids = _scan_expression(table, spec.filter, split.expression, asset=asset)
    else:
        row_ids = scan_columns(table, spec.filter, [], asset=asset).row_ids
        n = int(row_ids.size)
        if isinstance(split, RandomSplit | SequentialSplit):
            split_ids = _sized_assignment(split, n, asset=asset)
        else:
            split_ids = np.zeros(n, dtype=np.int64)
    kept = split_ids >= 0
    if not kept.all():
        row_ids, split_ids = row_ids[kept], split_ids[kept]
    order = read_order(split_ids, spec.shuffle)
    return permutation_table(row_ids[order], split_ids[order], base_version=table.version)


def split_sizes(split: RandomSplit | SequentialSplit, n: int, *, asset: str) -> np.ndarray:
    """Rows of each split of ``n`` selected rows: the counts asked, or the ratios apportioned
    (within 1 row of each share; a remainder below 1 is left out)."""
    ratios, counts = split.builder_sizes()
    if counts is not None:
        if sum(counts) > n:
            raise SpecError(
                f"asset '{asset}': counts {counts} ask for {sum(counts)} rows but the filter "
                f"selects {n}; lower the counts or loosen the filter"
            )
        return np.asarray(counts, dtype=np.int64)
    assert ratios is not None
    left_out = 1.0 - math.fsum(ratios)
    with_rest = [*ratios, left_out] if left_out > 1e-9 else list(ratios)
    return assign.apportion(n, with_rest)[: len(ratios)]


def _sized_assignment(split: RandomSplit | SequentialSplit, n: int, *, asset: str) -> np.ndarray:
    """Split id per row in table order; -1 for rows the spec leaves out (counts, discard)."""
    sizes = split_sizes(split, n, asset=asset)
    ends = np.cumsum(sizes)
    # Position p of the assignment order goes to the split whose range holds p.
    by_position = np.full(n, -1, dtype=np.int64)
    by_position[: int(ends[-1])] = np.repeat(np.arange(len(sizes)), sizes)
    if isinstance(split, SequentialSplit):
        return by_position
    assert split.seed is not None  # seeds are resolved before building
    rng = np.random.default_rng(split.seed)
    if split.clump_size is None or split.clump_size == 1:
        order = rng.permutation(n)
    else:  # runs of clump_size consecutive rows stay together, as lancedb's clumps
        clumps = -(-n // split.clump_size)
        key = rng.permutation(clumps)[np.arange(n) // split.clump_size]
        order = np.argsort(key, kind="stable")
    split_ids = np.empty(n, dtype=np.int64)
    split_ids[order] = by_position
    return split_ids


def _scan_expression(
    table: Table, filter: str | None, expression: str, *, asset: str
) -> tuple[np.ndarray, np.ndarray]:
    """``[row ids, values of expression]`` of the filtered rows, in table order."""
    query = table.search().select({"split": cast(str, where(expression))}).with_row_id(True)
    if filter is not None:
        query = query.where(cast(str, where(filter)))
    try:
        data = read_all(query)
    except Exception as exc:
        raise SpecError(
            f"asset '{asset}': calculated split expression {expression!r} is not valid on table "
            f"'{table.name}' (columns: {', '.join(table.schema.names)}): {exc}"
        ) from exc
    values = data.column("split")
    if not pa.types.is_integer(values.type) or values.null_count:
        raise SpecError(
            f"asset '{asset}': calculated split expression {expression!r} gives "
            f"{values.type}{' with nulls' if values.null_count else ''}; it must give a whole "
            "number (the split index) for every row"
        )
    return data.column("_rowid").to_numpy(), values.to_numpy().astype(np.int64)


def _hash_then_shuffle(table: Table, spec: PermutationSpec, *, asset: str) -> pa.Table:
    """lancedb's hash assignment (it survives schema metadata) with this project's shuffle."""
    builder = _configure(permutation_builder(table), spec.model_copy(update={"shuffle": None}))
    try:
        hashed = read_all(builder.execute())
    except Exception as exc:
        raise SpecError(
            f"asset '{asset}': lancedb could not hash-split table '{table.name}': "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    # The builder emits the kept rows in table order (row address order) within each split.
    row_ids = hashed.column("row_id").to_numpy()
    split_ids = hashed.column("split_id").to_numpy().astype(np.int64)
    back = np.argsort(row_ids, kind="stable")
    row_ids, split_ids = row_ids[back], split_ids[back]
    order = read_order(split_ids, spec.shuffle)
    return permutation_table(row_ids[order], split_ids[order], base_version=table.version)


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
        out = values.to_numpy()
        if pa.types.is_floating(kind) and (nans := int(np.count_nonzero(np.isnan(out)))):
            raise ValueError(
                f"column '{column}' has {nans} NaN value(s) among {out.size} rows, which have "
                f'no time order; filter them out first, e.g. filter="NOT isnan({column})" '
                "(IS NOT NULL keeps NaN, which SQL does not count as null)"
            )
        return out


def scan_columns(table: Table, filter: str | None, columns: list[str], *, asset: str) -> Scanned:
    """Row ids and ``columns`` of the rows ``filter`` selects, in table order.

    Only these columns are read. Raises SpecError listing the table's columns when one is
    missing, and counting the nulls (with the filter that drops them) when one has nulls.
    """
    require_columns(table, columns, role="", asset=asset)
    # lancedb's select([]) reads every column: ask for the row ids alone instead.
    selected = list(dict.fromkeys(columns)) or ["_rowid"]
    query = table.search().select(selected).with_row_id(True)
    if filter is not None:
        query = query.where(cast(str, where(filter)))
    data = read_all(query)
    scanned = Scanned(
        row_ids=data.column("_rowid").to_numpy(),
        columns={c: data.column(c).combine_chunks() for c in columns},
    )
    for column, values in scanned.columns.items():
        if values.null_count:
            among = f" among the rows of filter {filter!r}" if filter else ""
            raise SpecError(
                f"asset '{asset}': column '{column}' of table '{table.name}' has "
                f"{values.null_count} null value(s){among} out of {scanned.num_rows}; a row "
                f"with no {column} cannot be placed safely. Drop them with filter "
                f'"{column} IS NOT NULL" (combined with AND)'
            )
    return scanned


def positions_in(scanned_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index into ``scanned_ids`` of each wanted id (a row id outside the scan is an error).

    Row addresses (fragment << 32 | offset) of an ascending scan are joined through a lookup
    table over their address range: O(rows), no sort (10M rows: ~0.3 s against ~4 s sorted).
    Sparse or unsorted ids fall back to sorting the needles for a cache-local binary search.
    """
    if wanted.size == 0:
        return np.zeros(0, dtype=np.intp)
    missing = ValueError("the permutation holds row ids that the filter does not select")
    increasing = bool(np.all(scanned_ids[1:] > scanned_ids[:-1]))
    if increasing and scanned_ids.size:
        found = _address_positions(scanned_ids, wanted)
        if found is not None:
            if found.size and int(found.min()) < 0:
                raise missing
            return found
    if scanned_ids.size and not bool(np.all(scanned_ids[1:] >= scanned_ids[:-1])):
        order = np.argsort(scanned_ids, kind="stable")
        return order[positions_in(scanned_ids[order], wanted)]
    needles = np.argsort(wanted)
    found = np.empty(wanted.size, dtype=np.intp)
    found[needles] = np.searchsorted(scanned_ids, wanted[needles])
    found = np.minimum(found, max(scanned_ids.size - 1, 0))
    if scanned_ids.size == 0 or not np.array_equal(scanned_ids[found], wanted):
        raise missing
    return found


_OFFSET_BITS = 32
_MAX_LOOKUP = 1 << 31  # entries; beyond, the table would not pay for itself


def _address_positions(scanned_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
    """`positions_in` for strictly ascending row addresses: -1 where a wanted id is not among
    them, or None when the ids are too sparse for a lookup table (then sort instead)."""
    n = scanned_ids.size
    fragment = scanned_ids >> _OFFSET_BITS
    offset = scanned_ids & np.uint64((1 << _OFFSET_BITS) - 1)
    last = np.flatnonzero(fragment[1:] != fragment[:-1])
    last = np.append(last, n - 1)  # each fragment's last scanned row
    fragments = fragment[last].astype(np.int64)
    extents = offset[last].astype(np.int64) + 1  # table slots per fragment: its highest offset
    span = int(extents.sum())
    top = int(fragments[-1])
    if span > max(4 * n, 1 << 20) or span > _MAX_LOOKUP or top > 1 << 24:
        return None
    start = np.full(top + 1, -1, dtype=np.int64)  # each fragment's first slot
    start[fragments] = np.cumsum(extents) - extents
    extent = np.zeros(top + 1, dtype=np.int64)
    extent[fragments] = extents
    # int32 slots when they fit: half the memory, and the random gathers miss cache less.
    kind = np.int32 if n < 1 << 31 else np.int64
    lookup = np.full(span, -1, dtype=kind)
    lookup[start[fragment.astype(np.int64)] + offset.astype(np.int64)] = np.arange(n, dtype=kind)
    del fragment, offset
    wanted_fragment = (wanted >> _OFFSET_BITS).astype(np.int64)
    wanted_offset = (wanted & np.uint64((1 << _OFFSET_BITS) - 1)).astype(np.int64)
    known = wanted_fragment <= top
    clipped = np.where(known, wanted_fragment, 0)
    known &= (start[clipped] >= 0) & (wanted_offset < extent[clipped])
    slot = np.where(known, start[clipped] + wanted_offset, 0)
    return np.where(known, lookup[slot], -1).astype(np.intp)


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
