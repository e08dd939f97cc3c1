"""The split table and class-balance chart every permutation and folds materialization records.

Expected figures are recomputed independently: the persisted permutation table joined to the
base table's label column with pandas, counted with ``groupby``.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from perm_assets import (
    GroupSplit,
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    SpecError,
    StratifiedKFold,
    StratifiedSplit,
    folds_asset,
    permutation_asset,
)
from perm_assets.balance import CHART_KEY, FOLDS_KEY, MAX_CLASS_COLUMNS, SPLITS_KEY
from perm_assets.build import positions_in
from perm_assets.tables import read_all
from tests.conftest import Runner, make_rows

N = 4_001


def _source(classes: int) -> dg.AssetsDefinition:
    @dg.asset(name="rows")
    def rows() -> pa.Table:
        return make_rows(N, classes=classes)

    return rows


def _joined(db: LanceDBResource, table: str, label: str = "label") -> pd.DataFrame:
    """Every permuted row's split id and label, joined by row id (pandas, not the project)."""
    perm = read_all(db.open_table(table)).to_pandas()
    base = read_all(db.open_table("rows").search().select([label, "group"]).with_row_id(True))
    return perm.merge(base.to_pandas(), left_on="row_id", right_on="_rowid", how="left")


def _records(run: Runner, asset: str, key: str = SPLITS_KEY) -> list[dict[str, Any]]:
    value = run.metadata(asset)[key]
    return [dict(r.data) for r in value.records]


def _columns(run: Runner, asset: str, key: str = SPLITS_KEY) -> list[str]:
    table = run.metadata(asset)[key]  # a TableMetadataValue's value: the value itself
    return [c.name for c in table.schema.columns]


