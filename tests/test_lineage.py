"""Lineage: observed sources, reproduction of past views, pins against re-created tables,
and retention, with real tables and real materializations."""

from datetime import timedelta
from typing import Any

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest
from lancedb.permutation import Permutation

from perm_assets import (
    LanceDBResource,
    RandomSplit,
    Shuffle,
    TableNotFoundError,
    permutation_asset,
)
from perm_assets.errors import LineageError
from perm_assets.lineage import load_view, recorded_inputs, reproduce_input
from perm_assets.pins import retain
from perm_assets.sources import lancedb_table_source
from perm_assets.views import ViewRequest, open_view, read_arrow
from tests.conftest import Runner, make_rows


def _status(run: Runner, assets: list[Any], key: dg.AssetKey) -> StaleStatus:
    graph = dg.Definitions(assets=assets, resources=run.resources).resolve_asset_graph()
    resolver = CachingStaleStatusResolver(run.instance, graph, LoadingContextForTest(run.instance))
    return resolver.get_status(key)


# Dagster's stale-status resolver reads its own deprecated OpDefinition.version.
@pytest.mark.filterwarnings(
    "ignore:Property `OpDefinition.version` is deprecated:DeprecationWarning"
)
def test_observed_source_marks_permutations_stale_until_they_rerun(
    run: Runner, db: LanceDBResource
) -> None:
    db.connect().create_table("raw_events", make_rows(100))
    events = lancedb_table_source("events", table="raw_events")
    splits = permutation_asset(
        "events_splits", source=events, split=RandomSplit(ratios=[0.5, 0.5], seed=1)
    )
    assets = [events, splits]
    run(assets, selection=[events])  # an observation: records raw_events@1
    run(assets, selection=[splits])
    assert _status(run, assets, splits.key) == StaleStatus.FRESH
    assert run.metadata("events_splits")["lance/base_version"] == 1

    db.connect().open_table("raw_events").add(make_rows(20, start=100))
    run(assets, selection=[events])
    assert _status(run, assets, splits.key) == StaleStatus.STALE
    run(assets, selection=[splits])
    assert _status(run, assets, splits.key) == StaleStatus.FRESH
    meta = run.metadata("events_splits")
    assert (meta["lance/base_version"], meta["dagster/row_count"]) == (2, 120)


def test_the_source_is_read_at_the_observed_version_not_the_latest(
    run: Runner, db: LanceDBResource
) -> None:
    db.connect().create_table("raw_events", make_rows(100))
    events = lancedb_table_source("events", table="raw_events")
    splits = permutation_asset("events_splits", source=events)
    run([events, splits], selection=[events])
    db.connect().open_table("raw_events").add(make_rows(20, start=100))  # not observed yet
    run([events, splits], selection=[splits])
    assert run.metadata("events_splits")["dagster/row_count"] == 100


def _growing_source() -> tuple[dg.AssetsDefinition, dict[str, int]]:
    state = {"start": 0}

    @dg.asset(name="rows", metadata={"write_mode": "append"})
    def rows() -> pa.Table:
        table = make_rows(300, start=state["start"])
        state["start"] += 300
        return table

    return rows, state


def _trainer(upstream: dg.AssetsDefinition, seen: list[pa.Table]) -> dg.AssetsDefinition:
    @dg.asset(
        name="trainer",
        ins={
            "data": dg.AssetIn(
                key=upstream.key,
                metadata={"split": "train", "columns": ["id", "value"], "format": "arrow"},
            )
        },
    )
    def trainer(data: Permutation) -> None:
        seen.append(read_arrow(data))

    return trainer


def test_a_past_training_view_is_reproduced_after_refresh_and_resplit(
    run: Runner, db: LanceDBResource
) -> None:
    source, _ = _growing_source()
    splits = permutation_asset(
        "splits",
        source=source,
        split=RandomSplit(ratios=[0.7, 0.3], seed=1, split_names=["train", "test"]),
        shuffle=Shuffle(seed=2),
    )
    seen: list[pa.Table] = []
    trainer = _trainer(splits, seen)
    assets = [source, splits, trainer]
    first_run = run(assets).run_id
    first = seen[-1]

    # Refresh the source (append via Dagster; update and delete behind its back), re-split.
    run(assets, selection=[source])
    table = db.connect().open_table("rows")
    table.update(where="id < 50", values={"value": -1.0})
    table.delete("id >= 250 AND id < 300")
    run(assets, selection=[source])
    run(
        assets,
        selection=[splits, trainer],
        run_config={"ops": {"splits": {"config": {"seed": 9, "shuffle_seed": 9}}}},
    )
    assert not seen[-1].equals(first)

    again = reproduce_input(db, run.instance, run_id=first_run, input_name="data")
    assert read_arrow(again).equals(first)  # same rows, same order, same columns, same values
    assert again.lineage.split == "train"
    assert again.lineage.format == "arrow"

    recorded = recorded_inputs(run.instance, first_run)
    assert [(r.step_key, r.input_name) for r in recorded] == [("trainer", "data")]
    assert recorded[0].metadata["lineage/columns"] == "id, value"

    # The permutation as that run materialized it is reachable too.
    view = load_view(
        "splits", db=db, instance=run.instance, run_id=first_run, request=ViewRequest(split=0)
    )
    assert read_arrow(view).select(["id", "value"]).equals(first)


