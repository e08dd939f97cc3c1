"""Asset checks that run with every materialization of a permutation or folds asset.

Each check takes the exact Arrow table the IO manager has just written (and confirms the new
table version holds as many rows), re-reads only the needed base columns at the pinned base
version, and recomputes its guarantee from scratch, independently of the code that assigned the
rows. (Reading 10M row ids back from Lance costs 0.8 s, more than all the checks together.)
Leakage checks (rows in two splits, a group in two splits, train rows in their own validation
fold, time order) are blocking: a failure stops downstream training assets. Every check
reports its figures as metadata.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
from lancedb.table import Table

from perm_assets import assign
from perm_assets.build import PermutationData, Scanned, scan_columns
from perm_assets.folds import FoldsData
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
)
from perm_assets.tables import BASE_TABLE_KEY, BASE_VERSION_KEY, SPEC_KEY


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
    "validation is every row.",
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
    row_ids, split_ids = _columns(data.data)
    split = spec.split
    num_splits = len(spec.split_names())
    # The build counted the filtered rows at the same pinned version: no second scan.
    expected = data.filtered_rows
    if expected is None:
        expected = base.count_rows(spec.filter)
    drops = (
        isinstance(split, RandomSplit | SequentialSplit) and (split.counts or split.allow_discard)
    ) or (isinstance(split, HashSplit) and split.discard_weight > 0)
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
    columns = _needed(split)
    if not columns:
        return
    values = _aligned(base, spec.filter, columns, row_ids)
    if isinstance(split, StratifiedSplit):
        yield _result(
            Check.STRATIFIED,
            assign.check_stratified(split_ids, values.codes(split.label), split.ratios),
        )
    if isinstance(split, GroupSplit):
        yield _result(Check.GROUPS, assign.check_groups(split_ids, values.codes(split.group)))
    if isinstance(split, TimeSplit):
        yield _result(Check.TIME_ORDER, _time_order(values.orderable(split.column), split_ids))


def run_folds_checks(
    db: LanceDBResource, table: str, data: FoldsData, checks: list[Check]
) -> Iterator[dg.AssetCheckResult]:
    """Evaluate ``checks`` on ``data``, just persisted as folds table ``table`` + training."""
    assert isinstance(data.validation.spec, FoldsSpec)
    spec = data.validation.spec
    base = db.open_table(data.validation.base_table, version=data.validation.base_version)
    row_ids, fold_ids = _columns(data.validation.data)
    train_rows, train_folds = _columns(data.train)
    folds = spec.folds
    k = folds.k
    expected = base.count_rows(spec.filter)

    figures = assign.check_disjoint_cover(fold_ids, expected, num_splits=k, row_ids=row_ids)
    figures = _persisted(db, table, data.validation.num_rows, figures)
    if isinstance(folds, TimeSeriesFolds):  # the earliest block trains but is never validated
        figures["passed"] = (
            figures["duplicate_rows"] == 0
            and figures["extra_rows"] == 0
            and figures["persisted_rows"] == data.validation.num_rows
        )
    yield _result(Check.DISJOINT_COMPLETE, figures)

    complement = not isinstance(folds, TimeSeriesFolds)
    yield _result(
        Check.TRAIN_VALIDATION,
        _train_validation(row_ids, fold_ids, train_rows, train_folds, k, complement=complement),
    )
    if Check.SIZES in checks:
        sizes = np.bincount(fold_ids.astype(np.int64), minlength=k)
        spread = int(sizes.max() - sizes.min())
        yield _result(
            Check.SIZES,
            {"fold_rows": sizes.tolist(), "max_minus_min": spread, "passed": spread <= 1},
        )
    if isinstance(folds, StratifiedKFold):
        labels = _aligned(base, spec.filter, [folds.label], row_ids).codes(folds.label)
        yield _result(Check.STRATIFIED, assign.check_stratified(fold_ids, labels, k))
    if isinstance(folds, GroupKFold):
        groups = _aligned(base, spec.filter, [folds.group], row_ids).codes(folds.group)
        yield _result(Check.GROUPS, assign.check_groups(fold_ids, groups))
    if isinstance(folds, TimeSeriesFolds):
        scanned = scan_columns(base, spec.filter, [folds.column], asset=table)
        yield _result(
            Check.TIME_ORDER,
            _fold_time_order(scanned, folds.column, row_ids, fold_ids, train_rows, train_folds, k),
        )


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


def _needed(split: object) -> list[str]:
    if isinstance(split, StratifiedSplit):
        return [split.label]
    if isinstance(split, GroupSplit):
        return [split.group]
    if isinstance(split, TimeSplit):
        return [split.column]
    return []


def _aligned(base: Table, filter: str | None, columns: list[str], row_ids: np.ndarray) -> Scanned:
    """``columns`` of the rows ``row_ids`` (in that order), from a fresh scan of the base."""
    scanned = scan_columns(base, filter, columns, asset=base.name)
    positions = _positions(scanned.row_ids, row_ids)
    return Scanned(
        row_ids=row_ids,
        columns={c: v.take(pa.array(positions)) for c, v in scanned.columns.items()},
    )


def _positions(scanned_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index into ``scanned_ids`` of each wanted id (a row id outside the scan is an error)."""
    if wanted.size == 0:
        return np.zeros(0, dtype=np.intp)
    # A scan returns row ids ascending; sorting the needles too keeps searchsorted cache-local.
    if scanned_ids.size and not bool(np.all(scanned_ids[1:] >= scanned_ids[:-1])):
        order = np.argsort(scanned_ids, kind="stable")
        return order[_positions(scanned_ids[order], wanted)]
    needles = np.argsort(wanted)
    found = np.empty(wanted.size, dtype=np.intp)
    found[needles] = np.searchsorted(scanned_ids, wanted[needles])
    found = np.minimum(found, max(scanned_ids.size - 1, 0))
    if scanned_ids.size == 0 or not np.array_equal(scanned_ids[found], wanted):
        raise ValueError("the permutation holds row ids that the filter does not select")
    return found


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


