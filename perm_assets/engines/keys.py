"""The keys both project engines rank and order rows by: pure numpy functions of ``(seed, row
id)`` (and of a time column's values), with no import of dagster or lancedb, so that Ray
workers, which import this module to run `perm_assets.engines.ray_tasks`, start in a fraction of
a second (tests/test_ray_ranks.py).

- `order_key`: a seeded bijection of uint64, so sorting by it is a random order that depends
  on nothing but ``(seed, row id)``; `rows_of_keys` inverts it.
- `split_of_rank`: a row's split from its rank in its class and the cumulative split sizes.
- `time_key`: an order-preserving uint64 of a number, date or timestamp.
- `calculated_splits`, `hash_splits`: a calculated split's range check, lancedb's hash split of
  a batch (lancedb imported when called).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from perm_assets.errors import SpecError

if TYPE_CHECKING:
    from perm_assets.specs import HashSplit

PERMUTATION_SCHEMA = pa.schema(
    [pa.field("row_id", pa.uint64()), pa.field("split_id", pa.uint64(), nullable=False)]
)
"""The columns of a permutation table the engines write (lancedb's)."""

# Domains keep the assignment and read-order keys of one seed unrelated.
_DOMAIN_SPLIT = 0x5EED_0001
_DOMAIN_ORDER = 0x5EED_0002

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_M1_INV = np.uint64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
_M2_INV = np.uint64(pow(0x94D049BB133111EB, -1, 1 << 64))
_MASK = (1 << 64) - 1


# Keys are computed in cache-sized slices, in place with one scratch buffer: whole-array numpy
# expressions allocate a temporary per operation and run at memory speed (2-3x slower).
_SLICE = 1 << 16
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_S54, _S60, _S62 = np.uint64(54), np.uint64(60), np.uint64(62)


def _xorshift(z: np.ndarray, shift: np.uint64, scratch: np.ndarray) -> None:
    """``z ^= z >> shift`` in place."""
    np.right_shift(z, shift, out=scratch)
    z ^= scratch


def _mix_slice(z: np.ndarray, scratch: np.ndarray) -> None:
    """splitmix64's finalizer, a bijection of uint64, in place."""
    _xorshift(z, _S30, scratch)
    z *= _M1
    _xorshift(z, _S27, scratch)
    z *= _M2
    _xorshift(z, _S31, scratch)


def _unmix_slice(z: np.ndarray, scratch: np.ndarray) -> None:
    """Inverse of `_mix_slice`, in place: ``x ^ x >> s`` is undone by ``^= >> s`` then
    ``^= >> 2s`` (for 2s < 64), and multiplications by the constants' inverses mod 2**64."""
    _xorshift(z, _S31, scratch)
    _xorshift(z, _S62, scratch)
    z *= _M2_INV
    _xorshift(z, _S27, scratch)
    _xorshift(z, _S54, scratch)
    z *= _M1_INV
    _xorshift(z, _S30, scratch)
    _xorshift(z, _S60, scratch)


def _sliced(values: np.ndarray, step: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
    """A uint64 copy of ``values`` with ``step`` applied slice by slice."""
    out = values.astype(np.uint64, copy=True)
    scratch = np.empty(min(out.size, _SLICE), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, out.size, _SLICE):
            part = out[start : start + _SLICE]
            step(part, scratch[: part.size])
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    return _sliced(x, _mix_slice)


def _unmix(z: np.ndarray) -> np.ndarray:
    return _sliced(z, _unmix_slice)


def _salts(seed: int, domain: int) -> tuple[np.uint64, np.uint64]:
    """Two 64-bit salts derived from ``(seed, domain)``."""
    first = int(_mix(np.array([(seed * 0x9E3779B97F4A7C15 + domain) & _MASK], np.uint64))[0])
    second = int(_mix(np.array([first ^ 0xD1B54A32D192ED03], np.uint64))[0])
    return np.uint64(first), np.uint64(second)


def order_key(row_ids: np.ndarray, seed: int, domain: int = _DOMAIN_SPLIT) -> np.ndarray:
    """The sort key of each row for ``seed``: a bijection of uint64 (no two rows tie), so
    sorting by it is a seeded random order that depends on nothing but ``(seed, row id)``."""
    a, b = _salts(seed, domain)

    def step(z: np.ndarray, scratch: np.ndarray) -> None:
        z ^= a
        _mix_slice(z, scratch)
        z += b  # wraps mod 2**64: still a bijection
        _mix_slice(z, scratch)

    return _sliced(row_ids, step)


def rows_of_keys(keys: np.ndarray, seed: int, domain: int = _DOMAIN_SPLIT) -> np.ndarray:
    """Inverse of `order_key`: the row ids of sorted keys, without carrying them along."""
    a, b = _salts(seed, domain)

    def step(z: np.ndarray, scratch: np.ndarray) -> None:
        _unmix_slice(z, scratch)
        z -= b
        _unmix_slice(z, scratch)
        z ^= a

    return _sliced(keys, step)


def split_of_rank(rank: np.ndarray, ends: np.ndarray, codes: np.ndarray | None) -> np.ndarray:
    """Split of each row from its rank within its class: ``ends[c, s]`` is the cumulative size
    of splits ``0..s`` of class ``c``, ``codes`` each row's class (None: one class). A rank past
    the last end gets ``S``: left out (counts, allow_discard)."""
    split = np.zeros(rank.size, dtype=np.int64)
    for s in range(ends.shape[1]):  # a loop over splits only
        split += rank >= (ends[0, s] if codes is None else ends[codes, s])
    return split


_SIGN = np.uint64(1 << 63)


def time_key(values: pa.Array, column: str) -> np.ndarray:
    """An order-preserving uint64 of each value of an orderable column (numbers, dates,
    timestamps; ValueError for other types and NaN): equal values give equal keys, so ties
    stay ties (-0.0 and 0.0 included)."""
    kind = values.type
    if pa.types.is_temporal(kind):
        raw = np.asarray(values.to_numpy(zero_copy_only=False)).astype(np.int64)
        return raw.view(np.uint64) ^ _SIGN
    if pa.types.is_unsigned_integer(kind):
        return values.to_numpy().astype(np.uint64)
    if pa.types.is_integer(kind):
        return values.to_numpy().astype(np.int64).view(np.uint64) ^ _SIGN
    if pa.types.is_floating(kind):
        floats = values.to_numpy().astype(np.float64) + 0.0  # -0.0 + 0.0 is 0.0: one tie
        if nans := int(np.count_nonzero(np.isnan(floats))):
            raise ValueError(
                f"column '{column}' has {nans} NaN value(s), which have no time order; filter "
                f'them out first, e.g. filter="NOT isnan({column})" (IS NOT NULL keeps NaN, '
                "which SQL does not count as null)"
            )
        bits = floats.view(np.uint64)
        # IEEE order: negatives by inverted bits, positives above them with the sign bit set.
        return np.where(bits & _SIGN, ~bits, bits | _SIGN)
    raise ValueError(
        f"column '{column}' has type {kind}, which has no time order; use a number, date or "
        "timestamp column"
    )


def calculated_splits(
    values: pa.Array, row_ids: np.ndarray, *, names: list[str], what: str, asset: str, table: str
) -> np.ndarray:
    """Split of each row from a calculated split expression's ``values``: a SpecError for a
    value that is not a whole number or no declared split's index (``names``)."""
    if not pa.types.is_integer(values.type) or values.null_count:
        nulls = f" with {values.null_count} null(s)" if values.null_count else ""
        raise SpecError(
            f"asset '{asset}': {what} gives {values.type}{nulls}; it must give a "
            "whole number, the split index 0, 1, ..., for every row (e.g. 'id % 3', or "
            "CAST(... AS BIGINT); add 'IS NOT NULL' conditions to the filter for nulls)"
        )
    split = values.to_numpy().astype(np.int64)
    bad = np.flatnonzero((split < 0) | (split >= len(names)))
    if bad.size:
        raise SpecError(
            f"asset '{asset}': {what} gives split index {int(split[bad[0]])} "
            f"(row {int(row_ids[bad[0]])} of table '{table}', {bad.size} such row(s) "
            f"in this batch), but only splits 0..{len(names) - 1} ({names}) are "
            "declared; fix the expression or declare more splits"
        )
    return split


_HASH_ROWS = 1 << 20  # at most one Lance file's rows: one fragment per batch


def hash_splits(data: pa.Table, split: HashSplit, db: Any, name: str) -> np.ndarray:
    """Split of each row of ``data`` (the hash columns) by lancedb's hash split, through the
    in-memory table ``name`` of ``db`` (see `local._Hash`); ``split.num_splits``: left out.
    Imports lancedb when called: only hash splits need it."""
    from lancedb.permutation import permutation_builder

    out = np.full(data.num_rows, split.num_splits, dtype=np.int64)  # left out unless hit
    for start in range(0, data.num_rows, _HASH_ROWS):
        part = data.slice(start, _HASH_ROWS)
        table = db.create_table(name, part, mode="overwrite")
        builder = permutation_builder(table).split_hash(
            split.columns, split.weights, discard_weight=split.discard_weight
        )
        result = builder.execute().to_arrow()
        # A row address is fragment << 32 | offset; an overwrite starts a new fragment.
        at = result.column("row_id").to_numpy()
        fragment, offset = at >> np.uint64(32), (at & np.uint64(0xFFFFFFFF)).astype(np.int64)
        if at.size and (fragment.min() != fragment.max() or offset.max() >= part.num_rows):
            raise RuntimeError("lancedb's hash split of a batch spans fragments")
        out[start + offset] = result.column("split_id").to_numpy()
    return out
