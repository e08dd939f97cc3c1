"""Asset checks that run with every materialization of a permutation or folds asset.

Each check reads what the IO manager has just written (the permutation table's latest
version, batch by batch), re-reads only the needed base columns at the pinned base version,
and recomputes its guarantee from scratch, independently of the code that assigned the rows.
Membership and counts stream through `perm_assets.membership` (one byte per base row, no row
ids in Python); hash splits (their stability check joins keys), time-series folds and tables
with stable row ids keep the in-memory path below. Leakage checks (rows in two splits, a group
in two splits, train rows in their own validation fold, time order) are blocking: a failure
stops downstream training assets. Every check reports its figures as metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import dagster as dg
import numpy as np
import pyarrow as pa
from lancedb.table import Table

from perm_assets import assign, stability
from perm_assets.build import PermutationData, Scanned, positions_in, scan_columns
from perm_assets.folds import FoldsData
from perm_assets.membership import (
    Membership,
    cover_figures,
    exact,
    group_figures,
    normalised,
    own_fold_rows,
    scan_filtered,
    stratified_figures,
    table_batches,
    time_figures,
)
from perm_assets.resources import LanceDBResource
from perm_assets.specs import (
    FoldsSpec,
    GroupKFold,
    GroupSplit,
    HashSplit,
    KFold,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    StratifiedKFold,
    StratifiedSplit,
    TimeSeriesFolds,
    TimeSplit,
    key_columns,
)
from perm_assets.tables import (
    BASE_TABLE_KEY,
    BASE_VERSION_KEY,
    READ_BATCH_ROWS,
    SPEC_KEY,
    TRAIN_RANGES_KEY,
    TRAIN_TABLE_KEY,
    TRAIN_VERSION_KEY,
    read_all,
    where,
)


class Check(StrEnum):
    """Names of the checks (as shown in the Dagster UI)."""

    DISJOINT_COMPLETE = "splits_disjoint_and_complete"
    SIZES = "split_sizes_match_spec"
    STRATIFIED = "class_proportions_within_one_row"
    GROUPS = "no_group_in_two_splits"
    TIME_ORDER = "earlier_splits_precede_later"
    TRAIN_VALIDATION = "train_and_validation_disjoint"
    HASH_STABLE = "no_row_moved_between_splits"


_DESCRIPTIONS = {
    Check.DISJOINT_COMPLETE: "Every filtered row is in exactly one split (none lost, none twice).",
    Check.SIZES: "Split sizes match the requested ratios or counts within the rounding rule.",
    Check.STRATIFIED: "Each class's rows per split are within 1 row of its exact share.",
    Check.GROUPS: "No group key has rows in two splits.",
    Check.TIME_ORDER: "Every row of a split is strictly earlier than every row of the next.",
    Check.HASH_STABLE: "Against the previous version: every key still present keeps its split "
    "(a refresh never moves a test row into training); rows added per split.",
    Check.TRAIN_VALIDATION: "No fold trains on its own validation rows; k-fold: train plus "
    "validation is every row; time series: training holds exactly the rows of its window, gap "
    "excluded. Checked on the persisted training table.",
}
_BLOCKING = {
    Check.DISJOINT_COMPLETE,
    Check.GROUPS,
    Check.TIME_ORDER,
    Check.TRAIN_VALIDATION,
    Check.HASH_STABLE,
}


def permutation_checks(spec: PermutationSpec) -> list[Check]:
    """The checks that apply to a permutation asset with ``spec``."""
    split = spec.split
    checks = [Check.DISJOINT_COMPLETE]
    if isinstance(split, RandomSplit | SequentialSplit | StratifiedSplit):
        checks.append(Check.SIZES)
    if isinstance(split, StratifiedSplit):
        checks.append(Check.STRATIFIED)
    if isinstance(split, GroupSplit):
        checks.append(Check.GROUPS)
    if isinstance(split, TimeSplit):
        checks.append(Check.TIME_ORDER)
    if isinstance(split, HashSplit):
        checks.append(Check.HASH_STABLE)
    return checks


def folds_checks(spec: FoldsSpec) -> list[Check]:
    """The checks that apply to a folds asset with ``spec``."""
    folds = spec.folds
    checks = [Check.DISJOINT_COMPLETE, Check.TRAIN_VALIDATION]
    if isinstance(folds, KFold | StratifiedKFold):
        checks.append(Check.SIZES)
    if isinstance(folds, StratifiedKFold):
        checks.append(Check.STRATIFIED)
    if isinstance(folds, GroupKFold):
        checks.append(Check.GROUPS)
    if isinstance(folds, TimeSeriesFolds):
        checks.append(Check.TIME_ORDER)
    return checks


def check_specs(key: dg.AssetKey, checks: list[Check]) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            name=check.value,
            asset=key,
            description=_DESCRIPTIONS[check],
            blocking=check in _BLOCKING,
        )
        for check in checks
    ]


def run_permutation_checks(
    db: LanceDBResource, table: str, data: PermutationData, checks: list[Check]
) -> Iterator[dg.AssetCheckResult]:
    """Evaluate ``checks`` on ``data``, just persisted as permutation table ``table``."""
    assert isinstance(data.spec, PermutationSpec)
    spec = data.spec
    base = db.open_table(data.base_table, version=data.base_version)
    split = spec.split
    num_splits = len(spec.split_names())
    drops = bool(
        (isinstance(split, RandomSplit | SequentialSplit) and (split.counts or split.allow_discard))
        or (isinstance(split, HashSplit) and split.discard_weight > 0)
    )
    streamed = _streamed_permutation_checks(db, table, data, base, checks, drops=drops)
    if streamed is not None:
        yield from streamed
        return
    row_ids, split_ids = _rows_of(db, table, data)
    # The build counted the filtered rows at the same pinned version: no second scan.
    expected = data.filtered_rows
    if expected is None:
        expected = base.count_rows(where(spec.filter))
    columns = key_columns(split)
    cover: _Cover | None = None
    scanned: Scanned | None = None
    if columns:  # the project's own splits: check membership against a fresh scan
        scanned = scan_columns(base, spec.filter, columns, asset=table)
        cover = _cover(scanned.row_ids, row_ids, split_ids, num_splits)
        figures = cover.figures
    else:  # lancedb's splits: the build counted the filtered rows at the pinned version
        figures = assign.check_disjoint_cover(
            split_ids, expected, num_splits=num_splits, row_ids=row_ids
        )
    figures = _persisted(db, table, data.num_rows, figures)
    if drops:  # rows were left out on purpose: only duplicates and stray ids are errors
        figures["passed"] = (
            figures["duplicate_rows"] == 0
            and figures["extra_rows"] == 0
            and figures["persisted_rows"] == data.num_rows
        )
        figures["documented_discard"] = True
    yield _result(Check.DISJOINT_COMPLETE, figures)

    if Check.SIZES in checks:
        yield _result(Check.SIZES, _sizes(split, np.asarray(data.split_rows, dtype=np.int64)))
    if isinstance(split, HashSplit):
        yield _result(
            Check.HASH_STABLE,
            _hash_stability(db, table, base, spec, split, row_ids, split_ids, figures),
        )
    if cover is None or scanned is None:
        return
    by_row = cover.split_of_scanned
    if isinstance(split, StratifiedSplit):
        labels = scanned.codes(split.label)
        yield _result(
            Check.STRATIFIED,
            _no_cover()
            if by_row is None
            else assign.check_stratified(by_row, labels, split.ratios),
        )
    if isinstance(split, GroupSplit):
        groups = scanned.codes(split.group)
        yield _result(
            Check.GROUPS, _no_cover() if by_row is None else assign.check_groups(by_row, groups)
        )
    if isinstance(split, TimeSplit):
        times = scanned.orderable(split.column)
        yield _result(
            Check.TIME_ORDER, _no_cover() if by_row is None else _time_order(times, by_row)
        )


def _streamed_permutation_checks(
    db: LanceDBResource,
    table: str,
    data: PermutationData,
    base: Table,
    checks: list[Check],
    *,
    drops: bool,
) -> list[dg.AssetCheckResult] | None:
    """The permutation checks over the written table and the base, both read in batches
    (`perm_assets.membership`): one byte per base row, not 16+ per permuted row and a sort.
    None when the row ids are not row addresses (stable row ids): the caller's in-memory path.
    """
    assert isinstance(data.spec, PermutationSpec)
    spec, split = data.spec, data.spec.split
    covered = _streamed_cover(
        db,
        table,
        base,
        spec.filter,
        len(spec.split_names()),
        data.num_rows,
        label=split.label if isinstance(split, StratifiedSplit) else None,
        group=split.group if isinstance(split, GroupSplit) else None,
        time=split.column if isinstance(split, TimeSplit) else None,
    )
    if covered is None:
        return None
    _, member, scan, figures = covered
    if drops:  # rows were left out on purpose: only duplicates and stray ids are errors
        figures["passed"] = (
            figures["duplicate_rows"] == 0
            and figures["extra_rows"] == 0
            and figures["persisted_rows"] == data.num_rows
        )
        figures["documented_discard"] = True
    version = int(figures["persisted_version"])
    results = [_result(Check.DISJOINT_COMPLETE, figures)]
    if Check.SIZES in checks:
        results.append(
            _result(Check.SIZES, _sizes(split, np.asarray(data.split_rows, dtype=np.int64)))
        )
    if isinstance(split, HashSplit):
        stable = _hash_stability_streamed(db, table, base, spec, split, version, member.split_rows)
        if stable is None:  # a key column's type has no streamed hash: in memory (this check)
            row_ids, split_ids = _rows_of(db, table, data)
            persisted = {"persisted_version": version}
            stable = _hash_stability(db, table, base, spec, split, row_ids, split_ids, persisted)
        results.append(_result(Check.HASH_STABLE, stable))
    covered = exact(member, scan)
    if isinstance(split, StratifiedSplit):
        stratified = stratified_figures(scan, normalised(split.ratios)) if covered else None
        results.append(_result(Check.STRATIFIED, stratified or _no_cover()))
    if isinstance(split, GroupSplit):
        results.append(_result(Check.GROUPS, group_figures(scan) if covered else _no_cover()))
    if isinstance(split, TimeSplit):
        results.append(_result(Check.TIME_ORDER, time_figures(scan) if covered else _no_cover()))
    return results


def run_folds_checks(
    db: LanceDBResource, table: str, data: FoldsData, checks: list[Check]
) -> Iterator[dg.AssetCheckResult]:
    """Evaluate ``checks`` on ``data``, just persisted as folds table ``table`` + training.

    One scan of the base (row ids and the label, group or time column) serves every check.
    Each fold's training range is checked on the persisted training table, as views read it.
    """
    assert isinstance(data.validation.spec, FoldsSpec)
    spec = data.validation.spec
    folds = spec.folds
    k = folds.k
    base = db.open_table(data.validation.base_table, version=data.validation.base_version)
    if not isinstance(folds, TimeSeriesFolds):  # time-series folds: the in-memory path
        streamed = _streamed_folds_checks(db, table, data, base, checks)
        if streamed is not None:
            yield from streamed
            return
    row_ids, fold_ids = _rows_of(db, table, data.validation)
    scanned = scan_columns(base, spec.filter, key_columns(folds), asset=table)
    cover = _cover(scanned.row_ids, row_ids, fold_ids, k)

    figures = _persisted(db, table, data.validation.num_rows, cover.figures)
    if isinstance(folds, TimeSeriesFolds):  # the earliest block trains but is never validated
        figures["passed"] = (
            figures["duplicate_rows"] == 0
            and figures["extra_rows"] == 0
            and figures["out_of_range_ids"] == 0
            and figures["persisted_rows"] == data.validation.num_rows
        )
    yield _result(Check.DISJOINT_COMPLETE, figures)

    train, ranges = _persisted_training(db, table, int(figures["persisted_version"]))
    sizes = np.bincount(fold_ids.astype(np.min_scalar_type(k)), minlength=k)
    train_ids = None
    if not isinstance(folds, TimeSeriesFolds):  # k-fold kinds: the folds table rotated
        training = _rotated_training(row_ids, fold_ids, sizes, train, ranges)
    else:
        train_ids = read_all(train.search().select(["row_id"])).column("row_id").to_numpy()
        expected = assign.time_series_folds(
            scanned.orderable(folds.column),
            k,
            gap=folds.gap,
            test_size=folds.test_size,
            max_train_size=folds.max_train_size,
        )
        training = _time_series_training(
            scanned.row_ids, expected, row_ids, fold_ids, train_ids, ranges
        )
    yield _result(Check.TRAIN_VALIDATION, training)
    if Check.SIZES in checks:
        spread = int(sizes.max() - sizes.min())
        yield _result(
            Check.SIZES,
            {"fold_rows": sizes.tolist(), "max_minus_min": spread, "passed": spread <= 1},
        )
    by_row = cover.split_of_scanned
    if isinstance(folds, StratifiedKFold):
        labels = scanned.codes(folds.label)
        yield _result(
            Check.STRATIFIED,
            _no_cover() if by_row is None else assign.check_stratified(by_row, labels, k),
        )
    if isinstance(folds, GroupKFold):
        groups = scanned.codes(folds.group)
        yield _result(
            Check.GROUPS, _no_cover() if by_row is None else assign.check_groups(by_row, groups)
        )
    if isinstance(folds, TimeSeriesFolds):
        assert train_ids is not None  # time-series folds are never rotated
        yield _result(
            Check.TIME_ORDER,
            _fold_time_order(scanned, folds.column, row_ids, fold_ids, train_ids, ranges),
        )


def _streamed_cover(
    db: LanceDBResource,
    table: str,
    base: Table,
    filter: str | None,
    num_splits: int,
    expected_rows: int,
    *,
    label: str | None = None,
    group: str | None = None,
    time: str | None = None,
):
    """The written ``table`` (pinned to one version for scan and count), its membership in
    ``base``, the filtered scan and the disjoint-and-complete figures; None for stable row ids.
    With ``engine="ray"`` the membership and scan run as Ray tasks (`engines.ray_checks`)."""
    stored = db.open_table(table)
    stored = db.open_table(table, version=stored.version)  # one version for scan and count
    keys = {"label": label, "group": group, "time": time}
    tasks: dict[str, int] | None = None
    if db.engine == "ray":  # where the rows are: in Ray tasks, not in this process
        from perm_assets.engines import ray_checks

        found = ray_checks.cover(
            stored,
            base,
            filter,
            num_splits,
            address=db.ray_address,
            storage_options=db.resolved_storage_options(),
            asset=table,
            **keys,
        )
        if found is None:
            return None
        member, scan, tasks = found
    else:
        built = Membership.build(base, table_batches(stored), num_splits, spill_dir=db.spill_dir)
        if built is None:
            return None
        member = built
        with member:
            scan = scan_filtered(
                member, base, filter, asset=table, label=label, group=group, time=time
            )
    figures = cover_figures(member, scan)
    persisted = stored.count_rows()
    figures = {
        **figures,
        "persisted_version": stored.version,
        "persisted_rows": persisted,
        "passed": figures["passed"] and persisted == expected_rows,
    }
    if tasks is not None:
        figures["checked_by_ray_tasks"] = tasks
    return stored, member, scan, figures


def _streamed_folds_checks(
    db: LanceDBResource, table: str, data: FoldsData, base: Table, checks: list[Check]
) -> list[dg.AssetCheckResult] | None:
    """The k-fold kinds' checks over the written folds and training tables and the base,
    all read in batches (as `_streamed_permutation_checks`); None for stable row ids."""
    spec = cast(FoldsSpec, data.validation.spec)
    folds = spec.folds
    k = folds.k
    covered = _streamed_cover(
        db,
        table,
        base,
        spec.filter,
        k,
        data.validation.num_rows,
        label=folds.label if isinstance(folds, StratifiedKFold) else None,
        group=folds.group if isinstance(folds, GroupKFold) else None,
    )
    if covered is None:
        return None
    stored, member, scan, figures = covered
    results = [_result(Check.DISJOINT_COMPLETE, figures)]
    train, ranges = _persisted_training(db, table, stored.version)
    sizes = member.split_rows
    if db.engine == "ray":  # position ranges compared in Ray tasks (`engines.ray_checks`)
        from perm_assets.engines import ray_checks

        training = ray_checks.rotated_training(
            stored,
            train,
            sizes,
            ranges,
            address=db.ray_address,
            storage_options=db.resolved_storage_options(),
            asset=table,
        )
    else:
        training = _rotated_training_streamed(stored, sizes, train, ranges)
    results.append(_result(Check.TRAIN_VALIDATION, training))
    if Check.SIZES in checks:
        spread = int(sizes.max() - sizes.min())
        results.append(
            _result(
                Check.SIZES,
                {"fold_rows": sizes.tolist(), "max_minus_min": spread, "passed": spread <= 1},
            )
        )
    covered = exact(member, scan)
    if isinstance(folds, StratifiedKFold):
        stratified = stratified_figures(scan, normalised(k)) if covered else None
        results.append(_result(Check.STRATIFIED, stratified or _no_cover()))
    if isinstance(folds, GroupKFold):
        results.append(_result(Check.GROUPS, group_figures(scan) if covered else _no_cover()))
    return results


def _rotated_training_streamed(
    folds_table: Table, sizes: np.ndarray, train: Table, ranges: list[list[int]]
) -> dict[str, Any]:
    """`_rotated_training` with both tables read in batches, in lockstep: training position
    ``p`` must hold folds-table row ``(p + sizes[0]) % n``; each fold's range is counted for
    its own validation rows and for rows of other folds it lacks."""
    first = int(sizes[0])
    expected = _Cyclic(folds_table, first)
    own = [0] * len(ranges)
    length, matches = 0, True
    for ids in _row_id_batches(train):
        want_ids, want_folds = expected.take(ids.size)
        matches = matches and bool(np.array_equal(ids, want_ids))
        if matches:  # the fold of every position is known: count each range's share of it
            for i, mine in enumerate(own_fold_rows(want_folds, length, ranges)):
                own[i] += mine
        length += ids.size
    return rotated_training_figures(sizes, ranges, length=length, matches=matches, own=own)


def rotated_training_figures(
    sizes: np.ndarray, ranges: list[list[int]], *, length: int, matches: bool, own: list[int]
) -> dict[str, Any]:
    """``train_and_validation_disjoint`` figures of a k-fold training table of ``length``
    rows, which ``matches`` the folds table rotated (position by position), ``own[i]`` of
    fold ``i``'s training range holding its own validation rows."""
    n, first, last = int(sizes.sum()), int(sizes[0]), int(sizes[-1])
    matches = matches and length == 2 * n - first - last
    figures: dict[str, Any] = {
        "training_table_rows": length,
        "training_table_matches_folds": matches,
    }
    if not matches:
        return {**figures, "passed": False}
    overlap, missing = [], []
    for i, (offset, rows) in enumerate(ranges):
        inside = offset >= 0 and rows <= n and offset + rows <= length
        mine = own[i] if inside else rows
        overlap.append(mine)
        missing.append(int(n - sizes[i]) - (rows - mine) if inside else int(n - sizes[i]))
    return {
        **figures,
        "train_rows": [rows for _, rows in ranges],
        "train_rows_in_own_validation_fold": overlap,
        "rows_missing_per_fold": missing,
        "passed": not any(overlap) and not any(missing),
    }


