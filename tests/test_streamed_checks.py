"""Checks and the balance report computed in batches (`perm_assets.membership`).

The checks read the written permutation table and the base (at its pinned version) batch by
batch, with one byte per base row address. Here: they catch a duplicated, a missing and a
foreign row id in a persisted table that the streamed (local engine) path wrote and that is
then corrupted on purpose; and their figures equal the in-memory computation on 100k-row
tables of several fragments with deleted rows (random, stratified, group, time, folds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from perm_assets import (
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    Shuffle,
    StratifiedSplit,
    assign,
    checks,
    permutation_asset,
)
from perm_assets.balance import FOLDS_KEY, SPLITS_KEY
from perm_assets.build import PermutationData
from perm_assets.factories import folds_asset
from perm_assets.membership import Membership, arrow_batches, table_batches
from perm_assets.specs import GroupSplit, PermutationSpec, StratifiedKFold, TimeSplit
from perm_assets.tables import SPEC_KEY, SPLIT_NAMES_KEY, read_all

N = 100_000
CLASSES = 20


def _write_base(uri: str, n: int = N, **options: str) -> None:
    """``base``: ``n`` rows in three fragments, then every 97th row deleted (so row addresses
    have holes and fragments' physical rows exceed their live rows)."""
    ids = np.arange(n, dtype=np.int64)
    rows = pa.table(
        {
            "id": ids,
            # Skewed classes: the largest ~6x the smallest.
            "label": np.floor(np.sqrt((ids * 7919) % (CLASSES * CLASSES))).astype(np.int32),
            "user": (ids * 31) % 5_003,
            "t": ((ids * 7) % 1_000).astype(np.float64),
        }
    )
    db = lancedb.connect(uri)
    third = n // 3
    table = db.create_table("base", rows.slice(0, third), storage_options=options or None)
    table.add(rows.slice(third, third))
    table.add(rows.slice(2 * third))
    table.delete("id % 97 = 5")


def _materialize(db: LanceDBResource, asset: Any) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [asset, dg.AssetSpec("base")],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        selection=[asset],
    )


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Each check's figures by name, ``passed`` included."""
    out = {}
    for evaluation in result.get_asset_check_evaluations():
        figures = {k: v.value for k, v in evaluation.metadata.items()}
        out[evaluation.check_name] = {**figures, "passed": evaluation.passed}
    return out


def _as_written(
    db: LanceDBResource, table: str, split_rows: list[int]
) -> tuple[PermutationData, list[checks.Check]]:
    """The `PermutationData` a streamed (local engine) build of ``split_rows`` rows per split
    hands the checks: schema only, the rows as a stream of the table's current version."""
    stored = db.open_table(table)
    stored = db.open_table(table, version=stored.version)
    metadata = stored.schema.metadata or {}
    spec = PermutationSpec.model_validate_json(metadata[SPEC_KEY.encode()])
    names = json.loads(metadata[SPLIT_NAMES_KEY.encode()])
    data = PermutationData(
        data=stored.schema.empty_table(),
        base_table="base",
        base_version=int(metadata[b"base_version"]),
        split_names=tuple(names),
        split_rows=tuple(split_rows),
        spec=spec,
        stream=lambda: table_batches(stored),
    )
    return data, checks.permutation_checks(spec)


def _corrupt(db: LanceDBResource, table: str, row_ids: np.ndarray, split_ids: np.ndarray) -> None:
    """Overwrite ``table`` with these rows, its schema metadata kept."""
    metadata = db.open_table(table).schema.metadata
    corrupted = pa.table(
        {"row_id": pa.array(row_ids, pa.uint64()), "split_id": pa.array(split_ids, pa.uint64())}
    ).replace_schema_metadata(metadata)
    db.connect().create_table(table, corrupted, mode="overwrite")