def _svg(run: Runner, asset: str) -> ET.Element:
    markdown = run.metadata(asset)[CHART_KEY]
    found = re.search(r"!\[[^\]]*\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert found, markdown[:200]
    return ET.fromstring(base64.b64decode(found.group(1)))


def test_stratified_split_table_counts_every_class_per_split(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(classes=7)
    splits = permutation_asset(
        "splits",
        source=source,
        filter="id % 5 != 0",
        split=StratifiedSplit(
            label="label", ratios=[0.7, 0.2, 0.1], seed=1, split_names=["train", "val", "test"]
        ),
    )
    run([source, splits])
    joined = _joined(db, "splits")
    counts = joined.groupby(["split_id", "label"]).size().unstack(fill_value=0)
    selected = len(joined)
    records = _records(run, "splits")
    assert [r["split"] for r in records] == ["train", "val", "test"]
    metadata = run.metadata("splits")
    for i, record in enumerate(records):
        assert record["rows"] == int(counts.loc[i].sum()) == metadata[f"rows/{record['split']}"]
        assert record["share"] == pytest.approx(counts.loc[i].sum() / selected, abs=1e-6)
        assert record["requested_share"] == pytest.approx([0.7, 0.2, 0.1][i])
        for cls in counts.columns:
            assert record[f"label={cls}"] == int(counts.loc[i, cls])
        assert record["classes"] == 7
        # Stratified: every class within one row of its exact share of the split.
        expected = counts.sum(axis=0) * counts.loc[i].sum() / selected
        deviation = (counts.loc[i] - expected).abs()
        assert record["max_class_dev_rows"] == pytest.approx(deviation.max(), abs=1e-3)
        assert record["max_class_dev_rows"] <= 1.0 + 1e-9
        assert record["worst_class"] == str(deviation.idxmax())
    # The chart: one bar per split, then a row of 7 class bars per split.
    svg = _svg(run, "splits")
    rects = svg.findall("{http://www.w3.org/2000/svg}rect")
    filled = [r for r in rects if r.get("fill") != "none"]
    assert len(filled) == 3 + 3 * 7
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert {"train", "val", "test"} <= set(texts)
    assert {str(c) for c in range(7)} <= set(texts)


def test_label_hint_reports_classes_of_a_random_split_without_changing_rows(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(classes=MAX_CLASS_COLUMNS + 5)
    split = RandomSplit(ratios=[0.5, 0.5], seed=9, split_names=["a", "b"])
    hinted = permutation_asset("hinted", source=source, split=split, label="label")
    plain = permutation_asset("plain", source=source, split=split)
    run([source, hinted, plain])
    assert read_all(db.open_table("hinted")).equals(read_all(db.open_table("plain")))
    # Without a hint: rows and shares only.
    assert _columns(run, "plain") == ["split", "rows", "share", "requested_share"]
    columns = _columns(run, "hinted")
    # Too many classes for a column each: the summary only.
    assert not [c for c in columns if c.startswith("label=")]
    joined = _joined(db, "hinted")
    counts = joined.groupby(["split_id", "label"]).size().unstack(fill_value=0)
    for i, record in enumerate(_records(run, "hinted")):
        in_split = counts.loc[i] / counts.loc[i].sum()
        overall = counts.sum(axis=0) / counts.to_numpy().sum()
        assert record["classes"] == MAX_CLASS_COLUMNS + 5
        assert record["max_class_dev_pp"] == pytest.approx(
            (in_split - overall).abs().max() * 100, abs=1e-3
        )


def test_group_split_reports_groups_per_split_and_none_shared(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(classes=3)
    splits = permutation_asset(
        "by_group",
        source=source,
        split=GroupSplit(group="group", ratios=[0.75, 0.25], seed=2, split_names=["x", "y"]),
    )
    run([source, splits])
    joined = _joined(db, "by_group")
    per_split = joined.groupby("split_id")["group"].nunique()
    records = _records(run, "by_group")
    assert [r["groups"] for r in records] == per_split.tolist()
    assert all(r["groups_shared"] == 0 for r in records)
    assert "classes" not in records[0]  # a group split without a label reports no classes


def test_folds_table_has_a_row_per_fold_with_training_rows(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(classes=4)
    folds = folds_asset("folds", source=source, folds=StratifiedKFold(k=3, label="label", seed=0))
    run([source, folds])
    records = _records(run, "folds", FOLDS_KEY)
    joined = _joined(db, "folds")
    counts = joined.groupby(["split_id", "label"]).size().unstack(fill_value=0)
    assert [r["fold"] for r in records] == ["fold_0", "fold_1", "fold_2"]
    for i, record in enumerate(records):
        assert record["rows"] == int(counts.loc[i].sum())
        assert record["train_rows"] == N - record["rows"]
        assert record["requested_share"] == pytest.approx(1 / 3)
        assert [record[f"label={c}"] for c in range(4)] == counts.loc[i].tolist()
        assert record["max_class_dev_rows"] <= 1.0 + 1e-9


def test_a_label_hint_naming_no_column_fails_before_anything_is_written(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(classes=3)
    good = permutation_asset("splits", source=source, split=RandomSplit(ratios=[0.5, 0.5], seed=1))
    run([source, good])
    version = db.open_table("splits").version
    bad = permutation_asset(
        "splits", source=source, split=RandomSplit(ratios=[0.5, 0.5], seed=1), label="lable"
    )
    with pytest.raises(SpecError, match=r"asset 'splits'.*'lable'.*columns: id, label"):
        run([source, bad], selection=[bad])
    assert db.open_table("splits").version == version


def test_label_hint_must_name_a_column_at_definition_time() -> None:
    with pytest.raises(SpecError, match=r"asset 'splits': label='  ' must name a column"):
        permutation_asset("splits", source="rows", label="  ")


def test_label_hint_counts_nulls_as_a_class_of_their_own(run: Runner, db: LanceDBResource) -> None:
    @dg.asset(name="rows")
    def rows() -> pa.Table:
        data = make_rows(300, classes=3)
        labels = pa.array([None if i % 10 == 0 else f"c{i % 3}" for i in range(300)])
        return data.set_column(data.schema.get_field_index("label"), "label", labels)

    splits = permutation_asset(
        "splits", source=rows, split=RandomSplit(ratios=[0.5, 0.5], seed=3), label="label"
    )
    run([rows, splits])
    records = _records(run, "splits")
    assert sum(r["label=null"] for r in records) == 30
    assert sum(r["label=c1"] for r in records) == 90  # i % 3 == 1 and i % 10 != 0: 100 - 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_positions_by_address_agree_with_the_sorted_join(seed: int) -> None:
    """The lookup-table join (row addresses) and the sorted join give the same positions, and
    both refuse an id the scan lacks."""
    rng = np.random.default_rng(seed)
    fragments = rng.integers(0, 6, size=5_000).astype(np.uint64)
    offsets = rng.integers(0, 3_000, size=5_000).astype(np.uint64)
    scanned = np.unique((fragments << np.uint64(32)) | offsets)  # ascending, like a scan
    wanted = rng.permutation(scanned)[: scanned.size // 2]
    fast = positions_in(scanned, wanted)
    assert np.array_equal(scanned[fast], wanted)
    sparse = scanned * np.uint64(1 << 20)  # too sparse for a table: the sorted join
    assert np.array_equal(positions_in(sparse, wanted * np.uint64(1 << 20)), fast)
    gap = np.setdiff1d(np.arange(3_000, dtype=np.uint64), scanned)[:1]  # fragment 0, a hole
    beyond = np.array([np.uint64(3_000)])  # past fragment 0's highest offset
    for stray in [gap, beyond, np.array([np.uint64(99) << np.uint64(32)])]:
        with pytest.raises(ValueError, match="row ids that the filter does not select"):
            positions_in(scanned, np.concatenate([wanted, stray]))


def test_out_of_core_engine_reports_the_same_kind_of_table(tmp_path: Path) -> None:
    """The local engine streams its rows: the report reads them from the stream, not from an
    (empty) in-memory table."""
    db = LanceDBResource(uri=str(tmp_path / "lancedb"), engine="local")
    run = Runner(
        {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}, dg.DagsterInstance.ephemeral()
    )
    source = _source(classes=5)
    splits = permutation_asset(
        "splits",
        source=source,
        split=StratifiedSplit(label="label", ratios=[0.6, 0.4], seed=4, split_names=["a", "b"]),
    )
    folds = folds_asset("folds", source=source, folds=StratifiedKFold(k=3, label="label", seed=1))
    run([source, splits, folds])
    assert run.metadata("splits")["perm_assets/engine"].startswith("local")
    for asset, key in [("splits", SPLITS_KEY), ("folds", FOLDS_KEY)]:
        joined = _joined(db, asset)
        counts = joined.groupby(["split_id", "label"]).size().unstack(fill_value=0)
        records = _records(run, asset, key)
        assert len(records) == counts.shape[0]
        for i, record in enumerate(records):
            assert [record[f"label={c}"] for c in range(5)] == counts.loc[i].tolist()
            assert record["max_class_dev_rows"] <= 1.0 + 1e-9
