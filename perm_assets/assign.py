"""Vectorised split assignment: stratified, grouped and time-ordered splits and k-folds.

Pure numpy, no I/O. Inputs are the needed columns (labels, groups, times) of the already
filtered rows, as 1-D arrays of length ``n``; outputs are ``uint64`` split ids, one per row, in
row order (``out[i]`` is the split of row ``i``), ready to pair with the row ids in a permutation
table. Work is done with sorts, ``bincount`` and ``cumsum``: no Python loop runs over rows,
classes or groups, only over splits or folds.

Random choices use ``np.random.default_rng(seed)``: the same inputs and seed give the same ids.

Ratios are normalised to sum to exactly 1 and then ``r[s] * n`` is the *exact share* of split
``s``; a share within a relative 1e-11 of a whole number counts as that number, so float ratios
such as 0.7 or 1/3 behave as the fractions they stand for. ``floor``/``ceil`` below are of the
exact share.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "TimeFold",
    "apportion",
    "check_disjoint_cover",
    "check_groups",
    "check_ratios",
    "check_stratified",
    "group_kfold",
    "group_split",
    "kfold",
    "stratified_counts",
    "stratified_group_split",
    "stratified_kfold",
    "stratified_kfold_counts",
    "stratified_split",
    "time_series_folds",
    "time_split",
]

SplitIds = npt.NDArray[np.uint64]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Codes = npt.NDArray[np.unsignedinteger[Any]]
Positions = npt.NDArray[np.signedinteger[Any]]

# Ratios that are meant to sum to 1 but were written as e.g. [0.7, 0.2, 0.1] (as in specs.py).
_RATIO_TOLERANCE = 1e-9
# A float share this close (relative) to a whole number is that number: 0.29 * 100 is
# 28.999999999999996 in floats, and the user meant 29. Float error is ~1e-16 relative; a share
# p * n / q that is not whole is >= 1/q from one, beyond this tolerance while q * share < 1e11
# (e.g. percentages of up to 1e9 rows).
_SNAP = 1e-11
# Integer keys whose range is at most this many times the row count are factorised with
# bincount (O(n + range)) instead of a sort (O(n log n)).
_DENSE_RANGE_FACTOR = 2
# Values shown in error messages and check metadata.
_SHOW = 10


# ---------------------------------------------------------------------------------------------
# Validation and factorising
# ---------------------------------------------------------------------------------------------


def _as_1d(values: npt.ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a one-dimensional array, got shape {arr.shape}")
    return arr


def _reject_nulls(arr: np.ndarray, what: str, column: str) -> None:
    """Raise if ``arr`` has NaN/NaT (numeric, datetime) or None/NaN (object) entries."""
    kind = arr.dtype.kind
    if kind in "fc":
        nulls = np.isnan(arr)
    elif kind in "mM":
        nulls = np.isnat(arr)
    elif kind == "O":
        # Elementwise in C: None == None, and NaN is the one value unequal to itself.
        nulls = np.equal(arr, np.array(None, dtype=object)) | np.not_equal(arr, arr)
    else:
        return
    count = int(np.count_nonzero(nulls))
    if count and kind in "fc":  # NaN is no null to SQL: "IS NOT NULL" keeps it
        raise ValueError(
            f"{what} has {count} NaN value(s) among {arr.size} rows; every row needs a "
            f'value, so filter them out first, e.g. filter="NOT isnan({column})" (with your '
            "column's name; IS NOT NULL keeps NaN, which SQL does not count as null)"
        )
    if count:
        raise ValueError(
            f"{what} has {count} null value(s) (None, NaN or NaT) among {arr.size} rows; every "
            f'row needs one, so filter them out first, e.g. filter="{column} IS NOT NULL" '
            "(with your column's name)"
        )


def _code_dtype(num: int) -> type[np.unsignedinteger[Any]]:
    # The narrowest codes: numpy's stable argsort is a radix sort for 8- and 16-bit keys.
    if num <= 1 << 8:
        return np.uint8
    if num <= 1 << 16:
        return np.uint16
    return np.uint32


def _factorize(values: npt.ArrayLike, what: str, column: str) -> tuple[Codes, np.ndarray, IntArray]:
    """``(codes, uniques, counts)``: ``uniques[codes]`` equals the values; uniques sorted."""
    arr = _as_1d(values, what)
    _reject_nulls(arr, what, column)
    n = arr.size
    if arr.dtype.kind in "biu" and n:
        lo, hi = arr.min(), arr.max()
        span = int(hi) - int(lo)
        if span <= _DENSE_RANGE_FACTOR * n + 1024:
            # Dense integer keys (labels 0..9, ids 0..n): one bincount pass, no sort.
            if arr.dtype.kind == "u":
                offset = (arr - lo).astype(np.intp)
            else:
                offset = arr.astype(np.int64, copy=False)
                offset = offset - int(lo) if int(lo) else offset
            present = np.bincount(offset, minlength=span + 1)
            seen = np.flatnonzero(present)
            # Narrow the lookup table first, so the n-row gather writes narrow codes directly.
            remap = (np.cumsum(present > 0) - 1).astype(_code_dtype(seen.size))
            codes = remap[offset]
            if arr.dtype.kind == "u":
                uniques = seen.astype(arr.dtype) + lo
            else:
                uniques = (seen + int(lo)).astype(arr.dtype)
            return codes, uniques, present[seen].astype(np.int64)
    try:
        uniques, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
    except TypeError as exc:  # e.g. an object array mixing str and int
        raise ValueError(
            f"{what} cannot be sorted ({exc}); give values of one type, e.g. all str or all int"
        ) from exc
    codes = inverse.reshape(-1).astype(_code_dtype(uniques.size))
    return codes, uniques, counts.astype(np.int64)


def _normalised_ratios(ratios: Sequence[float], *, below_one: bool = False) -> FloatArray:
    """Validate ``ratios`` (each in (0, 1], sum 1, or <= 1 if ``below_one``) and return them
    scaled to sum to exactly 1."""
    values = [float(r) for r in ratios]
    if not values:
        raise ValueError("ratios is empty; give one fraction per split, e.g. [0.8, 0.2]")
    bad = [r for r in values if not math.isfinite(r) or r <= 0 or r > 1]
    if bad:
        raise ValueError(f"ratios {values} has {bad}; every ratio must be a number in (0, 1]")
    total = math.fsum(values)
    if total > 1 + _RATIO_TOLERANCE or (total < 1 - _RATIO_TOLERANCE and not below_one):
        raise ValueError(f"ratios {values} sum to {total:g}; they must sum to 1")
    return np.asarray(values, dtype=np.float64) / total


def _check_k(k: int, n: int, what: str = "rows") -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k={k!r} must be a whole number of folds >= 2")
    k = int(k)
    if k < 2:
        raise ValueError(f"k={k}: cross-validation needs at least 2 folds, use k >= 2")
    if k > n:
        raise ValueError(
            f"k={k} folds but only {n} {what}; every fold needs at least one, so use k <= {n}"
        )
    return k


def _check_seed(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a whole number >= 0")
    return np.random.default_rng(int(seed))


def _show(values: np.ndarray) -> list[Any]:
    """Up to ``_SHOW`` values as plain Python objects (for messages and metadata)."""
    return [v if isinstance(v, int | float | str) else str(v) for v in values[:_SHOW].tolist()]


# ---------------------------------------------------------------------------------------------
# Shared arithmetic
# ---------------------------------------------------------------------------------------------


def _shares(sizes: npt.ArrayLike, ratios: FloatArray) -> FloatArray:
    """Exact shares ``sizes * ratios`` (outer product), near-whole numbers made whole."""
    x = np.multiply.outer(np.asarray(sizes, dtype=np.float64), ratios)
    whole = np.rint(x)
    return np.where(np.abs(x - whole) <= _SNAP * np.maximum(1.0, np.abs(x)), whole, x)


def apportion(n: int, ratios: Sequence[float]) -> IntArray:
    """Whole row counts per split: largest-remainder apportionment of ``n`` rows.

    Guarantee: counts sum to exactly ``n`` and each is ``floor`` or ``ceil`` of
    ``ratios[s] * n``; the extra rows go to the largest fractional parts (ties: lower split).
    E.g. ``apportion(10, [0.5, 0.25, 0.25])`` is ``[5, 3, 2]``.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    r = _normalised_ratios(ratios)
    shares = _shares(n, r)
    counts = np.floor(shares).astype(np.int64)
    extra = int(n - counts.sum())
    # Stable sort: equal remainders favour the lower split index, deterministically.
    counts[np.argsort(counts - shares, kind="stable")[:extra]] += 1
    return counts