def _cover_figures(db: LanceDBResource, table: str, split_rows: list[int]) -> dict[str, Any]:
    data, wanted = _as_written(db, table, split_rows)
    first = next(iter(checks.run_permutation_checks(db, table, data, wanted)))
    assert first.check_name == checks.Check.DISJOINT_COMPLETE.value
    figures = {k: v.value for k, v in first.metadata.items()}
    return {**figures, "passed": first.passed}


def test_checks_catch_corruption_of_a_streamed_permutation(tmp_path: Path) -> None:
    uri = str(tmp_path / "db")
    _write_base(uri, 30_000)
    db = LanceDBResource(
        uri=uri, engine="local", spill_dir=str(tmp_path / "spill"), local_bucket_rows=4096
    )
    asset = permutation_asset(
        "perm",
        source="base",
        filter="label < 15",
        split=RandomSplit(ratios=[0.8, 0.2], seed=3),
        shuffle=Shuffle(seed=4),
    )
    assert all(e["passed"] for e in _evaluations(_materialize(db, asset)).values())
    written = read_all(db.open_table("perm"))
    row_ids, split_ids = written.column("row_id").to_numpy(), written.column("split_id").to_numpy()
    sizes = np.bincount(split_ids).tolist()
    sound = _cover_figures(db, "perm", sizes)
    assert sound["passed"] and sound["missing_rows"] == sound["duplicate_rows"] == 0
    base = read_all(db.open_table("base").search().select(["label"]).with_row_id(True))
    outside = base.column("_rowid").to_numpy()[base.column("label").to_numpy() >= 15]

    # One row's id replaced by an id the filter does not select: as many rows as expected,
    # none twice, so a count-only check passed it; one filtered row is missing.
    _corrupt(db, "perm", np.where(np.arange(row_ids.size) == 10, outside[0], row_ids), split_ids)
    figures = _cover_figures(db, "perm", sizes)
    assert not figures["passed"]
    assert (figures["missing_rows"], figures["extra_rows"], figures["duplicate_rows"]) == (1, 1, 0)

    # One row's id replaced by another row's: a duplicate (across splits) and a missing row.
    other = int(np.flatnonzero(split_ids != split_ids[0])[0])
    _corrupt(db, "perm", np.where(np.arange(row_ids.size) == 0, row_ids[other], row_ids), split_ids)
    figures = _cover_figures(db, "perm", sizes)
    assert not figures["passed"]
    assert (figures["duplicate_rows"], figures["missing_rows"], figures["extra_rows"]) == (1, 1, 0)

    # A row dropped: missing, and fewer rows persisted than the build wrote.
    _corrupt(db, "perm", row_ids[1:], split_ids[1:])
    figures = _cover_figures(db, "perm", sizes)
    assert not figures["passed"]
    assert (figures["missing_rows"], figures["rows"]) == (1, row_ids.size - 1)

    # An id past the base's last fragment and a split id past the declared splits.
    stray = (np.uint64(99) << np.uint64(32)) | np.uint64(7)
    _corrupt(
        db, "perm", np.append(row_ids, stray), np.append(np.where(split_ids == 1, 5, split_ids), 0)
    )
    figures = _cover_figures(db, "perm", sizes)
    assert not figures["passed"]
    assert figures["extra_rows"] == 1
    assert figures["out_of_range_ids"] == int(np.count_nonzero(split_ids == 1))


def _in_memory(db: LanceDBResource, filter: str | None, columns: list[str]) -> tuple[Any, ...]:
    """Row ids, split ids of the written ``perm``, and the filtered base rows' columns in the
    permutation's split order: the in-memory computation the streamed checks replace."""
    perm = read_all(db.open_table("perm"))
    row_ids, split_ids = perm.column("row_id").to_numpy(), perm.column("split_id").to_numpy()
    query = db.open_table("base").search().select([*columns, "id"]).with_row_id(True)
    base = read_all(query.where(filter) if filter else query)
    scanned_ids = base.column("_rowid").to_numpy()
    by_row = np.full(scanned_ids.size, -1, dtype=np.int64)
    by_row[np.searchsorted(scanned_ids, row_ids)] = split_ids.astype(np.int64)
    return row_ids, split_ids, scanned_ids, by_row, base


