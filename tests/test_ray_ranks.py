"""The Ray engine's seeded ranks without a sort (`perm_assets.engines.ray._Build.bounds`): its
task functions and driver arithmetic, run here on Arrow blocks in this process (no cluster;
tests/test_ray_engine.py runs them on one), must place every row where ranking the rows of
each class by key (`local.split_of_rank`, the local engine's rule) places it."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from perm_assets.engines import local
from perm_assets.engines import ray as ray_engine
from tests.processes import REPO, child_env


def _first_pass(blocks: list[pa.Table], ends: np.ndarray, counts: np.ndarray) -> tuple:
    """`_Build.bounds`' first pass over ``blocks``: ``(bits, rows per cell, valid, the
    ends' cells, the wanted cells)``."""
    bits = ray_engine._histogram_bits(counts, ends)
    assert bits is not None
    rows = np.zeros(counts.size << bits, dtype=np.int64)
    for block in blocks:
        part = ray_engine._cell_counts(block, bits=bits, cells=rows.size)
        np.add.at(rows, part.column("cell").to_numpy(), part.column("rows").to_numpy())
    valid = ends < counts[:, None]
    ranks = ray_engine._end_cells(rows, counts, ends, valid)
    return bits, rows, valid, ranks, np.unique(ranks[2])


def _placed_by_histogram(blocks: list[pa.Table], ends: np.ndarray, counts: np.ndarray) -> dict:
    """``row_id -> split`` as `_Build.bounds` and `_place_keyed` give it, each task function
    applied to each block (as Ray Data's map does) and the driver steps in between."""
    bits, rows, valid, ranks, wanted = _first_pass(blocks, ends, counts)
    bounds = np.zeros(valid.shape, dtype=np.uint64)
    if wanted.size:
        parts = [
            ray_engine._keys_in(block, bits=bits, cells=rows.size, wanted=wanted)
            for block in blocks
        ]
        found = ray_engine._end_keys(parts, rows, ranks, valid.shape)
        assert found is not None
        bounds = found
    placed = pa.concat_tables(
        [
            ray_engine._place_keyed(
                block, bounds=bounds, valid=valid, splits=ends.shape[1], shuffle_seed=None
            )
            for block in blocks
        ]
    )
    ids, splits = placed.column("row_id").to_numpy(), placed.column("split_id").to_numpy()
    return dict(zip(ids.tolist(), splits.tolist(), strict=True))


def _placed_by_rank(
    row_ids: np.ndarray, keys: np.ndarray, codes: np.ndarray, ends: np.ndarray
) -> dict:
    """``row_id -> split`` by the local engine's rule: rank within class by key."""
    order = np.lexsort((keys, codes))
    per_class = np.bincount(codes, minlength=ends.shape[0])
    first = np.cumsum(per_class) - per_class
    rank = np.empty(row_ids.size, dtype=np.int64)
    rank[order] = np.arange(row_ids.size) - first[codes[order]]
    split = local.split_of_rank(rank, ends, codes)
    kept = split < ends.shape[1]  # past the last end: left out
    return dict(zip(row_ids[kept].tolist(), split[kept].tolist(), strict=True))


def _case(rng: np.random.Generator, n: int, classes: int, splits: int, *, coded: bool):
    """Rows of ``classes`` classes with random per-class split sizes: zero sizes, sizes
    summing below the class (rows left out) and ends equal to the class count included."""
    fragment = np.uint64(int(rng.integers(0, 3))) << np.uint64(32)
    row_ids = rng.choice(10**6, n, replace=False).astype(np.uint64) | fragment
    codes = rng.integers(0, classes, n).astype(np.int64)
    counts = np.bincount(codes, minlength=classes).astype(np.int64)
    sizes = np.zeros((classes, splits), dtype=np.int64)
    for c in range(classes):  # per class, not per row
        cut = np.sort(rng.integers(0, counts[c] + 1, splits))
        if rng.random() < 0.5:
            cut[-1] = counts[c]
        sizes[c] = np.diff(cut, prepend=0)
    keys = local.order_key(row_ids, int(rng.integers(0, 2**62)))
    blocks = []
    for part in np.array_split(np.arange(n), int(rng.integers(1, 5))):
        block = pa.table({"row_id": row_ids[part], "akey": keys[part]})
        if coded:
            block = block.append_column("code", pa.array(codes[part]))
        blocks.append(block)
    return row_ids, keys, codes, counts, np.cumsum(sizes, axis=1), blocks