def _round_matrix(sizes: IntArray, ratios: FloatArray, rng: np.random.Generator) -> IntArray:
    """Controlled rounding of ``sizes ⊗ ratios`` (strata x splits) to whole numbers.

    Returns ``K`` with every ``K[c, s]`` floor or ceil of ``ratios[s] * sizes[c]``, rows summing
    to ``sizes`` exactly and every column sum floor or ceil of ``ratios[s] * sizes.sum()``. Such
    a rounding always exists (it is an integral flow: the fractional shares are a feasible flow
    of the same network); it is found in two vectorised steps:

    1. per stratum, systematic sampling with a random start picks which splits get the
       stratum's leftover rows: exactly the right number, at most one per split, only where the
       share is fractional, with probability equal to the fractional part;
    2. split totals outside their floor/ceil are repaired by moving leftovers between splits
       along shortest augmenting paths in the splits' graph (S nodes), a batch of strata at a
       time; each move keeps step 1's properties and reduces the total violation.
    """
    num, splits = sizes.size, ratios.size
    shares = _shares(sizes, ratios)
    base = np.floor(shares).astype(np.int64)
    frac = shares - base
    eligible = frac > 0
    leftover = sizes - base.sum(axis=1)
    if num == 0 or not leftover.any():
        return base

    # Step 1. Hits of u + 0, u + 1, ... on the stratum's cumulative fractions: the cumulative
    # ends at exactly `leftover` from the last eligible split on (float sums may be off by an ulp,
    # which must neither lose a row nor put one where the share is already whole).
    cum = np.minimum(np.cumsum(frac, axis=1), leftover[:, None].astype(np.float64))
    last_eligible = splits - 1 - np.argmax(eligible[:, ::-1], axis=1)
    tail = np.arange(splits)[None, :] >= last_eligible[:, None]
    cum = np.where(tail, leftover[:, None].astype(np.float64), cum)
    hits = np.floor(cum + rng.random(num)[:, None])
    extra = np.diff(hits, axis=1, prepend=0.0) > 0
    if (extra.sum(axis=1) != leftover).any() or (extra & ~eligible).any():
        raise RuntimeError("controlled rounding: systematic sampling lost or misplaced a row")

    # Step 2. Bounds on the leftovers each split must receive in total.
    totals = _shares(sizes.sum(), ratios)
    base_cols = base.sum(axis=0)
    lo = np.floor(totals).astype(np.int64) - base_cols
    hi = np.ceil(totals).astype(np.int64) - base_cols
    priority = rng.random(num)  # which strata move first: random, fixed
    deg = extra.sum(axis=0)
    # Each pass cuts the violation by >= 1, so this many passes always suffice.
    for _ in range(int(np.maximum(deg - hi, 0).sum() + np.maximum(lo - deg, 0).sum())):
        over, under = deg > hi, deg < lo
        if not (over.any() or under.any()):
            break
        if over.any():
            sources, sinks = over, deg < hi
            room_src, room_dst = deg - hi, hi - deg
        else:
            sources, sinks = deg > lo, under
            room_src, room_dst = deg - lo, lo - deg
        # cap[a, b]: strata that could move a leftover from split a to split b.
        movable = (~extra & eligible).astype(np.int64)
        cap = extra.T.astype(np.int64) @ movable
        path = _shortest_path(cap > 0, sources, sinks)
        if path is None:  # impossible by the flow argument above; never silently wrong
            raise RuntimeError(f"controlled rounding found no augmenting path for {deg=}")
        amount = min(
            int(room_src[path[0]]),
            int(room_dst[path[-1]]),
            *(int(cap[a, b]) for a, b in itertools.pairwise(path)),
        )
        for a, b in itertools.pairwise(path):
            # Later edges on the path only gain candidates from earlier moves, never lose them.
            candidates = np.flatnonzero(extra[:, a] & ~extra[:, b] & eligible[:, b])
            chosen = candidates[np.argsort(priority[candidates], kind="stable")[:amount]]
            extra[chosen, a] = False
            extra[chosen, b] = True
        deg = extra.sum(axis=0)
    if (deg > hi).any() or (deg < lo).any():
        raise RuntimeError(f"controlled rounding left split totals {deg} outside [{lo}, {hi}]")
    return base + extra