def _train_validation(
    row_ids: np.ndarray,
    fold_ids: np.ndarray,
    train_rows: np.ndarray,
    train_folds: np.ndarray,
    k: int,
    *,
    complement: bool,
) -> dict[str, Any]:
    # Sorts and searchsorted only: numpy 2.4's hash-based np.unique/union1d take ~10 s per 8M ids.
    overlap, missing = [], []
    for i in range(k):
        validation = np.sort(row_ids[fold_ids == i])
        train = np.sort(train_rows[train_folds == i])
        overlap.append(int(np.count_nonzero(_member(validation, train))))
        if complement:
            covered = _distinct(np.sort(np.concatenate([train, validation])))
            missing.append(int(row_ids.size - covered) + int(train.size - _distinct(train)))
    figures: dict[str, Any] = {"train_rows_in_own_validation_fold": overlap}
    passed = not any(overlap)
    if complement:
        figures["rows_missing_or_repeated_per_fold"] = missing
        passed = passed and not any(missing)
    figures["passed"] = passed
    return figures


def _member(sorted_haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Which ``needles`` occur in ``sorted_haystack``."""
    if sorted_haystack.size == 0:
        return np.zeros(needles.size, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_haystack, needles), sorted_haystack.size - 1)
    return sorted_haystack[at] == needles


def _distinct(sorted_values: np.ndarray) -> int:
    """Number of distinct values in a sorted array."""
    if sorted_values.size == 0:
        return 0
    return 1 + int(np.count_nonzero(sorted_values[1:] != sorted_values[:-1]))


def _fold_time_order(
    scanned: Scanned,
    column: str,
    row_ids: np.ndarray,
    fold_ids: np.ndarray,
    train_rows: np.ndarray,
    train_folds: np.ndarray,
    k: int,
) -> dict[str, Any]:
    times = scanned.orderable(column)
    validation_times = times[_positions(scanned.row_ids, row_ids)]
    train_times = times[_positions(scanned.row_ids, train_rows)]
    violations, supersets = 0, True
    previous: np.ndarray | None = None
    for i in range(k):
        train = train_times[train_folds == i]
        validation = validation_times[fold_ids == i]
        if train.size and validation.size and not train.max() < validation.min():
            violations += 1
        ids = np.sort(train_rows[train_folds == i])
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
    keys = list(split.columns)
    now = _keyed(base, spec.filter, keys, row_ids, split_ids)
    if previous is None:
        added = np.bincount(split_ids.astype(np.int64), minlength=len(names))
        return {
            "previous_version": None,
            "rows_moved_between_splits": 0,
            **{f"rows_added/{n}": int(a) for n, a in zip(names, added, strict=True)},
            "passed": True,
        }
    prev_table, prev_base, prev_filter = previous
    prev_data = prev_table.to_arrow()
    before = _keyed(
        prev_base,
        prev_filter,
        keys,
        prev_data.column("row_id").to_numpy(),
        prev_data.column("split_id").to_numpy(),
    )
    joined = now.join(before, keys=keys, join_type="left outer", right_suffix="_before")
    split_now = joined.column("split").to_numpy(zero_copy_only=False)
    was = joined.column("split_before")
    known = ~np.asarray(was.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    was_values = was.fill_null(0).to_numpy(zero_copy_only=False)
    moved = int(np.count_nonzero(known & (split_now != was_values)))
    added = np.bincount(split_now[~known].astype(np.int64), minlength=len(names))
    return {
        "previous_version": version - 1,
        "keys_compared": int(np.count_nonzero(known)),
        "rows_moved_between_splits": moved,
        **{f"rows_added/{n}": int(a) for n, a in zip(names, added, strict=True)},
        "passed": moved == 0,
    }


def _previous_permutation(
    db: LanceDBResource, table: str, version: int
) -> tuple[Table, Table, str | None] | None:
    """The version before ``version`` of ``table`` with its base, if it was a hash split."""
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
    return previous, base, spec.filter


def _keyed(
    base: Table, filter: str | None, keys: list[str], row_ids: np.ndarray, split_ids: np.ndarray
) -> pa.Table:
    """One row per distinct key: its split (keys of one hash always share a split)."""
    values = _aligned(base, filter, keys, row_ids)
    table = pa.table({**{k: values.columns[k] for k in keys}, "split": pa.array(split_ids)})
    grouped = table.group_by(keys).aggregate([("split", "min")])
    return grouped.select([*keys, "split_min"]).rename_columns([*keys, "split"])
