"""The team instance: deploy/dagster.postgres.yaml against a real PostgreSQL server.

The test starts its own PostgreSQL cluster (tests/servers.py), points ``DAGSTER_HOME`` at a copy
of the yaml with the connection in ``PERM_ASSETS_PG_*`` environment variables, runs the demo's
materializations, and reads their lineage back through a fresh `DagsterInstance` and with plain
SQL: what a webserver, daemon or later run on another machine would see.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

from perm_assets import LanceDBResource
from perm_assets.demo import ASSETS, digits, digits_classifier, digits_inked, digits_splits
from perm_assets.views import ViewRequest, open_view, read_arrow
from tests.conftest import Runner
from tests.servers import PostgresServer, postgres_server

YAML = Path(__file__).resolve().parent.parent / "deploy" / "dagster.postgres.yaml"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server(database="perm_assets_dagster") as server:
        yield server


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres: PostgresServer) -> Path:
    """``$DAGSTER_HOME`` holding deploy/dagster.postgres.yaml, connection values in the env."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {
        "PERM_ASSETS_PG_HOST": postgres.host,
        "PERM_ASSETS_PG_PORT": str(postgres.port),
        "PERM_ASSETS_PG_USER": postgres.user,
        "PERM_ASSETS_PG_PASSWORD": postgres.password,
        "PERM_ASSETS_PG_DB": postgres.database,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return home


def test_postgres_yaml_takes_every_connection_value_from_the_environment() -> None:
    config = yaml.safe_load(YAML.read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    for field in ("hostname", "port", "username", "password", "db_name"):
        assert set(db[field]) == {"env"}, f"{field} must come from an env var"
    assert db["scheme"] == "postgresql+psycopg2"


def test_demo_lineage_is_persisted_in_postgres_and_read_back(
    dagster_home: Path,
    resources: dict[str, Any],
    db: LanceDBResource,
    postgres: PostgresServer,
) -> None:
    selection = [digits, digits_inked, digits_splits, digits_classifier]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        result = Runner(resources, instance)(ASSETS, selection=selection)
        assert result.success
        run_id = result.run_id

    # A new instance object on the same database: only what PostgreSQL persisted is there.
    with dg.DagsterInstance.from_config(str(dagster_home)) as fresh:
        read = Runner({}, fresh)
        run = fresh.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        source = read.metadata("digits")
        splits = read.metadata("digits_splits")
        classifier = read.metadata("digits_classifier")
        assert read.data_version("digits") == f"digits@{source['lance/version']}"
        assert splits["lance/base_table"] == "digits"
        assert splits["lance/base_version"] == source["lance/version"]
        assert classifier["accuracy"] > 0.9
        for split in ("train", "test"):
            assert classifier[f"{split}/table"] == "digits_splits"
            assert classifier[f"{split}/table_version"] == splits["lance/version"]
            assert classifier[f"{split}/base_table"] == "digits"
            assert classifier[f"{split}/base_version"] == source["lance/version"]
            assert classifier[f"{split}/split"] == split
            assert classifier[f"{split}/rows"] == splits[f"rows/{split}"]

    # The recorded versions reopen exactly the rows the classifier trained on.
    train = open_view(
        db,
        asset="digits_splits",
        table=str(classifier["train/table"]),
        version=int(classifier["train/table_version"]),
        request=ViewRequest(split="train", columns=["id"]),
    )
    assert read_arrow(train).num_rows == classifier["train_rows"]

    # And in PostgreSQL itself, without Dagster in between.
    engine = sa.create_engine(postgres.url())
    try:
        with engine.connect() as connection:
            status = connection.execute(
                sa.text("SELECT status FROM runs WHERE run_id = :run_id"), {"run_id": run_id}
            ).scalar_one()
            materialized = connection.execute(
                sa.text(
                    "SELECT count(*) FROM event_logs WHERE run_id = :run_id "
                    "AND dagster_event_type = 'ASSET_MATERIALIZATION'"
                ),
                {"run_id": run_id},
            ).scalar_one()
    finally:
        engine.dispose()
    assert status == "SUCCESS"
    assert materialized == len(selection)