def _shortest_path(
    adjacent: npt.NDArray[np.bool_], sources: npt.NDArray[np.bool_], sinks: npt.NDArray[np.bool_]
) -> list[int] | None:
    """Breadth-first search over the (few) splits, from any source to any sink."""
    parent = np.full(adjacent.shape[0], -1)
    frontier = [int(a) for a in np.flatnonzero(sources)]
    seen = set(frontier)
    while frontier:
        nxt: list[int] = []
        for a in frontier:
            for b in np.flatnonzero(adjacent[a]).tolist():
                if b in seen:
                    continue
                seen.add(b)
                parent[b] = a
                if sinks[b]:
                    path = [b]
                    while parent[path[-1]] >= 0:
                        path.append(int(parent[path[-1]]))
                    return path[::-1]
                nxt.append(b)
        frontier = nxt
    return None


def _unique_counts(values: IntArray) -> tuple[IntArray, IntArray]:
    """Sorted distinct values and their counts (one sort: much faster than ``np.unique``)."""
    ordered = np.sort(values)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]][: ordered.size])
    return ordered[starts], np.diff(np.r_[starts, ordered.size])


def _grouped_order(codes: Codes, rng: np.random.Generator | None) -> Positions:
    """Row positions grouped by code (ascending); within a code in row order, or random."""
    if rng is None:
        return np.argsort(codes, kind="stable")
    # 32-bit positions when they fit: half the memory traffic in the gathers below.
    perm = np.arange(codes.size, dtype=np.int32 if codes.size < 2**31 else np.int64)
    rng.shuffle(perm)
    # Any sort of the shuffled keys leaves each class's rows in uniformly random order (the
    # sort only sees the keys), so the faster unstable sort is fine for 32-bit codes; 8/16-bit
    # codes get numpy's radix sort, which is stable and faster still.
    small = codes.dtype.itemsize <= 2
    return perm[np.argsort(codes[perm], kind="stable" if small else "quicksort")]


def _fill(order: Positions, counts: IntArray) -> SplitIds:
    """Split ids per row: the rows at ``order`` get ``counts[c, s]`` times split ``s``, stratum by
    stratum, so ``order`` must list each stratum's rows together, strata in row order of
    ``counts``."""
    strata, splits = counts.shape
    pattern = np.tile(np.arange(splits, dtype=_code_dtype(splits)), strata)
    out = np.empty(order.size, dtype=np.uint64)
    out[order] = np.repeat(pattern, counts.ravel())  # narrow ids, widened by the assignment
    return out