class _Cyclic:
    """A table's (row id, split id) from row ``start`` on, wrapping to row 0 at its end, read
    in batches and handed out in any sizes (each pass re-reads the table)."""

    def __init__(self, table: Table, start: int) -> None:
        self.table, self.skip = table, start
        self.batches: Iterator[pa.RecordBatch] = iter(())
        self.ids = np.zeros(0, dtype=np.uint64)
        self.folds = np.zeros(0, dtype=np.uint64)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``count`` rows (fewer only when the table is empty)."""
        ids, folds, have = [self.ids], [self.folds], self.ids.size
        empty_passes = 0
        while have < count and empty_passes < 2:
            batch = next(self.batches, None)
            if batch is None:  # a pass ended: start over from row 0
                self.batches = iter(table_batches(self.table))
                empty_passes += 1
                continue
            row_ids, split_ids = batch.column(0).to_numpy(), batch.column(1).to_numpy()
            if self.skip:
                cut = min(self.skip, row_ids.size)
                self.skip -= cut
                empty_passes = 0  # rows were there, skipped
                row_ids, split_ids = row_ids[cut:], split_ids[cut:]
            if row_ids.size:
                empty_passes = 0
            ids.append(row_ids)
            folds.append(split_ids)
            have += row_ids.size
        all_ids, all_folds = np.concatenate(ids), np.concatenate(folds)
        self.ids, self.folds = all_ids[count:], all_folds[count:]
        return all_ids[:count], all_folds[:count]


def _no_cover() -> dict[str, Any]:
    """Figures of a check that needs each filtered row in exactly one fold, when it is not."""
    return {
        "evaluated": False,
        "reason": "the folds do not hold each filtered row exactly once (see "
        f"{Check.DISJOINT_COMPLETE.value})",
        "passed": False,
    }


# ----------------------------------------------------------------------------- internals
def _persisted(
    db: LanceDBResource, table: str, rows: int, figures: dict[str, Any]
) -> dict[str, Any]:
    """``figures`` plus the persisted table's version and row count (metadata only, no scan)."""
    stored = db.open_table(table)
    persisted = stored.count_rows()
    return {
        **figures,
        "persisted_version": stored.version,
        "persisted_rows": persisted,
        "passed": figures["passed"] and persisted == rows,
    }