def _without_persisted(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if not k.startswith("persisted_")}


def _splits_table(result: dg.ExecuteInProcessResult, key: str) -> list[dict[str, Any]]:
    metadata = result.asset_materializations_for_node("perm")[0].metadata
    return [dict(r.data) for r in metadata[key].value.records]  # type: ignore[union-attr]


@pytest.mark.parametrize("engine", ["lancedb", "local"])
def test_random_split_figures_equal_in_memory(
    tmp_path: Path, engine: Literal["lancedb", "local"]
) -> None:
    uri = str(tmp_path / "db")
    _write_base(uri)
    db = LanceDBResource(uri=uri, engine=engine, spill_dir=str(tmp_path / "spill"))
    asset = permutation_asset(
        "perm",
        source="base",
        filter="label < 17",
        split=RandomSplit(ratios=[0.7, 0.2, 0.1], seed=5),
        shuffle=Shuffle(seed=6),
    )
    result = dg.materialize(
        [asset, dg.AssetSpec("base")],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        selection=[asset],
    )
    got = _evaluations(result)[checks.Check.DISJOINT_COMPLETE.value]
    row_ids, split_ids, scanned, _, _ = _in_memory(db, "label < 17", [])
    expected = checks._cover(scanned, row_ids, split_ids, 3).figures
    assert _without_persisted(got) == expected
    assert expected["rows"] == scanned.size > 70_000 and expected["passed"]


def test_stratified_group_time_figures_equal_in_memory(tmp_path: Path) -> None:
    uri = str(tmp_path / "db")
    _write_base(uri)
    db = LanceDBResource(uri=uri)
    ratios = [0.6, 0.25, 0.15]

    asset = permutation_asset(
        "perm",
        source="base",
        filter="id % 5 != 0",
        split=StratifiedSplit(label="label", ratios=ratios, seed=2),
    )
    result = _materialize(db, asset)
    got = _evaluations(result)
    row_ids, split_ids, scanned, by_row, base = _in_memory(db, "id % 5 != 0", ["label"])
    labels = base.column("label").to_numpy()
    assert _without_persisted(got[checks.Check.DISJOINT_COMPLETE.value]) == (
        checks._cover(scanned, row_ids, split_ids, 3).figures
    )
    assert got[checks.Check.STRATIFIED.value] == {
        **assign.check_stratified(by_row, labels, ratios),
        "passed": True,
    }
    # The balance report: rows of every class in every split, counted in numpy.
    records = _splits_table(result, SPLITS_KEY)
    present = np.unique(labels).tolist()  # the filter leaves class 0 out
    assert len(records) == 3 and len(present) == CLASSES - 1
    for s, record in enumerate(records):
        counts = np.bincount(labels[by_row == s], minlength=CLASSES)
        assert {k: v for k, v in record.items() if k.startswith("label=")} == {
            f"label={c}": counts[c] for c in present
        }

    asset = permutation_asset(
        "perm", source="base", split=GroupSplit(group="user", ratios=ratios, seed=3)
    )
    result = _materialize(db, asset)
    got = _evaluations(result)[checks.Check.GROUPS.value]
    _, _, _, by_row, base = _in_memory(db, None, ["user"])
    users = base.column("user").to_numpy()
    assert got == {**assign.check_groups(by_row, users), "passed": True}
    records = _splits_table(result, SPLITS_KEY)
    for s, record in enumerate(records):
        assert record["groups"] == np.unique(users[by_row == s]).size
        assert record["groups_shared"] == 0

    asset = permutation_asset("perm", source="base", split=TimeSplit(column="t", ratios=ratios))
    got = _evaluations(_materialize(db, asset))[checks.Check.TIME_ORDER.value]
    _, _, _, by_row, base = _in_memory(db, None, ["t"])
    assert got == checks._time_order(base.column("t").to_numpy(), by_row)