def _cut(strata: IntArray, sizes: IntArray, bounds: IntArray) -> IntArray:
    """Split index of consecutive runs (groups) laid end to end within each stratum.

    ``strata`` and ``sizes`` list the runs stratum by stratum; ``bounds[c]`` are stratum ``c``'s
    cumulative split targets (S - 1 of them). A run goes to the split holding its midpoint (ties
    go right), so each cut lands on a run boundary at most ``floor(size / 2)`` rows from its
    target, ``size`` being that of the run the target falls in.
    """
    if sizes.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(sizes)
    stratum_rows = np.bincount(strata, weights=sizes, minlength=bounds.shape[0]).astype(np.int64)
    stratum_start = np.cumsum(stratum_rows) - stratum_rows
    twice_mid = 2 * (ends - sizes - stratum_start[strata]) + sizes
    split = np.zeros(sizes.size, dtype=np.int64)
    for s in range(bounds.shape[1]):
        split += twice_mid >= 2 * bounds[strata, s]
    return split


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def stratified_split(labels: npt.ArrayLike, ratios: Sequence[float], seed: int) -> SplitIds:
    """Split rows by ``ratios`` keeping every class's proportions (controlled rounding).

    Guarantees, for ``n_c`` rows of class ``c`` and ``n`` rows in all:

    - rows of class ``c`` in split ``s``: ``floor`` or ``ceil`` of ``ratios[s] * n_c``
      (so within 1 row of the exact share; e.g. 0.7 of 15 rows is 10 or 11);
    - rows in split ``s``: ``floor`` or ``ceil`` of ``ratios[s] * n``, however many classes;
    - within a class, which rows go where is uniformly random (seeded).

    Args:
        labels: class of each row (int, float, str, ... ; no nulls).
        ratios: fraction of rows per split, each in (0, 1], summing to 1.
        seed: seed of the random choices.

    Returns:
        Split id per row (uint64), in row order.

    Raises:
        ValueError: bad ratios or seed, or null labels.
    """
    r = _normalised_ratios(ratios)
    rng = _check_seed(seed)
    codes, _, counts = _factorize(labels, "labels", "label")
    cells = _round_matrix(counts, r, rng)
    return _fill(_grouped_order(codes, rng), cells)


def stratified_counts(class_rows: npt.ArrayLike, ratios: Sequence[float], seed: int) -> IntArray:
    """Rows per (class, split) of `stratified_split` from the class sizes alone (classes in
    ascending label order): each cell ``floor`` or ``ceil`` of its exact share, rows summing to
    the class sizes, every split total within 1 of its share. Out-of-core engines assign rows
    to these cells by rank, never holding the labels."""
    sizes = np.asarray(class_rows, dtype=np.int64)
    return _round_matrix(sizes, _normalised_ratios(ratios), _check_seed(seed))


def stratified_kfold_counts(class_rows: npt.ArrayLike, k: int, seed: int) -> IntArray:
    """Rows per (class, fold) of a shuffled `stratified_kfold` from the class sizes alone
    (classes in ascending label order): each cell ``floor`` or ``ceil`` of ``n_c / k``, fold
    sizes ``ceil(n / k)`` for the first ``n % k`` folds and ``floor`` for the rest."""
    counts = np.asarray(class_rows, dtype=np.int64)
    k = _check_k(k, int(counts.sum()))
    rank = _check_seed(seed).permutation(counts.size)
    class_rows_ranked = np.empty(counts.size, dtype=np.int64)
    class_rows_ranked[rank] = counts
    end = np.cumsum(class_rows_ranked)[:, None]
    start = end - class_rows_ranked[:, None]
    fold = np.arange(k)[None, :]
    cells = (end - fold - 1) // k - (start - fold - 1) // k
    return cells[rank]


def group_split(groups: npt.ArrayLike, ratios: Sequence[float], seed: int) -> SplitIds:
    """Split rows by ``ratios`` keeping every group in one split.

    Groups are shuffled (seeded) and laid end to end; each goes to the split holding its middle
    row. With ``T = apportion(n, ratios)`` and ``m`` the largest group's row count:

    - every group's rows are in exactly one split;
    - rows in splits ``0..s`` are within ``floor(m / 2)`` of ``T[0] + ... + T[s]``, so split
      ``s`` has ``T[s] ± 2 * floor(m / 2)`` rows (exactly ``T`` when all groups are single
      rows). A split whose target is under half a group can end up empty.

    Args:
        groups: group key of each row (int, str, ... ; no nulls).
        ratios: fraction of rows per split, each in (0, 1], summing to 1.
        seed: seed of the shuffle.

    Returns:
        Split id per row (uint64), in row order.

    Raises:
        ValueError: bad ratios or seed, or null groups.
    """
    r = _normalised_ratios(ratios)
    rng = _check_seed(seed)
    codes, _, sizes = _factorize(groups, "groups", "group")
    perm = rng.permutation(sizes.size)
    bounds = np.cumsum(apportion(int(sizes.sum()), r.tolist()))[None, :-1]
    group_split_ids = np.empty(sizes.size, dtype=np.uint64)
    group_split_ids[perm] = _cut(np.zeros(sizes.size, dtype=np.int64), sizes[perm], bounds)
    return group_split_ids[codes]