def _columns(data: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return data.column("row_id").to_numpy(), data.column("split_id").to_numpy()


def _rows_of(
    db: LanceDBResource, table: str, data: PermutationData
) -> tuple[np.ndarray, np.ndarray]:
    """Row and split ids of ``data``: in memory, or, for a permutation an out-of-core engine
    streamed into ``table``, read back from its latest version (as `_persisted` counts it).
    16 bytes per row: only the in-memory path (hash splits, time-series folds, stable row
    ids) reads them."""
    if data.stream is None:
        return _columns(data.data)
    # Filled batch by batch: no Arrow copy of the table besides the two arrays.
    row_ids = np.empty(data.num_rows, dtype=np.uint64)
    split_ids = np.empty(data.num_rows, dtype=np.uint64)
    query = db.open_table(table).search().select(["row_id", "split_id"])
    at = 0
    for batch in query.to_batches(batch_size=READ_BATCH_ROWS):
        size = batch.num_rows
        if at + size > data.num_rows:  # more rows than written: let the checks see them all
            row_ids = np.concatenate([row_ids[:at], batch.column(0).to_numpy()])
            split_ids = np.concatenate([split_ids[:at], batch.column(1).to_numpy()])
        else:
            row_ids[at : at + size] = batch.column(0).to_numpy()
            split_ids[at : at + size] = batch.column(1).to_numpy()
        at += size
    return row_ids[:at], split_ids[:at]


def _aligned(base: Table, filter: str | None, columns: list[str], row_ids: np.ndarray) -> Scanned:
    """``columns`` of the rows ``row_ids`` (in that order), from a fresh scan of the base."""
    scanned = scan_columns(base, filter, columns, asset=base.name)
    positions = positions_in(scanned.row_ids, row_ids)
    return Scanned(
        row_ids=row_ids,
        columns={c: v.take(pa.array(positions)) for c, v in scanned.columns.items()},
    )


def _sizes(split: object, rows: np.ndarray) -> dict[str, Any]:
    """Rows per split (counted from the written table) against the requested sizes."""
    if isinstance(split, RandomSplit | SequentialSplit) and split.counts is not None:
        passed = rows.tolist() == list(split.counts)
        return {"split_rows": rows.tolist(), "requested_counts": split.counts, "passed": passed}
    if isinstance(split, RandomSplit | SequentialSplit):
        ratios, _ = split.builder_sizes()
        assert ratios is not None
    else:
        assert isinstance(split, StratifiedSplit)
        ratios = split.ratios
    # Shares of the rows kept (ratios below 1 with allow_discard are scaled to them). lancedb
    # rounds every split to within 1 row of its exact share (checked on 7 to 10,001 rows with 2
    # to 4 splits), as does the stratified split; more means rows went missing or astray.
    shares = np.asarray(ratios, dtype=np.float64) / math.fsum(ratios) * int(rows.sum())
    deviation = float(np.abs(rows - shares).max()) if rows.size else 0.0
    return {
        "split_rows": rows.tolist(),
        "expected_rows": [round(float(e), 3) for e in shares],
        "max_deviation_rows": round(deviation, 6),
        "tolerance_rows": 1.0,
        "passed": deviation <= 1.0,
    }


def _time_order(values: np.ndarray, split_ids: np.ndarray) -> dict[str, Any]:
    ids = split_ids.astype(np.int64)
    splits = int(ids.max()) + 1 if ids.size else 0
    lows = [values[ids == s].min() for s in range(splits)]
    highs = [values[ids == s].max() for s in range(splits)]
    overlaps = sum(1 for s in range(splits - 1) if not highs[s] < lows[s + 1])
    return {
        "split_min": [str(v) for v in lows],
        "split_max": [str(v) for v in highs],
        "boundaries_violated": overlaps,
        "passed": overlaps == 0,
    }


@dataclass(frozen=True)
class _Cover:
    """How a permutation's rows match the filtered rows of a fresh scan."""

    figures: dict[str, Any]
    split_of_scanned: np.ndarray | None
    """Split of each scanned row, when every scanned row is in the permutation exactly once."""


def _cover(
    scanned_ids: np.ndarray, row_ids: np.ndarray, split_ids: np.ndarray, num_splits: int
) -> _Cover:
    """Duplicates, missing and extra rows of a permutation against the scanned row ids.

    One sort of (row id, split) packed into uint64, not an argsort plus searchsorted: 10M
    rows take ~0.15 s against ~1 s.
    """
    out_of_range = int(np.count_nonzero(split_ids >= num_splits))
    packed = _sorted_pairs(row_ids, split_ids, num_splits) if out_of_range == 0 else None
    if packed is not None:
        by_id, splits = packed
    else:
        order = np.argsort(row_ids, kind="stable")
        by_id, splits = row_ids[order], split_ids[order]
    scan_order = None
    if scanned_ids.size > 1 and not bool(np.all(scanned_ids[1:] > scanned_ids[:-1])):
        scan_order = np.argsort(scanned_ids, kind="stable")  # scans are ascending in practice
        scanned_ids = scanned_ids[scan_order]
    first = _run_starts(by_id)
    distinct = int(np.count_nonzero(first))
    exact = by_id.size == scanned_ids.size and bool(np.array_equal(by_id, scanned_ids))
    if exact:
        missing = extra = 0
    else:
        found = int(np.count_nonzero(_member(scanned_ids, by_id[first])))
        missing, extra = scanned_ids.size - found, distinct - found
    duplicates = int(row_ids.size - distinct)
    split_of_scanned = None
    if exact and duplicates == 0 and out_of_range == 0:
        split_of_scanned = splits
        if scan_order is not None:
            split_of_scanned = np.empty_like(splits)
            split_of_scanned[scan_order] = splits
    return _Cover(
        figures={
            "rows": int(row_ids.size),
            "expected_rows": int(scanned_ids.size),
            "duplicate_rows": duplicates,
            "missing_rows": int(missing),
            "extra_rows": int(extra),
            "out_of_range_ids": out_of_range,
            "passed": duplicates == 0 and missing == 0 and extra == 0 and out_of_range == 0,
        },
        split_of_scanned=split_of_scanned,
    )


def _sorted_pairs(
    values: np.ndarray, tags: np.ndarray, num_tags: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """``values`` ascending with their ``tags`` (each < ``num_tags``) alongside, by one sort of
    the pairs packed into uint64; None when a value does not leave room for the tag's bits.

    10M pairs take ~0.15 s, against ~1 s for an argsort and two gathers.
    """
    bits = max(1, (num_tags - 1).bit_length())
    if values.size and (int(values.max()) >> (64 - bits) or int(tags.max()) >= num_tags):
        return None  # a tag would spill into its value
    shift = np.uint64(bits)
    packed = values.astype(np.uint64) << shift
    packed |= tags.astype(np.uint64, copy=False)
    packed.sort()
    sorted_tags = (packed & np.uint64((1 << bits) - 1)).astype(np.min_scalar_type(num_tags))
    packed >>= shift
    return packed, sorted_tags


def _persisted_training(
    db: LanceDBResource, table: str, version: int
) -> tuple[Table, list[list[int]]]:
    """The training table that folds ``version`` pins, and each fold's range in it."""
    metadata = db.open_table(table, version=version).schema.metadata or {}
    train = db.open_table(
        metadata[TRAIN_TABLE_KEY.encode()].decode(),
        version=int(metadata[TRAIN_VERSION_KEY.encode()]),
    )
    return train, json.loads(metadata[TRAIN_RANGES_KEY.encode()])


def _row_id_batches(table: Table) -> Iterator[np.ndarray]:
    reader = table.search().select(["row_id"]).to_batches(batch_size=READ_BATCH_ROWS)
    for batch in reader:
        yield batch.column("row_id").to_numpy()


def _rotated_training(
    row_ids: np.ndarray,
    fold_ids: np.ndarray,
    sizes: np.ndarray,
    train: Table,
    ranges: list[list[int]],
) -> dict[str, Any]:
    """k-fold kinds: the persisted training table must be the folds table rotated by fold 0's
    size (position ``p`` holds folds-table row ``(p + sizes[0]) % n``, compared batch by batch);
    then each fold's range is counted for its own validation rows (must be 0) and for rows of
    other folds it lacks."""
    n, first, last = row_ids.size, int(sizes[0]), int(sizes[-1])
    length, matches = 0, True
    for ids in _row_id_batches(train):
        expected = row_ids.take(np.arange(length + first, length + first + ids.size), mode="wrap")
        matches = matches and bool(np.array_equal(ids, expected))
        length += ids.size
    matches = matches and length == 2 * n - first - last
    figures: dict[str, Any] = {
        "training_table_rows": length,
        "training_table_matches_folds": matches,
    }
    if not matches:
        return {**figures, "passed": False}
    # Fold of every training-table position; a range of at most n positions never repeats a row.
    narrow = fold_ids.astype(np.min_scalar_type(len(ranges)))
    folds_at = np.concatenate([narrow[first:], narrow[: n - last]])
    overlap, missing = [], []
    for i, (offset, rows) in enumerate(ranges):
        inside = offset >= 0 and rows <= n and offset + rows <= length
        own = int(np.count_nonzero(folds_at[offset : offset + rows] == i)) if inside else rows
        overlap.append(own)
        missing.append(int(n - sizes[i]) - (rows - own) if inside else int(n - sizes[i]))
    return {
        **figures,
        "train_rows": [rows for _, rows in ranges],
        "train_rows_in_own_validation_fold": overlap,
        "rows_missing_per_fold": missing,
        "passed": not any(overlap) and not any(missing),
    }


def _time_series_training(
    scanned_ids: np.ndarray,
    expected: list[assign.TimeFold],
    row_ids: np.ndarray,
    fold_ids: np.ndarray,
    train_ids: np.ndarray,
    ranges: list[list[int]],
) -> dict[str, Any]:
    """Time-series folds: each fold's persisted training range and validation rows hold
    exactly the rows its time order gives (``expected``, from a fresh scan): never a gap row,
    a later row or a row past the table's end."""
    # Sorts and searchsorted only: numpy 2.4's hash-based np.unique/np.isin are ~100x slower.
    overlap, wrong_train, wrong_validation, outside = [], 0, 0, 0
    for i, ((offset, rows), fold) in enumerate(zip(ranges, expected, strict=True)):
        validation = np.sort(row_ids[fold_ids == i])
        if offset < 0 or offset + rows > train_ids.size:
            outside += 1
        train = np.sort(train_ids[max(offset, 0) : offset + rows])
        overlap.append(int(np.count_nonzero(_member(validation, train))))
        wrong_train += not np.array_equal(train, np.sort(scanned_ids[fold.train()]))
        wrong_validation += not np.array_equal(validation, np.sort(scanned_ids[fold.test()]))
    return {
        "training_table_rows": int(train_ids.size),
        "train_rows": [rows for _, rows in ranges],
        "train_rows_in_own_validation_fold": overlap,
        "folds_with_other_training_rows": int(wrong_train),
        "folds_with_other_validation_rows": int(wrong_validation),
        "ranges_outside_training_table": outside,
        "passed": not any(overlap) and wrong_train == wrong_validation == outside == 0,
    }


def _member(sorted_haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Which ``needles`` occur in ``sorted_haystack``."""
    if sorted_haystack.size == 0:
        return np.zeros(needles.size, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_haystack, needles), sorted_haystack.size - 1)
    return sorted_haystack[at] == needles


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array (its distinct values)."""
    first = np.ones(sorted_values.size, dtype=bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    return first


def _fold_time_order(
    scanned: Scanned,
    column: str,
    row_ids: np.ndarray,
    fold_ids: np.ndarray,
    train_ids: np.ndarray,
    ranges: list[list[int]],
) -> dict[str, Any]:
    times = scanned.orderable(column)
    validation_times = times[positions_in(scanned.row_ids, row_ids)]
    train_times = times[positions_in(scanned.row_ids, train_ids)]
    violations, supersets = 0, True
    previous: np.ndarray | None = None
    for i, (offset, rows) in enumerate(ranges):
        train = train_times[offset : offset + rows]
        validation = validation_times[fold_ids == i]
        if train.size and validation.size and not train.max() < validation.min():
            violations += 1
        ids = np.sort(train_ids[offset : offset + rows])
        if previous is not None and not _member(ids, previous).all():
            supersets = False
        previous = ids
    return {
        "folds_with_train_not_before_validation": violations,
        "training_sets_grow": supersets,
        "passed": violations == 0,
    }


def _result(check: Check, figures: dict[str, Any]) -> dg.AssetCheckResult:
    passed = bool(figures.pop("passed"))
    return dg.AssetCheckResult(
        check_name=check.value,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={k: _metadata_value(v) for k, v in figures.items()},
    )


def _metadata_value(value: Any) -> Any:
    if isinstance(value, list | dict):
        return dg.MetadataValue.json(value)
    if value is None:
        return dg.MetadataValue.text("none")
    return value


def _hash_stability(
    db: LanceDBResource,
    table: str,
    base: Table,
    spec: PermutationSpec,
    split: HashSplit,
    row_ids: np.ndarray,
    split_ids: np.ndarray,
    persisted: dict[str, Any],
) -> dict[str, Any]:
    """Compare the split of every hash key with the permutation's previous version.

    Keys are the hash columns' values (not row ids, which compaction renumbers). A key present
    in both versions must be in the same split; new keys are counted per split.
    """
    names = spec.split_names()
    version = int(persisted["persisted_version"])
    previous = _previous_permutation(db, table, version)
    if previous is None:
        added = np.bincount(split_ids.astype(np.int64), minlength=len(names))
        return _stability_figures(names, None, 0, 0, added)
    prev_table, prev_base, prev_filter, _ = previous
    prev_data = read_all(prev_table)
    prev_rows = prev_data.column("row_id").to_numpy()
    prev_splits = prev_data.column("split_id").to_numpy()
    keys = list(split.columns)
    now = _key_splits(base, spec.filter, keys, row_ids, split_ids, len(names))
    before = _key_splits(prev_base, prev_filter, keys, prev_rows, prev_splits, len(names))
    if now is not None and before is not None:
        (keys_now, split_now), (keys_before, split_before) = now, before
        known, was_values = np.zeros(keys_now.size, dtype=bool), split_now
        if keys_before.size:
            at = np.minimum(np.searchsorted(keys_before, keys_now), keys_before.size - 1)
            known, was_values = keys_before[at] == keys_now, split_before[at]
    else:  # several or non-integer key columns: group and join in Arrow
        split_now, known, was_values = stability.joined_splits(
            _keyed(base, spec.filter, keys, row_ids, split_ids),
            _keyed(prev_base, prev_filter, keys, prev_rows, prev_splits),
            keys,
        )
    moved = int(np.count_nonzero(known & (split_now != was_values)))
    added = np.bincount(split_now[~known].astype(np.int64), minlength=len(names))
    return _stability_figures(names, version - 1, int(np.count_nonzero(known)), moved, added)


def _stability_figures(
    names: list[str], previous: int | None, compared: int, moved: int, added: np.ndarray
) -> dict[str, Any]:
    """``no_row_moved_between_splits`` figures: keys compared with the ``previous`` version
    (None: there is none), keys ``moved`` to another split, new keys per split."""
    figures: dict[str, Any] = {"previous_version": previous}
    if previous is not None:
        figures["keys_compared"] = compared
    return {
        **figures,
        "rows_moved_between_splits": moved,
        **{f"rows_added/{n}": int(a) for n, a in zip(names, added, strict=True)},
        "passed": moved == 0,
    }


def _key_splits(
    base: Table,
    filter: str | None,
    keys: list[str],
    row_ids: np.ndarray,
    split_ids: np.ndarray,
    num_splits: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Distinct values of one integer key column among the permutation's rows (ascending) and
    each one's split (the smallest, as one hash sends all its rows to one split); None for
    other keys. Two packed sorts, no argsort or join: 10M rows in ~0.5 s against ~2 s."""
    if len(keys) != 1:
        return None
    scanned = scan_columns(base, filter, keys, asset=base.name)
    values = scanned.columns[keys[0]]
    if not pa.types.is_integer(values.type) or pa.types.is_uint64(values.type):
        return None
    by_id = _sorted_pairs(row_ids, split_ids, num_splits)
    if by_id is None:
        return None
    ids, splits = by_id
    row_keys = values.to_numpy().astype(np.int64, copy=False)
    if not (ids.size == scanned.num_rows and np.array_equal(ids, scanned.row_ids)):
        row_keys = row_keys[positions_in(scanned.row_ids, ids)]  # a discard or a filter
    low = int(row_keys.min()) if row_keys.size else 0
    by_key = _sorted_pairs((row_keys - low).astype(np.uint64), splits, num_splits)
    if by_key is None:
        return None
    sorted_keys, key_splits = by_key
    first = _run_starts(sorted_keys)
    return sorted_keys[first].astype(np.int64) + low, key_splits[first]


def _hash_stability_streamed(
    db: LanceDBResource,
    table: str,
    base: Table,
    spec: PermutationSpec,
    split: HashSplit,
    version: int,
    split_rows: np.ndarray,
) -> dict[str, Any] | None:
    """`_hash_stability`'s figures out of core (`perm_assets.stability`): one byte per base
    row and one bucket of keys at a time; None where only the in-memory check can compare."""
    names = spec.split_names()
    previous = _previous_permutation(db, table, version)
    if previous is None:
        return _stability_figures(names, None, 0, 0, split_rows)
    stored = db.open_table(table, version=version)
    found = stability.compare(
        (stored, base, spec.filter, len(names)),
        previous,
        list(split.columns),
        spill_dir=db.spill_dir,
    )
    if found is None:
        return None
    compared, moved, added = found
    return _stability_figures(names, version - 1, compared, moved, added)


def _previous_permutation(
    db: LanceDBResource, table: str, version: int
) -> tuple[Table, Table, str | None, int] | None:
    """The version before ``version`` of ``table`` with its base, filter and number of
    splits, if it was a hash split."""
    if version <= 1:
        return None
    try:
        previous = db.open_table(table, version=version - 1)
        metadata = previous.schema.metadata or {}
        spec = PermutationSpec.model_validate_json(metadata[SPEC_KEY.encode()])
        base = db.open_table(
            metadata[BASE_TABLE_KEY.encode()].decode(),
            version=int(metadata[BASE_VERSION_KEY.encode()]),
        )
    except (KeyError, ValueError, LookupError):
        return None  # no comparable previous version (cleaned up, or another kind of table)
    if not isinstance(spec.split, HashSplit):
        return None
    return previous, base, spec.filter, len(spec.split_names())


def _keyed(
    base: Table, filter: str | None, keys: list[str], row_ids: np.ndarray, split_ids: np.ndarray
) -> pa.Table:
    """The key columns and ``split`` of each permutation row (`stability.joined_splits` keeps
    one row per key)."""
    values = _aligned(base, filter, keys, row_ids)
    return pa.table({**{k: values.columns[k] for k in keys}, "split": pa.array(split_ids)})