@pytest.mark.parametrize("cells", [2, 8, 64, 1 << 18])
def test_histogram_ranks_place_every_row_as_ranking_by_key_does(
    cells: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Few cells make cells of many rows (an end deep inside its cell); `_CELL_ROWS = 4` makes
    # many cells of few rows even for these small tables.
    monkeypatch.setattr(ray_engine, "_HISTOGRAM_CELLS", cells)
    monkeypatch.setattr(ray_engine, "_CELL_ROWS", 4)
    rng = np.random.default_rng(cells)
    fitting = [c for c in (1, 1, 2, 3, 7, 30) if 2 * c <= cells]  # 2 cells a class at least
    for _ in range(60):
        classes = int(rng.choice(fitting))
        coded = classes > 1 or rng.random() < 0.5
        n = int(rng.integers(1, 3000))
        row_ids, keys, codes, counts, ends, blocks = _case(
            rng, n, classes, int(rng.integers(1, 6)), coded=coded
        )
        expected = _placed_by_rank(row_ids, keys, codes, ends)
        assert _placed_by_histogram(blocks, ends, counts) == expected


def test_histogram_bits_follow_the_rows_and_refuse_what_does_not_fit() -> None:
    one = np.array([1_000_000_000], dtype=np.int64)
    # A billion rows, one class, 3 splits: cells of ~4k rows (2**18 cells).
    assert ray_engine._histogram_bits(one, np.array([[800_000_000, 900_000_000, 10**9]])) == 18
    # 100 classes of 10M rows: 2**11 cells each (2**18 cells in all).
    hundred = np.full(100, 10_000_000, dtype=np.int64)
    ends = np.cumsum(np.full((100, 5), 2_000_000), axis=1)
    assert ray_engine._histogram_bits(hundred, ends) == 11
    # Small tables: one bit.
    assert ray_engine._histogram_bits(np.array([30_000]), np.array([[24_000, 30_000]])) == 3
    assert ray_engine._histogram_bits(np.array([100]), np.array([[50, 100]])) == 1
    # More classes than half the cells: no histogram (the sort), before any pass.
    many = np.full(200_000, 50, dtype=np.int64)
    assert ray_engine._histogram_bits(many, np.full((200_000, 1), 25)) is None
    # Cells that cannot be small enough: the fetch would pass `_FETCH_KEYS`.
    huge = np.full(100_000, 100_000_000, dtype=np.int64)
    assert ray_engine._histogram_bits(huge, np.full((100_000, 2), 50_000_000)) is None


def test_changed_rows_between_the_passes_are_refused() -> None:
    rng = np.random.default_rng(3)
    *_, counts, _, blocks = _case(rng, 500, 1, 2, coded=False)
    ends = np.array([[250, 500]])
    bits, rows, valid, ranks, wanted = _first_pass(blocks, ends, counts)
    parts = [ray_engine._keys_in(b, bits=bits, cells=rows.size, wanted=wanted) for b in blocks]
    assert ray_engine._end_keys(parts, rows, ranks, valid.shape) is not None
    # A row of a wanted cell missing at the second pass: no key is guessed.
    fewer = [pa.concat_tables(parts).slice(1)]
    assert ray_engine._end_keys(fewer, rows, ranks, valid.shape) is None
    assert ray_engine._end_keys([], rows, ranks, valid.shape) is None


def _shipped() -> list[tuple[Any, dict[str, Any]]]:
    """A ``(function, kwargs)`` of every kind the Ray engine ships to its workers, with
    arguments of the types `perm_assets.engines.ray` gives them."""
    from perm_assets import CalculatedSplit, HashSplit
    from perm_assets.engines import ray_tasks as tasks

    ids = np.arange(4, dtype=np.uint64)
    lookup = pa.array(["a", "b"])
    calculated = local._Calculated(
        CalculatedSplit(expression="id % 2", splits=2), ["x", "y"], asset="a", table="t"
    )
    return [
        (tasks._assignment_keys, {"seed": 3}),
        (tasks._place, {"boundaries": ids, "splits": 2, "shuffle_seed": 1}),
        (tasks._cell_counts, {"bits": 3, "cells": 8}),
        (tasks._keys_in, {"bits": 3, "cells": 8, "wanted": ids}),
        (tasks._place_keyed, {"bounds": ids, "valid": ids > 0, "splits": 2, "shuffle_seed": 1}),
        (tasks._row_ids, {}),
        (tasks._census_counts, {"columns": ["label"]}),
        (tasks._class_keys, {"column": "l", "lookup": lookup, "remap": ids, "seed": 1}),
        (tasks._calculated, {"check": calculated.check(), "splits": 2, "shuffle_seed": None}),
        (tasks._grouped, {"column": "g", "lookup": lookup, "split_of_code": ids, "splits": 2}),
        (tasks._time_keys, {"column": "t", "asset": "a", "table": "t"}),
        (tasks._timed, {"bounds": ids, "splits": 2, "shuffle_seed": None}),
        (tasks._place_ranked, {"starts": ids, "ends": ids, "splits": 2, "shuffle_seed": 1}),
        (tasks._split_counts, {"splits": 2}),
        (tasks._key_counts, {"column": "tkey", "value": 1}),
        (tasks._write_piece, {"uri": "/x", "split_id": None, "storage_options": None}),
        (
            tasks._route_rows,
            {"shard_of": ids.astype(np.int64), "shards": 2, "storage_options": None},
        ),
        (
            tasks._check_shard,
            {
                "base_uri": "/x",
                "base_version": 1,
                "fragments": [0],
                "num_splits": 2,
                "filter": None,
                "label": "l",
                "group": None,
                "time": None,
                "asset": "a",
                "table": "t",
                "among": "",
                "storage_options": None,
            },
        ),
        # Unpickled without lancedb too; running it imports lancedb (its hash), not dagster.
        (tasks._hashed, {"split": HashSplit(columns=["id"], weights=[1, 1]), "shuffle_seed": 1}),
    ]


def _unpickled_imports(payload: Any) -> list[str]:
    """Which of dagster, lancedb and the local engine a fresh process has imported after
    unpickling ``payload``, as a Ray worker unpickles a task and its arguments."""
    code = (
        "import json, pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
        "print(json.dumps(sorted(m for m in ('dagster', 'lancedb', 'perm_assets.engines.local') "
        "if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(payload),
        capture_output=True,
        env=child_env(),
        cwd=REPO,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_what_ray_workers_unpickle_imports_neither_dagster_nor_lancedb() -> None:
    # Ray pickles a task's function by reference (its module) and its arguments by value:
    # each worker process imports what unpickling them needs. dagster and lancedb would cost
    # each new worker process seconds and ~150 MB.
    assert _unpickled_imports(_shipped()) == []
