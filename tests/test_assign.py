"""Split assignment: every documented guarantee, checked exactly, and against scikit-learn.

Ratios are drawn as whole weights ``w`` (``ratios = w / sum(w)``), so exact shares are rationals
and their floor/ceil are computed with integers, never with floats.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold, TimeSeriesSplit

from perm_assets.assign import (
    TimeFold,
    apportion,
    check_disjoint_cover,
    check_groups,
    check_ratios,
    check_stratified,
    group_kfold,
    group_split,
    kfold,
    stratified_group_split,
    stratified_kfold,
    stratified_split,
    time_series_folds,
    time_split,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IntArray = npt.NDArray[np.int64]


# --- helpers ---------------------------------------------------------------------------------


def ratios_of(weights: Sequence[int]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def share_bounds(weights: Sequence[int], sizes: npt.ArrayLike) -> tuple[IntArray, IntArray]:
    """floor and ceil of ``w[s] * size / sum(w)`` in integers, shape ``sizes.shape + (S,)``."""
    w = np.asarray(weights, dtype=np.int64)
    num = np.multiply.outer(np.asarray(sizes, dtype=np.int64), w)
    total = int(w.sum())
    return num // total, -(-num // total)


def cell_counts(ids: npt.ArrayLike, labels: npt.ArrayLike, splits: int) -> IntArray:
    """Rows per (class, split), classes in sorted order."""
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    ids64 = np.asarray(ids).astype(np.int64)
    classes = int(codes.max()) + 1 if codes.size else 0
    return np.bincount(codes * splits + ids64, minlength=classes * splits).reshape(classes, splits)


def groups_in_one_split(ids: npt.ArrayLike, groups: npt.ArrayLike) -> bool:
    pairs = np.unique(np.stack([np.unique(groups, return_inverse=True)[1], ids]), axis=1)
    return pairs.shape[1] == np.unique(groups).size


def half(m: int) -> int:
    return m // 2


weights_st = st.lists(st.integers(1, 9), min_size=1, max_size=5)
seeds_st = st.integers(0, 2**32)


@st.composite
def labelled(draw: st.DrawFn, max_rows: int = 300) -> np.ndarray:
    classes = draw(st.integers(1, 12))
    return np.array(draw(st.lists(st.integers(0, classes - 1), max_size=max_rows)), dtype=np.int64)


# --- apportion -------------------------------------------------------------------------------


@FAST
@given(n=st.integers(0, 10**7), weights=weights_st)
def test_apportion_sums_to_n_and_rounds_each_share(n: int, weights: list[int]) -> None:
    counts = apportion(n, ratios_of(weights))
    lo, hi = share_bounds(weights, n)
    assert counts.sum() == n
    assert ((lo <= counts) & (counts <= hi)).all()


def test_apportion_gives_extra_rows_to_largest_remainders_then_lower_splits() -> None:
    assert apportion(10, [0.5, 0.25, 0.25]).tolist() == [5, 3, 2]
    assert apportion(7, [0.7, 0.2, 0.1]).tolist() == [5, 1, 1]  # 4.9, 1.4, 0.7
    assert apportion(100, [0.29, 0.71]).tolist() == [29, 71]  # 0.29 * 100 is 28.99.. in floats
    assert apportion(3_000_000, [1 / 3, 1 / 3, 1 / 3]).tolist() == [1_000_000] * 3


# --- stratified_split ------------------------------------------------------------------------


def assert_stratified(ids: np.ndarray, labels: np.ndarray, weights: Sequence[int]) -> None:
    """Every (class, split) count and every split total is floor or ceil of its exact share."""
    splits = len(weights)
    assert ids.dtype == np.uint64 and ids.shape == labels.shape
    assert (ids < splits).all()
    cells = cell_counts(ids, labels, splits)
    lo, hi = share_bounds(weights, cells.sum(axis=1))
    assert ((lo <= cells) & (cells <= hi)).all()
    lo_total, hi_total = share_bounds(weights, labels.size)
    totals = np.bincount(ids.astype(np.int64), minlength=splits)
    assert ((lo_total <= totals) & (totals <= hi_total)).all()


@FAST
@given(labels=labelled(), weights=weights_st, seed=seeds_st)
def test_stratified_split_rounds_every_class_and_every_split(
    labels: np.ndarray, weights: list[int], seed: int
) -> None:
    ids = stratified_split(labels, ratios_of(weights), seed)
    assert_stratified(ids, labels, weights)
    assert np.array_equal(ids, stratified_split(labels, ratios_of(weights), seed))
    assert check_stratified(ids, labels, ratios_of(weights))["passed"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("classes", "ratios_weights"),
    [(50_000, [9, 7, 4]), (20_000, [1, 1]), (5_000, [3, 2, 2, 2, 1]), (3, [7, 2, 1])],
)
def test_stratified_split_many_small_classes_keeps_split_totals(
    seed: int, classes: int, ratios_weights: list[int]
) -> None:
    # Many tiny classes: per-class rounding alone would drift the totals by ~sqrt(classes).
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 4 * classes + 7)
    ids = stratified_split(labels, ratios_of(ratios_weights), seed)
    assert_stratified(ids, labels, ratios_weights)


def test_stratified_split_string_labels_and_float_ratios() -> None:
    labels = np.array(["cat", "dog", "dog", "eel"] * 25 + ["dog"])
    ids = stratified_split(labels, [0.7, 0.2, 0.1], seed=7)
    assert_stratified(ids, labels, [7, 2, 1])


@pytest.mark.parametrize(
    "decimals",
    [["0.29", "0.71"], ["0.7", "0.2", "0.1"], ["0.29", "0.57", "0.14"], ["0.35", "0.35", "0.3"]],
)
def test_stratified_split_decimal_ratios_mean_their_decimal_shares(decimals: list[str]) -> None:
    # 0.29 * 100 is 28.999999999999996 in floats; split 0 of 100 rows must still get 29.
    exact = [Fraction(d) for d in decimals]
    weights = [int(f * 100) for f in exact]
    labels = np.repeat([0, 1, 2, 3], 25)
    for seed in range(50):
        ids = stratified_split(labels, [float(d) for d in decimals], seed)
        assert_stratified(ids, labels, weights)


def test_stratified_split_within_a_class_rows_are_random() -> None:
    # One class of 10 rows, half to each split: over 400 seeds every row lands in split 0
    # about half of the time (a fixed pattern would give 0 or 400).
    labels = np.zeros(10, dtype=np.int64)
    in_first = np.sum([stratified_split(labels, [0.5, 0.5], s) == 0 for s in range(400)], axis=0)
    assert ((in_first > 140) & (in_first < 260)).all(), in_first


# --- group_split -----------------------------------------------------------------------------


@st.composite
def grouped(draw: st.DrawFn) -> np.ndarray:
    """Group key per row: up to 60 groups of 1..20 rows, rows shuffled."""
    sizes = draw(st.lists(st.integers(1, 20), min_size=1, max_size=60))
    groups = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)
    return np.random.default_rng(len(sizes)).permutation(groups)


def assert_cut_bound(counts: np.ndarray, targets: np.ndarray, largest: int) -> None:
    """Cumulative counts within floor(m/2) of cumulative targets, so each within 2*floor(m/2)."""
    assert (np.abs(np.cumsum(counts) - np.cumsum(targets)) <= half(largest)).all()
    assert (np.abs(counts - targets) <= 2 * half(largest)).all()


@FAST
@given(groups=grouped(), weights=weights_st, seed=seeds_st)
def test_group_split_keeps_groups_whole_and_sizes_near_targets(
    groups: np.ndarray, weights: list[int], seed: int
) -> None:
    ids = group_split(groups, ratios_of(weights), seed)
    assert ids.dtype == np.uint64 and ids.shape == groups.shape
    assert groups_in_one_split(ids, groups)
    assert check_groups(ids, groups)["groups_in_several_splits"] == 0
    counts = np.bincount(ids.astype(np.int64), minlength=len(weights))
    largest = int(np.unique(groups, return_counts=True)[1].max())
    assert_cut_bound(counts, apportion(groups.size, ratios_of(weights)), largest)
    assert np.array_equal(ids, group_split(groups, ratios_of(weights), seed))


@pytest.mark.parametrize("seed", [0, 5])
def test_group_split_of_single_row_groups_is_exact(seed: int) -> None:
    groups = np.array([f"user{i}" for i in range(1001)])
    ids = group_split(groups, [0.6, 0.3, 0.1], seed)
    assert np.bincount(ids.astype(np.int64)).tolist() == apportion(1001, [0.6, 0.3, 0.1]).tolist()


# --- stratified_group_split ------------------------------------------------------------------


@FAST
@given(groups=grouped(), classes=st.integers(1, 4), weights=weights_st, seed=seeds_st)
def test_stratified_group_split_single_label_groups(
    groups: np.ndarray, classes: int, weights: list[int], seed: int
) -> None:
    labels = (groups // 7) % classes  # one label per group
    ids = stratified_group_split(labels, groups, ratios_of(weights), seed)
    assert ids.dtype == np.uint64 and ids.shape == groups.shape
    assert groups_in_one_split(ids, groups)
    splits = len(weights)
    cells = cell_counts(ids, labels, splits)
    lo, hi = share_bounds(weights, cells.sum(axis=1))
    for c, label in enumerate(np.unique(labels)):
        # m_c: the largest group of class c; bound floor/ceil of the share -/+ 2 * floor(m_c / 2).
        m = int(np.unique(groups[labels == label], return_counts=True)[1].max())
        assert (lo[c] - 2 * half(m) <= cells[c]).all() and (cells[c] <= hi[c] + 2 * half(m)).all()


@FAST
@given(labels=labelled(max_rows=200), weights=weights_st, seed=seeds_st)
def test_stratified_group_split_single_row_groups_is_stratified_exactly(
    labels: np.ndarray, weights: list[int], seed: int
) -> None:
    ids = stratified_group_split(labels, np.arange(labels.size), ratios_of(weights), seed)
    assert_stratified(ids, labels, weights)


@FAST
@given(groups=grouped(), seed=seeds_st)
def test_stratified_group_split_mixed_label_groups_stay_whole(
    groups: np.ndarray, seed: int
) -> None:
    labels = np.random.default_rng(seed % 1000).integers(0, 3, groups.size)
    ids = stratified_group_split(labels, groups, [0.5, 0.3, 0.2], seed)
    assert groups_in_one_split(ids, groups)
    assert np.array_equal(ids, stratified_group_split(labels, groups, [0.5, 0.3, 0.2], seed))


def test_stratified_group_split_rejects_different_lengths() -> None:
    with pytest.raises(ValueError, match="labels has 3 rows but groups has 2"):
        stratified_group_split([0, 1, 0], [1, 2], [0.5, 0.5], 0)


# --- kfold -----------------------------------------------------------------------------------


def sklearn_test_folds(splitter: Any, *args: object) -> list[np.ndarray]:
    return [test for _, test in splitter.split(*args)]


def our_test_folds(ids: np.ndarray, k: int) -> list[np.ndarray]:
    return [np.flatnonzero(ids == f) for f in range(k)]


@FAST
@given(n=st.integers(2, 400), data=st.data(), seed=seeds_st)
def test_kfold_matches_sklearn(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(2, n))
    ours = our_test_folds(kfold(n, k, seed, shuffle=False), k)
    theirs = sklearn_test_folds(KFold(k), np.zeros(n))
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    shuffled = kfold(n, k, seed, shuffle=True)
    assert shuffled.dtype == np.uint64
    sizes = np.bincount(shuffled.astype(np.int64), minlength=k)
    assert sizes.tolist() == [len(t) for t in theirs]  # ceil(n/k) for the first n % k folds
    assert np.array_equal(shuffled, kfold(n, k, seed, shuffle=True))


# --- stratified_kfold ------------------------------------------------------------------------


@FAST
@given(labels=labelled(), data=st.data(), seed=seeds_st)
def test_stratified_kfold_guarantees_and_sklearn_equality(
    labels: np.ndarray, data: st.DataObject, seed: int
) -> None:
    n = labels.size
    if n < 2:
        return
    k = data.draw(st.integers(2, min(n, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small classes: both warn, tested below
        plain = stratified_kfold(labels, k, shuffle=False)
        shuffled = stratified_kfold(labels, k, seed, shuffle=True)
        try:
            theirs = sklearn_test_folds(StratifiedKFold(k), np.zeros(n), labels)
        except ValueError:  # sklearn refuses when every class is smaller than k
            theirs = None
    if theirs is not None:
        assert all(
            np.array_equal(a, b) for a, b in zip(our_test_folds(plain, k), theirs, strict=True)
        )
    for ids in (plain, shuffled):
        cells = cell_counts(ids, labels, k)
        per_class = cells.sum(axis=1, keepdims=True)
        assert ((per_class // k <= cells) & (cells <= -(-per_class // k))).all()
        sizes = np.bincount(ids.astype(np.int64), minlength=k)
        assert sizes.tolist() == [n // k + (f < n % k) for f in range(k)]


@pytest.mark.parametrize("seed", [0, 1])
def test_stratified_kfold_many_classes_shuffled(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.r_[np.repeat(np.arange(3000), 7), rng.integers(0, 3000, 20_000)])
    ids = stratified_kfold(labels, 7, seed)
    cells = cell_counts(ids, labels, 7)
    per_class = cells.sum(axis=1, keepdims=True)
    assert ((per_class // 7 <= cells) & (cells <= -(-per_class // 7))).all()
    assert check_stratified(ids, labels, 7)["passed"]


def test_stratified_kfold_small_classes_warn_or_raise() -> None:
    labels = np.array(["a"] * 10 + ["b"] * 2 + ["c"])
    with pytest.warns(UserWarning, match=r"2 class\(es\).*k=3.*'b' \(2 rows\), 'c' \(1 rows\)"):
        stratified_kfold(labels, 3)
    with pytest.raises(ValueError, match=r"fewer rows than k=3.*use a smaller k"):
        stratified_kfold(labels, 3, on_small_class="error")


# --- group_kfold -----------------------------------------------------------------------------


@FAST
@given(groups=grouped(), data=st.data(), seed=seeds_st, shuffle=st.booleans())
def test_group_kfold_groups_whole_and_balanced(
    groups: np.ndarray, data: st.DataObject, seed: int, shuffle: bool
) -> None:
    sizes = np.unique(groups, return_counts=True)[1]
    if sizes.size < 2:
        return
    k = data.draw(st.integers(2, sizes.size))
    ids = group_kfold(groups, k, seed, shuffle)
    assert ids.dtype == np.uint64 and groups_in_one_split(ids, groups)
    fold_rows = np.bincount(ids.astype(np.int64), minlength=k)
    assert (fold_rows > 0).all()
    assert fold_rows.max() - fold_rows.min() <= sizes.max()
    if sizes.size % k == 0:
        assert fold_rows.max() - fold_rows.min() <= sizes.max() - sizes.min()
    # sklearn's GroupKFold promises the same: each group in exactly one test fold.
    theirs = sklearn_test_folds(GroupKFold(k), np.zeros(groups.size), None, groups)
    assert all(groups_in_one_split(np.isin(np.arange(groups.size), t), groups) for t in theirs)


def test_group_kfold_needs_k_groups_like_sklearn() -> None:
    groups = np.array([1, 1, 2, 3])
    with pytest.raises(ValueError, match=r"k=4 folds but only 3 distinct groups.*k <= 3"):
        group_kfold(groups, 4)
    with pytest.raises(ValueError):
        sklearn_test_folds(GroupKFold(4), np.zeros(4), None, groups)


# --- time_series_folds -----------------------------------------------------------------------


@st.composite
def ts_params(draw: st.DrawFn) -> tuple[int, int, int, int | None, int | None]:
    n = draw(st.integers(3, 120))
    k = draw(st.integers(2, 8))
    gap = draw(st.integers(0, 10))
    test_size = draw(st.none() | st.integers(1, 30))
    max_train = draw(st.none() | st.integers(1, 60))
    return n, k, gap, test_size, max_train


@FAST
@given(params=ts_params(), seed=seeds_st)
def test_time_series_folds_equal_sklearn_for_distinct_times(
    params: tuple[int, int, int, int | None, int | None], seed: int
) -> None:
    n, k, gap, test_size, max_train = params
    times = np.random.default_rng(seed).permutation(n) * 1.5 - 10  # distinct, shuffled
    splitter = TimeSeriesSplit(k, gap=gap, test_size=test_size, max_train_size=max_train)
    try:
        theirs = list(splitter.split(np.zeros(n)))
    except ValueError:
        with pytest.raises(ValueError):
            time_series_folds(times, k, gap, test_size, max_train)
        return
    folds = time_series_folds(times, k, gap, test_size, max_train)
    order = np.argsort(times, kind="stable")
    assert len(folds) == len(theirs) == k
    for fold, (train, test) in zip(folds, theirs, strict=True):
        assert np.array_equal(fold.train(), order[train])
        assert np.array_equal(fold.test(), order[test])


@FAST
@given(params=ts_params(), distinct=st.integers(1, 30), seed=seeds_st)
def test_time_series_folds_never_split_ties(
    params: tuple[int, int, int, int | None, int | None], distinct: int, seed: int
) -> None:
    n, k, gap, test_size, max_train = params
    times = np.random.default_rng(seed).integers(0, distinct, n)
    try:
        folds = time_series_folds(times, k, gap, test_size, max_train)
    except ValueError as exc:
        assert "folds" in str(exc) or "empty" in str(exc)
        return
    for i, fold in enumerate(folds):
        train, test = times[fold.train()], times[fold.test()]
        assert train.size > 0 and test.size > 0
        assert train.max() < test.min()
        assert fold.gap_rows >= gap
        gap_times = times[fold.order[fold.train_end : fold.test_start]]
        assert not np.isin(gap_times, train).any() and not np.isin(gap_times, test).any()
        if max_train is not None:
            assert train.size <= max_train
        if i:
            previous = folds[i - 1]
            assert previous.test_end == fold.test_start
            assert times[previous.test()].max() < test.min()
            if max_train is None:
                assert fold.train_start == 0 and fold.train_end >= previous.train_end
    assert folds[-1].test_end == n


def test_time_series_folds_datetimes_and_fold_objects() -> None:
    times = np.array(["2024-01-03", "2024-01-01", "2024-01-02", "2024-01-04"], "datetime64[D]")
    folds = time_series_folds(times, 3)
    assert folds[0] == TimeFold(0, 1, 1, 2, order=np.array([], dtype=np.intp))  # order ignored
    assert folds[0].train().tolist() == [1] and folds[0].test().tolist() == [2]
    assert folds[2].test().tolist() == [3]


def test_time_series_folds_reports_ties_that_empty_a_fold() -> None:
    times = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"fold 0's test set is empty.*sharing a timestamp"):
        time_series_folds(times, 3)


# --- time_split ------------------------------------------------------------------------------


@FAST
@given(n=st.integers(0, 300), distinct=st.integers(1, 400), weights=weights_st, seed=seeds_st)
def test_time_split_orders_splits_in_time(
    n: int, distinct: int, weights: list[int], seed: int
) -> None:
    times = np.random.default_rng(seed).integers(0, distinct, n).astype(np.float64)
    ids = time_split(times, ratios_of(weights))
    assert ids.dtype == np.uint64 and ids.shape == times.shape
    present = [times[ids == s] for s in range(len(weights)) if (ids == s).any()]
    assert all(a.max() < b.min() for a, b in itertools.pairwise(present))
    counts = np.bincount(ids.astype(np.int64), minlength=len(weights))
    ties = int(np.unique(times, return_counts=True)[1].max()) if n else 0
    assert_cut_bound(counts, apportion(n, ratios_of(weights)), ties)


def test_time_split_distinct_times_exact_sizes() -> None:
    times = np.random.default_rng(3).permutation(1000)
    ids = time_split(times, [0.7, 0.15, 0.15])
    assert np.bincount(ids.astype(np.int64)).tolist() == [700, 150, 150]
    assert np.array_equal(ids[np.argsort(times)], np.sort(ids))


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kfold(10, 1), r"k=1: cross-validation needs at least 2 folds"),
        (lambda: kfold(3, 4), r"k=4 folds but only 3 rows.*k <= 3"),
        (lambda: kfold(10, True), r"k=True must be a whole number"),  # type: ignore[arg-type]
        (lambda: stratified_kfold([0, 1], 3), r"k=3 folds but only 2 rows"),
        (lambda: stratified_split([1, 2], [0.7, 0.4], 0), r"sum to 1\.1; they must sum to 1"),
        (lambda: stratified_split([1, 2], [1.5, -0.5], 0), r"\[1\.5, -0\.5\].*in \(0, 1\]"),
        (lambda: stratified_split([1, 2], [], 0), r"ratios is empty"),
        (lambda: group_split([1, 2], [1.0], -1), r"seed=-1 must be a whole number >= 0"),
        (
            lambda: stratified_split(np.array([1.0, np.nan, np.nan]), [1.0], 0),
            r'labels has 2 NaN value\(s\) among 3 rows.*filter="NOT isnan\(label\)"',
        ),
        (
            lambda: group_split(np.array(["a", None, "b"], dtype=object), [1.0], 0),
            r'groups has 1 null value\(s\).*filter="group IS NOT NULL"',
        ),
        (
            lambda: stratified_kfold(np.array([1, float("nan"), 2, 2], dtype=object), 2),
            r"labels has 1 null value",
        ),
        (
            lambda: time_split(np.array(["2024-01-01", "NaT"], "datetime64[D]"), [1.0]),
            r'times has 1 null value\(s\).*filter="time IS NOT NULL"',
        ),
        (lambda: group_kfold(np.zeros((2, 2)), 2), r"one-dimensional array, got shape \(2, 2\)"),
        (
            lambda: stratified_split(np.array(["a", 1], dtype=object), [1.0], 0),
            r"labels cannot be sorted.*one type",
        ),
        (lambda: time_series_folds(np.arange(5), 2, gap=-1), r"gap=-1 must be >= 0"),
        (lambda: time_series_folds(np.arange(5), 1), r"k=1 must be a whole number of folds"),
        (lambda: time_series_folds(np.arange(3), 3), r"at least k \+ 1 = 4 rows, got 3"),
        (
            lambda: time_series_folds(np.arange(10), 3, test_size=3, gap=1),
            r"k=3 folds of test_size=3 rows with gap=1 need more than 10 rows, got 10",
        ),
        (lambda: stratified_kfold([0, 1, 0, 1], 2, on_small_class="x"), r"must be \"warn\""),  # type: ignore[arg-type]
    ],
)
def test_errors_name_the_value_and_what_is_allowed(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- checks ----------------------------------------------------------------------------------


def test_check_disjoint_cover() -> None:
    ok = check_disjoint_cover(np.array([0, 1, 1], np.uint64), 3, num_splits=2)
    assert ok["passed"] and ok["rows"] == 3 and ok["missing_rows"] == 0
    bad = check_disjoint_cover(
        np.array([0, 1, 2, 0], np.uint64), 5, num_splits=2, row_ids=np.array([7, 8, 8, 9])
    )
    assert (bad["duplicate_rows"], bad["missing_rows"], bad["out_of_range_ids"]) == (1, 2, 1)
    assert not bad["passed"]
    assert check_disjoint_cover(np.zeros(4, np.uint64), 3)["extra_rows"] == 1


def test_check_ratios() -> None:
    ids = np.array([0] * 8 + [1] * 2 + [2], dtype=np.uint64)
    res = check_ratios(ids, [0.8, 0.2], tolerance_rows=1)
    assert res["split_rows"] == [8, 2] and res["rows_outside_splits"] == 1
    assert res["expected_rows"] == [8.8, 2.2] and res["max_deviation_rows"] == pytest.approx(0.8)
    assert not res["passed"]  # a row outside the splits
    assert check_ratios(ids[:10], [0.8, 0.2], tolerance_rows=0)["passed"]
    # Ratios summing below 1 (rows discarded on purpose): shares of the kept rows, or of
    # total_rows when given.
    kept = np.array([0] * 5 + [1] * 3, dtype=np.uint64)
    assert check_ratios(kept, [0.5, 0.3], tolerance_rows=0)["expected_rows"] == [5.0, 3.0]
    of_all = check_ratios(kept, [0.5, 0.3], tolerance_rows=0, total_rows=12)
    assert of_all["expected_rows"] == [6.0, 3.6] and not of_all["passed"]


def test_check_stratified() -> None:
    labels = np.array(["a"] * 4 + ["b"] * 4)
    ids = np.array([0, 0, 0, 1, 0, 1, 0, 1], dtype=np.uint64)
    res = check_stratified(ids, labels, 2)
    assert res["max_deviation_rows"] == 1.0 and res["worst_class"] == "a"
    assert res["worst_split"] == 0 and not res["passed"]
    assert check_stratified(ids, labels, [0.5, 0.5], tolerance_rows=0.5)["passed"]


def test_check_groups() -> None:
    groups = np.array(["u1", "u1", "u2", "u2", "u3"])
    res = check_groups(np.array([0, 1, 0, 0, 1], np.uint64), groups)
    assert res == {
        "groups": 3,
        "groups_in_several_splits": 1,
        "rows_in_such_groups": 2,
        "example_groups": ["u1"],
        "passed": False,
    }


def test_checks_return_json_metadata() -> None:
    labels = np.random.default_rng(0).integers(0, 5, 500)
    ids = stratified_kfold(labels, 5, seed=1)
    for figures in (
        check_disjoint_cover(ids, 500, num_splits=5),
        check_ratios(ids, [0.2] * 5, tolerance_rows=1),
        check_stratified(ids, labels, 5),
        check_groups(ids, labels),
    ):
        json.dumps(figures)
