"""The blocking checks as Ray tasks (`perm_assets.engines.ray_checks`): the membership pass's
route and shard task functions and the k-fold training check's range tasks, run here in this
process on real Lance tables (no cluster; tests/test_ray_engine.py runs them on one), must
give the one-process figures (`perm_assets.membership`, `checks._rotated_training_streamed`)
for the same tables, sound or corrupted, however the work is cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from perm_assets import KFold, LanceDBIOManager, LanceDBResource, checks, folds_asset
from perm_assets.engines import ray_checks
from perm_assets.errors import SpecError
from perm_assets.membership import (
    Membership,
    Scan,
    cover_figures,
    group_figures,
    scan_filtered,
    table_batches,
    time_figures,
)
from perm_assets.tables import read_all, where

FILTER = "id % 5 != 0"
KEYS = {"label": "label", "group": "user", "time": "t"}


def _base(db: Any, n: int = 20_000) -> Any:
    """``base``: ``n`` rows in five fragments, every 97th row deleted (holes in the row
    addresses; fragments' physical rows exceed their live rows)."""
    ids = np.arange(n, dtype=np.int64)
    rows = pa.table(
        {
            "id": ids,
            "label": (ids * 7919 % 23).astype(np.int32),
            "user": (ids * 31) % 701,  # groups of ~28 rows, spread over every fragment
            "t": ((ids * 7) % 1_000).astype(np.float64),
        }
    )
    fifth = n // 5
    table = db.create_table("base", rows.slice(0, fifth))
    for start in range(fifth, n, fifth):
        table.add(rows.slice(start, fifth))
    table.delete("id % 97 = 5")
    return table


def _permutation(db: Any, row_ids: np.ndarray, split_ids: np.ndarray, fragments: int) -> Any:
    """A permutation table of these rows in ``fragments`` fragments."""
    data = pa.table({"row_id": pa.array(row_ids, pa.uint64()), "split_id": split_ids})
    size = -(-len(row_ids) // fragments)
    table = db.create_table("perm", data.slice(0, size), mode="overwrite")
    for start in range(size, len(row_ids), size):
        table.add(data.slice(start, size))
    return table


def _in_process(
    stored: Any, base: Any, num_splits: int, *, cpus: int, shard_rows: int, route_rows: int
) -> tuple[Membership, Scan, ray_checks.Plan]:
    """`ray_checks.cover` with each task function called here, as Ray would call it."""
    layout = ray_checks.layout_of(
        stored, base, cpus=cpus, shard_rows=shard_rows, route_rows=route_rows, part_bytes=1
    )
    assert layout is not None
    results = ray_checks.membership_tasks(
        _here, stored, base, layout, FILTER, num_splits, asset="perm", storage_options=None, **KEYS
    )
    member, scan = ray_checks.combine(results, num_splits, **KEYS)
    return member, scan, layout


def _here(fn: Any, returns: int, *args: Any, **kwargs: Any) -> Any:
    """`ray_checks.Submit` in this process: the task function, called."""
    return fn(*args, **kwargs)


def _in_one_process(stored: Any, base: Any, num_splits: int) -> tuple[Membership, Scan]:
    member = Membership.build(base, table_batches(stored), num_splits)
    assert member is not None
    with member:
        scan = scan_filtered(
            member, base, FILTER, asset="perm", label="label", group="user", time="t"
        )
    return member, scan


def _figures(member: Membership, scan: Scan) -> dict[str, Any]:
    return {
        "cover": cover_figures(member, scan),
        "split_rows": member.split_rows.tolist(),
        "strays": member.strays,
        "classes": scan.classes,
        "class_counts": scan.counts.tolist(),
        "groups": group_figures(scan),
        "time": time_figures(scan),
    }


def _cases(base: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sound and corrupted permutations of ``base``'s filtered rows into 3 splits."""
    rng = np.random.default_rng(5)
    scanned = base.search().where(where(FILTER)).select(["id"]).with_row_id(True)
    ids = scanned.to_arrow().column("_rowid").to_numpy()
    ids = ids[rng.permutation(ids.size)]
    # Random splits: every row once (sound cover), groups and times across splits (figures
    # to compare, not to pass).
    splits = rng.integers(0, 3, ids.size).astype(np.uint64)
    stray_fragment = (np.uint64(77) << np.uint64(32)) | np.uint64(3)  # no such fragment
    past_end = (np.uint64(2) << np.uint64(32)) | np.uint64(10**6)  # past a fragment's rows
    return {
        "sound": (ids, splits),
        "duplicates_and_missing": (
            np.concatenate([ids[1:], ids[5:7]]),
            np.concatenate([splits[1:], [1, 2]]).astype(np.uint64),
        ),
        "strays_twice_and_bad_splits": (
            np.concatenate([ids, [stray_fragment, stray_fragment, past_end]]),
            np.concatenate([np.where(splits == 2, 9, splits), [0, 1, 300]]).astype(np.uint64),
        ),
    }


@pytest.mark.parametrize("cpus", [1, 3, 8])
def test_shard_tasks_give_the_one_process_figures(tmp_path: Path, cpus: int) -> None:
    db = lancedb.connect(str(tmp_path / "db"))
    base = _base(db)
    for name, (row_ids, split_ids) in _cases(base).items():
        stored = _permutation(db, row_ids, split_ids, fragments=4)
        expected = _figures(*_in_one_process(stored, base, 3))
        member, scan, layout = _in_process(
            stored, base, 3, cpus=cpus, shard_rows=7_000, route_rows=6_000
        )
        assert _figures(member, scan) == expected, name
        # The plan really split the work: by rows (20k base rows / 7k), or by CPUs.
        assert len(layout.shards) == min(5, max(cpus, 3)), name
        assert len(layout.routes) == min(4, max(cpus, 3)), name
        # The corruptions were seen as such (the figures compared are not all zeros).
        cover = expected["cover"]
        wrong = (cover["duplicate_rows"], cover["missing_rows"], expected["strays"])
        assert (
            wrong
            == {
                "sound": (0, 0, 0),
                "duplicates_and_missing": (2, 1, 0),
                "strays_twice_and_bad_splits": (1, 0, 2),
            }[name]
        )
        assert cover["passed"] == (name == "sound") and expected["groups"]["groups"] > 0


def test_plan_cuts_fragments_in_order_into_runs_of_about_equal_rows() -> None:
    fragments = [(i * 2, rows) for i, rows in enumerate([10, 0, 30, 5, 5, 50, 1, 9])]
    layout = ray_checks.plan(
        fragments, fragments, cpus=4, shard_rows=1_000, route_rows=1_000, part_bytes=1
    )
    assert [f for shard in layout.shards for f in shard] == [f for f, _ in fragments]
    assert [f for route in layout.routes for f in route] == [f for f, _ in fragments]
    assert len(layout.shards) == 4 and all(layout.shards)
    assert layout.shards[0] != layout.shards[-1]  # the first and last fragment apart
    # Two fragments, however uneven, make two runs when two are asked.
    for rows in ([1, 100], [100, 1], [5_652, 9_348]):
        two = ray_checks.plan(list(enumerate(rows)), [], cpus=2, shard_rows=30)
        assert two.shards == [[0], [1]], rows
    for s, shard in enumerate(layout.shards):
        assert all(layout.shard_of[f] == s for f in shard)
    # At most one run per fragment; by rows when rows ask for more than CPUs.
    assert len(ray_checks.plan(fragments[:2], fragments, cpus=8, part_bytes=1).shards) == 2
    assert 2 <= len(ray_checks.plan(fragments, [], cpus=1, shard_rows=30).shards) <= 4


def test_a_null_label_in_a_shard_is_refused_naming_the_asset(tmp_path: Path) -> None:
    db = lancedb.connect(str(tmp_path / "db"))
    base = db.create_table(
        "base",
        pa.table(
            {
                "id": np.arange(4),
                "label": pa.array([1, None, 2, 1], pa.int32()),
                "user": np.arange(4),
                "t": np.arange(4, dtype=np.float64),
            }
        ),
    )
    stored = _permutation(db, np.arange(4, dtype=np.uint64), np.zeros(4, np.uint64), 1)
    with pytest.raises(SpecError, match=r"asset 'perm': column 'label' of table 'base' has null"):
        _in_process(stored, base, 3, cpus=1, shard_rows=10, route_rows=10)


def _copy(db: Any, name: str, rows: pa.Table, fragments: int) -> Any:
    """``rows`` as table ``name`` of ``fragments`` fragments."""
    size = -(-rows.num_rows // fragments)
    table = db.create_table(name, rows.slice(0, size), mode="overwrite")
    for start in range(size, rows.num_rows, size):
        table.add(rows.slice(start, size))
    return table


def test_training_range_tasks_give_the_streamed_figures(tmp_path: Path) -> None:
    uri = str(tmp_path / "db")
    conn = lancedb.connect(uri)
    _base(conn)
    db = LanceDBResource(uri=uri, engine="local")
    folds = folds_asset("folds", source="base", filter=FILTER, folds=KFold(k=5, seed=1))
    assert dg.materialize(
        [folds, dg.AssetSpec("base")],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        selection=[folds],
    ).success
    train, ranges = checks._persisted_training(db, "folds", db.open_table("folds").version)
    # Both tables again in several fragments, so that chunks start and end inside them.
    stored = _copy(conn, "folds_copy", read_all(db.open_table("folds")), 3)
    written = read_all(train)
    sizes = np.bincount(read_all(stored).column("split_id").to_numpy().astype(np.int64))
    ids = written.column("row_id").to_numpy()
    # A training row of fold 1's range swapped for a row of fold 1 (from the folds table):
    # the training table no longer matches the folds rotated.
    folds_rows = read_all(stored)
    fold_one = folds_rows.column("row_id").to_numpy()[folds_rows.column("split_id").to_numpy() == 1]
    bad = ids.copy()
    bad[ranges[1][0] + 7] = fold_one[0]
    # Fold 1 reading fold 0's range, which holds fold 1's rows: the table matches, the range
    # trains fold 1 on its own validation rows (counted by the tasks, `own_fold_rows`).
    own = [list(r) for r in ranges]
    own[1] = list(ranges[0])
    cases = {"sound": (ids, ranges), "swapped_row": (bad, ranges), "own_rows": (ids, own)}
    for name, (row_ids, cut) in cases.items():
        copy = _copy(conn, "train_copy", written.set_column(0, "row_id", pa.array(row_ids)), 4)
        expected = checks._rotated_training_streamed(stored, sizes, copy, cut)
        chunks = ray_checks.training_chunks(len(row_ids), cpus=3, rows=5_000)
        results = ray_checks.training_tasks(
            _here, stored, copy, sizes, cut, chunks, storage_options=None
        )
        assert len(results) > 3, name  # several chunks, across fragment and fold boundaries
        got = ray_checks.training_figures(results, sizes, cut, length=len(row_ids))
        assert got == expected, name
        assert got["passed"] == (name == "sound"), (name, got)
        assert got["training_table_matches_folds"] == (name != "swapped_row"), name
        if name == "own_rows":
            assert got["train_rows_in_own_validation_fold"][1] == sizes[1] > 0


def test_plan_keeps_routed_parts_large_enough_to_stay_out_of_the_driver() -> None:
    # 128 CPUs, 1M permutation rows in 100 fragments over 100 base fragments: one task per
    # CPU each way would make 100 x 100 parts of ~900 bytes, which Ray keeps in the driver.
    fragments = [(i, 10_000) for i in range(100)]
    layout = ray_checks.plan(fragments, fragments, cpus=128)
    parts = len(layout.shards) * len(layout.routes)
    assert 1 < parts <= 1_000_000 * 9 // ray_checks.PART_BYTES  # ~1 MiB or more per part
    # Memory still rules: shards of at most `shard_rows` rows, routes of `route_rows`.
    layout = ray_checks.plan(fragments, fragments, cpus=128, shard_rows=50_000, route_rows=50_000)
    assert (len(layout.shards), len(layout.routes)) == (20, 20)
    # With parts allowed small, one per CPU (at most one per fragment).
    layout = ray_checks.plan(fragments, fragments, cpus=128, part_bytes=1)
    assert (len(layout.shards), len(layout.routes)) == (100, 100)