def test_folds_balance_equals_in_memory(tmp_path: Path) -> None:
    uri = str(tmp_path / "db")
    _write_base(uri)
    db = LanceDBResource(uri=uri)
    asset = folds_asset("perm", source="base", folds=StratifiedKFold(k=4, label="label", seed=1))
    result = _materialize(db, asset)
    assert all(e["passed"] for e in _evaluations(result).values())
    _, _, _, by_row, base = _in_memory(db, None, ["label"])
    labels = base.column("label").to_numpy()
    for fold, record in enumerate(_splits_table(result, FOLDS_KEY)):
        counts = np.bincount(labels[by_row == fold], minlength=CLASSES)
        assert [record[f"label={c}"] for c in range(CLASSES)] == counts.tolist()


def test_membership_spills_to_a_file_it_removes(tmp_path: Path) -> None:
    uri = str(tmp_path / "db")
    _write_base(uri, 20_000)
    db = LanceDBResource(uri=uri)
    _materialize(
        db, permutation_asset("perm", source="base", split=RandomSplit(ratios=[0.5, 0.5], seed=1))
    )
    base = db.open_table("base")
    perm = db.open_table("perm")
    spill = tmp_path / "spill"
    spill.mkdir()
    in_memory = Membership.build(base, table_batches(perm), 2)
    on_disk = Membership.build(
        base, arrow_batches(read_all(perm)), 2, spill_dir=str(spill), budget_bytes=0
    )
    assert in_memory is not None and on_disk is not None
    assert isinstance(on_disk.split_of, np.memmap) and len(os.listdir(spill)) == 1
    assert np.array_equal(np.asarray(on_disk.split_of), in_memory.split_of)
    assert (on_disk.rows, on_disk.duplicate_rows, on_disk.strays) == (base.count_rows(), 0, 0)
    on_disk.close()
    in_memory.close()
    assert os.listdir(spill) == []


def test_stable_row_ids_keep_the_in_memory_path(tmp_path: Path) -> None:
    """Row ids that are not addresses: no membership, and the checks still hold."""
    uri = str(tmp_path / "db")
    _write_base(uri, 20_000, new_table_enable_stable_row_ids="true")
    db = LanceDBResource(uri=uri)
    asset = permutation_asset(
        "perm",
        source="base",
        split=StratifiedSplit(label="label", ratios=[0.5, 0.5], seed=1),
    )
    result = _materialize(db, asset)
    assert all(e["passed"] for e in _evaluations(result).values())
    perm = db.open_table("perm")
    assert Membership.build(db.open_table("base"), table_batches(perm), 2) is None


def test_cyclic_reader_wraps_across_batches(tmp_path: Path) -> None:
    """The folds check reads the folds table from row ``first`` on, wrapping at its end, in
    lockstep with the training table: across fragments and any take sizes."""
    db = lancedb.connect(str(tmp_path / "db"))
    rows = pa.table(
        {"row_id": pa.array(range(10), pa.uint64()), "split_id": pa.array([0] * 10, pa.uint64())}
    )
    table = db.create_table("t", rows.slice(0, 4))
    table.add(rows.slice(4, 3))
    table.add(rows.slice(7))
    cyclic = checks._Cyclic(table, 3)
    taken = [cyclic.take(size)[0].tolist() for size in (2, 6, 9, 0, 3)]
    flat = [i for part in taken for i in part]
    assert [len(part) for part in taken] == [2, 6, 9, 0, 3]
    assert flat == [(3 + i) % 10 for i in range(20)]


def test_a_failing_read_is_raised_not_swallowed() -> None:
    def batches() -> Any:
        yield pa.record_batch({"row_id": pa.array([1], pa.uint64())})
        raise OSError("disk went away")

    from perm_assets.membership import prefetched

    got = prefetched(batches())
    assert next(got).num_rows == 1
    with pytest.raises(OSError, match="disk went away"):
        next(got)