def stratified_group_split(
    labels: npt.ArrayLike, groups: npt.ArrayLike, ratios: Sequence[float], seed: int
) -> SplitIds:
    """Split rows by ``ratios`` keeping groups together and class proportions close.

    Each group joins the stratum of its most frequent label (ties: random). Per stratum the
    targets ``K[c, s]`` are a controlled rounding (as in `stratified_split`: floor/ceil of
    ``ratios[s] * rows_c``, column totals floor/ceil of ``ratios[s] * n``), and the stratum's
    groups are shuffled and cut as in `group_split`. Hence, with ``m_c`` the largest group in
    stratum ``c``:

    - every group's rows are in exactly one split;
    - if every group has a single label: rows of class ``c`` in split ``s`` are within
      ``2 * floor(m_c / 2)`` of ``K[c, s]``, so strictly within ``2 * floor(m_c / 2) + 1`` of
      ``ratios[s] * n_c`` (exact floor/ceil when the groups are single rows);
    - a group with several labels adds its minority rows' to the deviation of those classes
      (best effort, like scikit-learn's StratifiedGroupKFold, which also allows it).

    Args:
        labels: class of each row (no nulls).
        groups: group key of each row (no nulls).
        ratios: fraction of rows per split, each in (0, 1], summing to 1.
        seed: seed of the random choices.

    Returns:
        Split id per row (uint64), in row order.

    Raises:
        ValueError: bad ratios or seed, null labels or groups, or different lengths.
    """
    r = _normalised_ratios(ratios)
    rng = _check_seed(seed)
    lcodes, luniques, _ = _factorize(labels, "labels", "label")
    gcodes, _, gsizes = _factorize(groups, "groups", "group")
    if lcodes.size != gcodes.size:
        raise ValueError(f"labels has {lcodes.size} rows but groups has {gcodes.size}")
    num_groups, num_labels = gsizes.size, luniques.size
    if num_groups == 0:
        return np.zeros(0, dtype=np.uint64)
    # Rows per (group, label) pair, pairs sorted by group; each group's most frequent label
    # (ties at random: noise below 1 reorders equal counts only) names its stratum.
    pairs, pair_rows = _unique_counts(gcodes.astype(np.int64) * num_labels + lcodes)
    pair_group = pairs // num_labels
    score = pair_rows + 0.5 * rng.random(pairs.size)
    group_start = np.flatnonzero(np.r_[True, pair_group[1:] != pair_group[:-1]])
    best = np.maximum.reduceat(score, group_start)
    winners = np.flatnonzero(score == best[pair_group])
    winners = winners[np.r_[True, pair_group[winners][1:] != pair_group[winners][:-1]]]
    stratum = np.empty(num_groups, dtype=np.int64)
    stratum[pair_group[winners]] = pairs[winners] % num_labels
    stratum_rows = np.bincount(stratum, weights=gsizes, minlength=num_labels).astype(np.int64)
    targets = np.cumsum(_round_matrix(stratum_rows, r, rng), axis=1)[:, :-1]
    order = _grouped_order(stratum.astype(_code_dtype(num_labels)), rng)
    group_split_ids = np.empty(num_groups, dtype=np.uint64)
    group_split_ids[order] = _cut(stratum[order], gsizes[order], targets)
    return group_split_ids[gcodes]


def time_split(times: npt.ArrayLike, ratios: Sequence[float]) -> SplitIds:
    """Split rows by ``ratios`` in time order: train, then validation, then test, say.

    Rows are ordered by ``times``; rows sharing a timestamp form one run that never straddles a
    boundary. With ``T = apportion(n, ratios)`` and ``t`` the largest number of rows sharing one
    timestamp:

    - every time in split ``s`` is strictly earlier than every time in any later split;
    - rows in splits ``0..s`` are within ``floor(t / 2)`` of ``T[0] + ... + T[s]`` (each boundary
      moves to the nearest timestamp change), so split ``s`` has ``T[s] ± 2 * floor(t / 2)``
      rows: exactly ``T`` for distinct times.

    Args:
        times: time of each row (numbers or datetime64; no NaN/NaT/None).
        ratios: fraction of rows per split, each in (0, 1], summing to 1.

    Returns:
        Split id per row (uint64), in row order.

    Raises:
        ValueError: bad ratios or null times.
    """
    r = _normalised_ratios(ratios)
    # Rows sharing a timestamp share a split, so their order does not matter: unstable sort.
    order, run_starts = _time_runs(times, stable=False)
    n = order.size
    sizes = np.diff(np.r_[run_starts, n]).astype(np.int64)
    bounds = np.cumsum(apportion(n, r.tolist()))[None, :-1]
    run_split = _cut(np.zeros(sizes.size, dtype=np.int64), sizes, bounds)
    out = np.empty(n, dtype=np.uint64)
    out[order] = np.repeat(run_split.astype(np.uint64), sizes)
    return out


def _time_runs(times: npt.ArrayLike, *, stable: bool) -> tuple[npt.NDArray[np.intp], IntArray]:
    """Time order and the positions (in it) where a new timestamp starts."""
    arr = _as_1d(times, "times")
    _reject_nulls(arr, "times", "time")
    order = np.argsort(arr, kind="stable" if stable else "quicksort")
    ordered = arr[order]
    change = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    return order, np.r_[0, change].astype(np.int64) if arr.size else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# K-folds
# ---------------------------------------------------------------------------------------------