def test_reproducing_an_input_the_run_did_not_record_names_what_it_did(
    run: Runner, db: LanceDBResource
) -> None:
    source, _ = _growing_source()
    splits = permutation_asset(
        "splits",
        source=source,
        split=RandomSplit(ratios=[0.5, 0.5], seed=1, split_names=["train", "test"]),
    )
    result = run([source, splits, _trainer(splits, [])])
    with pytest.raises(
        LineageError, match=r"no view for input 'labels'.*recorded inputs: \['data'\]"
    ):
        reproduce_input(db, run.instance, run_id=result.run_id, input_name="labels")


def test_a_recreated_base_table_fails_instead_of_returning_other_rows(
    run: Runner, db: LanceDBResource
) -> None:
    source, _ = _growing_source()
    splits = permutation_asset(
        "splits", source=source, split=RandomSplit(ratios=[0.5, 0.5], seed=1)
    )
    run([source, splits])
    version = run.metadata("splits")["lance/version"]

    base_version = run.metadata("splits")["lance/base_version"]
    connection = db.connect()
    connection.drop_table("rows")
    # Re-created with other rows, up to the same version number: lancedb alone would read it.
    table = connection.create_table("rows", make_rows(300, start=5_000))
    while table.version < base_version:
        table.add(make_rows(10, start=9_000 + table.version * 10))
    with pytest.raises(
        LineageError,
        match=rf"asset 'splits' pins version {base_version} of base table 'rows'.*re-created",
    ):
        open_view(db, asset="splits", table="splits", version=version, request=ViewRequest(split=0))


def test_a_deleted_permutation_table_says_which_asset_to_rematerialize(
    run: Runner, db: LanceDBResource
) -> None:
    source, _ = _growing_source()
    splits = permutation_asset(
        "splits",
        source=source,
        split=RandomSplit(ratios=[0.5, 0.5], seed=1, split_names=["train", "test"]),
    )
    run([source, splits])
    db.connect().drop_table("splits")
    trainer = _trainer(splits, [])
    with pytest.raises(
        TableNotFoundError, match=r"LanceDB table 'splits' does not exist.*Materialize"
    ):
        run([source, splits, trainer], selection=[trainer])


def test_pins_survive_cleanup_and_retain_retires_the_unneeded_ones(
    run: Runner, db: LanceDBResource
) -> None:
    source, _ = _growing_source()
    splits = permutation_asset(
        "splits",
        source=source,
        split=RandomSplit(ratios=[0.5, 0.5], seed=1, split_names=["train", "test"]),
    )
    seen: list[pa.Table] = []
    trainer = _trainer(splits, seen)
    assets = [source, splits, trainer]
    first_run = run(assets).run_id
    first_base = run.metadata("splits")["lance/base_version"]
    run(assets)  # a new base version, a new permutation version
    second_base = run.metadata("splits")["lance/base_version"]
    base = db.connect().open_table("rows")
    assert sorted(v["version"] for v in base.tags.list().values()) == [first_base, second_base]

    # A plain cleanup cannot remove the pinned older version.
    with (
        pytest.warns(UserWarning, match="removes every version except the latest"),
        pytest.raises(RuntimeError, match=r"tagged version"),
    ):
        base.optimize(cleanup_older_than=timedelta(0))
    assert read_arrow(
        reproduce_input(db, run.instance, run_id=first_run, input_name="data")
    ).equals(seen[0])

    report = retain(db, keep=1, cleanup_older_than=timedelta(0))
    assert len(report.retired_pins["rows"]) == 1 and len(report.kept_pins["rows"]) == 1
    assert report.versions_removed["rows"] >= 1
    assert [v["version"] for v in base.tags.list().values()] == [second_base]
    with pytest.raises(LineageError):
        reproduce_input(db, run.instance, run_id=first_run, input_name="data")
    # The live permutation is untouched.
    latest = load_view("splits", db=db, instance=run.instance, request=ViewRequest(split="train"))
    assert read_arrow(latest).select(["id", "value"]).equals(seen[1])


def test_retain_keeps_at_least_one_version() -> None:
    with pytest.raises(ValueError, match=r"keep=0"):
        retain(LanceDBResource(uri="unused"), keep=0)


def test_pinned_versions_are_recorded_in_metadata(run: Runner, db: LanceDBResource) -> None:
    source, _ = _growing_source()
    splits = permutation_asset("splits", source=source)
    run([source, splits])
    pin = run.metadata("splits")["perm_assets/pin"]
    assert pin.startswith("perm_assets.splits.")
    meta = run.metadata("splits")
    for table, version in (("rows", meta["lance/base_version"]), ("splits", meta["lance/version"])):
        assert lancedb.connect(db.uri).open_table(table).tags.get_version(pin) == version
    assert np.array_equal(
        np.arange(300),
        np.sort(
            read_arrow(load_view("splits", db=db, instance=run.instance)).column("id").to_numpy()
        ),
    )


def test_retain_command_line_prints_one_line_per_table(
    run: Runner,
    db: LanceDBResource,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    from perm_assets.__main__ import main

    source, _ = _growing_source()
    splits = permutation_asset("splits", source=source)
    run([source, splits])
    run([source, splits])
    # `make test` exports DAGSTER_HOME=.dagster_home, which a fresh clone does not have yet.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "missing"))
    assert main(["retain", "--uri", db.uri, "--keep", "1", "--days", "0"]) == 0
    captured = capsys.readouterr()
    assert "no Dagster instance (DAGSTER_HOME" in captured.err
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # an instance: its records are kept too
    assert main(["retain", "--uri", db.uri, "--keep", "1", "--days", "0"]) == 0
    assert "no Dagster instance" not in capsys.readouterr().err
    lines = captured.out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["rows", "splits"]
    assert lines[1].startswith("splits: kept 1 pins, retired 1, removed 1 versions")