def kfold(n: int, k: int, seed: int = 0, shuffle: bool = True) -> SplitIds:
    """Fold id (0..k-1) per row, as scikit-learn's ``KFold``.

    Guarantees: every row in exactly one fold; fold sizes ``ceil(n / k)`` for the first
    ``n % k`` folds and ``floor(n / k)`` for the rest. ``shuffle=False`` gives contiguous folds
    in row order (fold 0 is rows ``0..size_0-1``), identical to ``KFold(k)``; ``shuffle=True``
    assigns rows to folds uniformly at random (seeded).

    Raises:
        ValueError: ``k < 2``, ``k > n``, or a bad seed.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    k = _check_k(k, n)
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    folds = np.repeat(np.arange(k, dtype=np.uint64), sizes)
    if not shuffle:
        return folds
    out = np.empty(n, dtype=np.uint64)
    out[_check_seed(seed).permutation(n)] = folds
    return out


def stratified_kfold(
    labels: npt.ArrayLike,
    k: int,
    seed: int = 0,
    shuffle: bool = True,
    on_small_class: Literal["warn", "error"] = "warn",
) -> SplitIds:
    """Fold id (0..k-1) per row with every class spread evenly, as ``StratifiedKFold``.

    Rows are ordered class by class and dealt round-robin to folds. Guarantees, for ``n_c``
    rows of class ``c`` and ``n`` in all:

    - rows of class ``c`` in each fold: ``floor(n_c / k)`` or ``ceil(n_c / k)``;
    - fold sizes: ``ceil(n / k)`` for the first ``n % k`` folds, ``floor(n / k)`` for the rest.

    ``shuffle=False`` equals scikit-learn's ``StratifiedKFold(k)`` exactly (classes in order of
    first appearance, each class's rows in row order). ``shuffle=True`` draws the class order and
    the rows within each class at random (seeded).

    Args:
        labels: class of each row (no nulls).
        k: number of folds, 2 <= k <= number of rows.
        seed: seed of the shuffle (unused when ``shuffle=False``).
        shuffle: random (True) or row-order (False) assignment within classes.
        on_small_class: a class with fewer than ``k`` rows is missing from some folds:
            ``"warn"`` (``UserWarning``, as scikit-learn) or ``"error"`` (``ValueError``).

    Raises:
        ValueError: ``k < 2``, ``k > n``, null labels, bad ``on_small_class``, or a small class
            with ``on_small_class="error"``.
    """
    if on_small_class not in ("warn", "error"):
        raise ValueError(f'on_small_class={on_small_class!r} must be "warn" or "error"')
    codes, uniques, counts = _factorize(labels, "labels", "label")
    k = _check_k(k, codes.size)
    small = np.flatnonzero(counts < k)
    if small.size:
        listed = ", ".join(
            f"{v!r} ({c} rows)"
            for v, c in zip(_show(uniques[small]), counts[small][:_SHOW].tolist(), strict=False)
        )
        more = f" and {small.size - _SHOW} more" if small.size > _SHOW else ""
        message = (
            f"labels: {small.size} class(es) have fewer rows than k={k}, so some folds get none "
            f"of them: {listed}{more}"
        )
        if on_small_class == "error":
            raise ValueError(message + "; use a smaller k or filter those classes out")
        warnings.warn(message, UserWarning, stacklevel=2)

    num = counts.size
    rng = _check_seed(seed) if shuffle else None
    if rng is not None:
        rank = rng.permutation(num)
    else:
        # scikit-learn numbers classes by first appearance; the round-robin depends on it.
        first = _grouped_order(codes, None)[np.cumsum(counts) - counts]
        rank = np.empty(num, dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(num)
    codes = rank.astype(codes.dtype)[codes]
    class_rows = np.empty(num, dtype=np.int64)
    class_rows[rank] = counts
    # Round-robin over the class-sorted rows: position p goes to fold p % k, so class c (at
    # positions [a, b)) has ceil((b - f) / k) - ceil((a - f) / k) rows in fold f.
    end = np.cumsum(class_rows)[:, None]
    start = end - class_rows[:, None]
    fold = np.arange(k)[None, :]
    cells = (end - fold - 1) // k - (start - fold - 1) // k
    return _fill(_grouped_order(codes, rng), cells)


def group_kfold(groups: npt.ArrayLike, k: int, seed: int = 0, shuffle: bool = True) -> SplitIds:
    """Fold id (0..k-1) per row with every group in one fold, folds balanced by rows.

    Groups are sorted by row count, largest first, and dealt in snake order (folds
    0..k-1, k-1..0, 0..k-1, ...): a vectorised stand-in for scikit-learn's "largest group to
    the lightest fold" loop. Guarantees, with ``m`` the largest group's row count:

    - every group's rows are in exactly one fold, every fold has >= 1 group;
    - the largest and smallest fold differ by at most ``m`` rows (at most ``m - m_min``, the
      smallest group being ``m_min``, when the number of groups is a multiple of ``k``): in each
      round of ``k`` groups the fold order flips, and the rounds' size ranges do not overlap.

    ``shuffle=True`` breaks ties between equal-sized groups at random and numbers the folds at
    random (seeded); ``shuffle=False`` breaks ties by group key order.

    Raises:
        ValueError: ``k < 2``, fewer groups than ``k``, null groups, or a bad seed.
    """
    codes, _, sizes = _factorize(groups, "groups", "group")
    return group_folds_of_sizes(sizes, k, seed, shuffle).astype(np.uint64)[codes]


def group_folds_of_sizes(sizes: np.ndarray, k: int, seed: int, shuffle: bool) -> np.ndarray:
    """The fold of each group (int64) of `group_kfold`, from the groups' row counts alone, in
    ascending group-key order: the out-of-core engine counts groups and calls this too."""
    k = _check_k(k, sizes.size, what="distinct groups")
    num = sizes.size
    rng = _check_seed(seed) if shuffle else None
    ties = rng.random(num) if rng is not None else np.arange(num)
    by_size = np.lexsort((ties, -sizes))
    position = np.arange(num)
    rounds, within = position // k, position % k
    snake = np.where(rounds % 2 == 0, within, k - 1 - within)
    fold_names = rng.permutation(k) if rng is not None else np.arange(k)
    group_fold = np.empty(num, dtype=np.int64)
    group_fold[by_size] = fold_names[snake]
    return group_fold


@dataclass(frozen=True)
class TimeFold:
    """One time-series fold as positions in ``order`` (the stable time order of the rows).

    Train rows are ``order[train_start:train_end]``, test rows ``order[test_start:test_end]``;
    the rows between ``train_end`` and ``test_start`` are the gap, in neither.
    """

    train_start: int
    train_end: int
    test_start: int
    test_end: int
    order: npt.NDArray[np.intp] = field(repr=False, compare=False)

    def train(self) -> npt.NDArray[np.intp]:
        """Row positions (into the input) of the training rows, in time order."""
        return self.order[self.train_start : self.train_end]

    def test(self) -> npt.NDArray[np.intp]:
        """Row positions (into the input) of the test rows, in time order."""
        return self.order[self.test_start : self.test_end]

    @property
    def gap_rows(self) -> int:
        return self.test_start - self.train_end


def time_series_folds(
    times: npt.ArrayLike,
    k: int,
    gap: int = 0,
    test_size: int | None = None,
    max_train_size: int | None = None,
) -> list[TimeFold]:
    """Expanding-window folds over rows in time order, as scikit-learn's ``TimeSeriesSplit``.

    A row is in the training set of several folds, so the result is positions in the stable
    time order rather than one split id per row. Fold ``i`` (0..k-1) has ``test_size`` rows
    (default ``n // (k + 1)``) starting at ``n - (k - i) * test_size``; training ends ``gap``
    rows before the test and keeps the last ``max_train_size`` rows if that is set.

    Guarantees:

    - all times distinct: train and test sets equal ``TimeSeriesSplit(k, gap=gap,
      test_size=test_size, max_train_size=max_train_size)`` applied to the time-sorted rows;
    - ties: every boundary moves back to the first row of its timestamp (the start of a capped
      training window moves forward instead), so equal times never straddle train/gap/test or
      two tests; then max train time < min test time (strictly), at least ``gap`` rows lie
      between them, train holds at most ``max_train_size`` rows, and tests are disjoint and
      consecutive (fold i's test ends where fold i+1's starts);
    - without ``max_train_size`` each training set contains the previous one.

    Args:
        times: time of each row (numbers or datetime64; no NaN/NaT/None).
        k: number of folds (>= 2).
        gap: rows left out between training and test (>= 0).
        test_size: rows per test set (>= 1); default ``n // (k + 1)``.
        max_train_size: cap on training rows (>= 1); default unlimited.

    Raises:
        ValueError: bad ``k``/``gap``/``test_size``/``max_train_size``, too few rows for them,
            null times, or ties so large that some train or test set would be empty.
    """
    order, run_starts = _time_runs(times, stable=True)
    n = order.size
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 2:
        raise ValueError(f"k={k!r} must be a whole number of folds >= 2")
    k = int(k)
    if gap < 0:
        raise ValueError(f"gap={gap} must be >= 0 rows")
    if test_size is not None and test_size < 1:
        raise ValueError(f"test_size={test_size} must be >= 1 row (or None for n // (k + 1))")
    if max_train_size is not None and max_train_size < 1:
        raise ValueError(f"max_train_size={max_train_size} must be >= 1 row (or None)")
    if k + 1 > n:
        raise ValueError(f"k={k} folds need at least k + 1 = {k + 1} rows, got {n}")
    size = test_size if test_size is not None else n // (k + 1)
    if n - gap - size * k <= 0:
        raise ValueError(
            f"k={k} folds of test_size={size} rows with gap={gap} need more than "
            f"{gap + size * k} rows, got {n}; use a smaller k, test_size or gap"
        )
    bounds = np.r_[run_starts, n]

    def down(p: int) -> int:  # first row of the timestamp at position p (0 before the start)
        return int(bounds[np.searchsorted(bounds, max(p, 0), side="right") - 1])

    def up(p: int) -> int:  # first row of the first timestamp starting at or after p
        return int(bounds[np.searchsorted(bounds, p, side="left")])

    folds: list[TimeFold] = []
    for i in range(k):
        raw_start = n - (k - i) * size
        test_start, test_end = down(raw_start), down(raw_start + size)
        train_end = down(test_start - gap)
        train_start = 0
        if max_train_size is not None and max_train_size < train_end:
            train_start = up(train_end - max_train_size)
        if test_end <= test_start or train_end <= train_start:
            part = "test" if test_end <= test_start else "training"
            raise ValueError(
                f"times: fold {i}'s {part} set is empty because rows sharing a timestamp are "
                f"kept together (positions {raw_start}..{raw_start + size} of {n} in time "
                "order); use fewer folds, a larger test_size or max_train_size, or finer times"
            )
        folds.append(TimeFold(train_start, train_end, test_start, test_end, order))
    return folds


# ---------------------------------------------------------------------------------------------
# Checks (figures for Dagster asset-check metadata: plain ints, floats, bools, lists)
# ---------------------------------------------------------------------------------------------


def _split_codes(split_ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
    arr = _as_1d(split_ids, "split_ids")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"split_ids must be whole numbers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"split_ids has negative ids, e.g. {int(arr.min())}")
    return arr.astype(np.int64)


def check_disjoint_cover(
    split_ids: npt.ArrayLike,
    n_expected: int,
    *,
    num_splits: int | None = None,
    row_ids: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """Every expected row in exactly one split, and no other rows.

    Args:
        split_ids: split of each entry.
        n_expected: number of rows that should be assigned (the filtered rows).
        num_splits: if given, ids must be in ``0..num_splits-1``.
        row_ids: if given (a permutation table's ``row_id`` column), repeated ids count as
            rows in several splits, and distinct ids are what must number ``n_expected``.

    Returns:
        ``rows``, ``expected_rows``, ``duplicate_rows``, ``missing_rows``, ``extra_rows``,
        ``out_of_range_ids`` and ``passed`` (all zero and the counts equal).
    """
    ids = _split_codes(split_ids)
    rows = int(ids.size)
    duplicates = 0
    if row_ids is not None:
        row_arr = _as_1d(row_ids, "row_ids")
        if row_arr.size != rows:
            raise ValueError(f"row_ids has {row_arr.size} entries but split_ids has {rows}")
        ordered = np.sort(row_arr)
        duplicates = int(np.count_nonzero(ordered[1:] == ordered[:-1]))
    distinct = rows - duplicates
    out_of_range = 0 if num_splits is None else int(np.count_nonzero(ids >= num_splits))
    missing, extra = max(0, n_expected - distinct), max(0, distinct - n_expected)
    return {
        "rows": rows,
        "expected_rows": int(n_expected),
        "duplicate_rows": duplicates,
        "missing_rows": missing,
        "extra_rows": extra,
        "out_of_range_ids": out_of_range,
        "passed": duplicates == 0 and missing == 0 and extra == 0 and out_of_range == 0,
    }


def check_ratios(
    split_ids: npt.ArrayLike,
    ratios: Sequence[float],
    tolerance_rows: float,
    *,
    total_rows: int | None = None,
) -> dict[str, Any]:
    """Rows per split against their exact shares.

    Args:
        split_ids: split of each assigned row.
        ratios: fraction per split; may sum below 1 when rows were discarded on purpose.
        tolerance_rows: largest accepted ``|rows - share|``.
        total_rows: rows the ratios are fractions of (before any discard); default: the
            assigned rows, with the ratios scaled to sum to 1.

    Returns:
        ``split_rows``, ``expected_rows`` (exact shares), ``max_deviation_rows``,
        ``tolerance_rows``, ``rows_outside_splits`` (ids >= len(ratios)) and ``passed``
        (max deviation <= tolerance and no rows outside).
    """
    r = _normalised_ratios(ratios, below_one=True)
    ids = _split_codes(split_ids)
    counts = np.bincount(ids, minlength=r.size)
    outside = int(counts[r.size :].sum())
    if total_rows is None:
        expected = _shares(ids.size, r)
    else:
        expected = _shares(total_rows, np.asarray([float(x) for x in ratios]))
    deviation = float(np.abs(counts[: r.size] - expected).max())
    return {
        "split_rows": counts[: r.size].tolist(),
        "expected_rows": [round(float(e), 3) for e in expected],
        "max_deviation_rows": round(deviation, 6),
        "tolerance_rows": float(tolerance_rows),
        "rows_outside_splits": outside,
        "passed": deviation <= tolerance_rows and outside == 0,
    }


def check_stratified(
    split_ids: npt.ArrayLike,
    labels: npt.ArrayLike,
    ratios_or_k: Sequence[float] | int,
    *,
    tolerance_rows: float = 0.0,
) -> dict[str, Any]:
    """Per-class rows per split against the exact shares ``ratios[s] * n_c`` (or ``n_c / k``).

    Returns:
        ``classes``, ``max_deviation_rows`` (max over classes and splits of
        ``|rows - share|``), ``worst_class``, ``worst_split``, ``rows_outside_splits`` and
        ``passed``: deviation < 1 + ``tolerance_rows`` (with 0, every count is the floor or
        ceiling of its share, the guarantee of `stratified_split` and `stratified_kfold`).
    """
    if isinstance(ratios_or_k, int | np.integer):
        k = int(ratios_or_k)
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        r = np.full(k, 1.0 / k)
    else:
        r = _normalised_ratios(ratios_or_k)
    ids = _split_codes(split_ids)
    codes, uniques, counts = _factorize(labels, "labels", "label")
    if codes.size != ids.size:
        raise ValueError(f"labels has {codes.size} rows but split_ids has {ids.size}")
    splits = r.size
    outside = int(np.count_nonzero(ids >= splits))
    key = codes.astype(np.intp)
    key *= splits
    key += ids
    if outside:
        key = key[ids < splits]
    cells = np.bincount(key, minlength=counts.size * splits).reshape(counts.size, splits)
    if counts.size == 0:
        deviation, worst_class, worst_split = 0.0, None, None
    else:
        error = np.abs(cells - _shares(counts, r))
        worst = int(np.argmax(error))
        deviation = float(error.flat[worst])
        worst_class, worst_split = _show(uniques[[worst // splits]])[0], worst % splits
    return {
        "classes": int(counts.size),
        "max_deviation_rows": round(deviation, 6),
        "worst_class": worst_class,
        "worst_split": worst_split,
        "rows_outside_splits": outside,
        "passed": deviation < 1 + tolerance_rows and outside == 0,
    }


def check_groups(split_ids: npt.ArrayLike, groups: npt.ArrayLike) -> dict[str, Any]:
    """Groups whose rows are in more than one split (leakage across splits).

    Returns:
        ``groups``, ``groups_in_several_splits``, ``rows_in_such_groups``,
        ``example_groups`` (up to 10 keys) and ``passed`` (no such group).
    """
    ids = _split_codes(split_ids)
    codes, uniques, sizes = _factorize(groups, "groups", "group")
    if codes.size != ids.size:
        raise ValueError(f"groups has {codes.size} rows but split_ids has {ids.size}")
    lowest = np.full(sizes.size, np.iinfo(np.int64).max)
    highest = np.full(sizes.size, -1)
    np.minimum.at(lowest, codes, ids)
    np.maximum.at(highest, codes, ids)
    spanning = np.flatnonzero(lowest != highest)
    return {
        "groups": int(sizes.size),
        "groups_in_several_splits": int(spanning.size),
        "rows_in_such_groups": int(sizes[spanning].sum()),
        "example_groups": _show(uniques[spanning]),
        "passed": spanning.size == 0,
    }
