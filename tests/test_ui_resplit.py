"""A re-split launched the way the UI's launchpad does it: GraphQL against a real ``dagster dev``.

The test writes a code location and an instance into tmp_path, starts ``dagster dev`` (webserver,
daemon, code server) on 127.0.0.1, materializes everything once over GraphQL, then launches the
permutation asset alone with new run config (seed, ratios) and reads back, over GraphQL only,
what a person would see: the new Lance version, split sizes, spec and data version, the training
asset marked stale and the permutation fresh. The daemon is what executes queued runs, so a
passing run also shows that the launch path works end to end.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient
from lancedb.permutation import permutation_builder

from perm_assets import LanceDBResource
from tests.processes import HOST, child_env, free_port, log_tail, process_group, wait_for

LOCATION = "ui_resplit"
REPOSITORY = "__repository__"  # the repository a dg.Definitions object becomes
PERM = "rows_splits"
STARTUP_TIMEOUT = 90.0
# A run of four steps, each a new process importing dagster and lancedb: 60 s ran out with
# 2 cores also running a benchmark (each step took 13-20 s to start).
RUN_TIMEOUT = 180.0
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

LOCATION_SOURCE = """
import dagster as dg
from lancedb.permutation import Permutation

from perm_assets import LanceDBIOManager, LanceDBResource, RandomSplit, Shuffle, permutation_asset
from perm_assets.views import read_arrow
from tests.conftest import table_asset

rows = table_asset("rows", 1000)
rows_splits = permutation_asset(
    "rows_splits",
    source=rows,
    split=RandomSplit(ratios=[0.8, 0.2], seed=1, split_names=["train", "test"]),
    shuffle=Shuffle(seed=1),
)


@dg.asset(ins={{"train": dg.AssetIn(key=rows_splits.key, metadata={{"split": "train"}})}})
def trained(train: Permutation) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={{"train_rows": read_arrow(train).num_rows}})


lancedb = LanceDBResource(uri={db!r})
defs = dg.Definitions(
    assets=[rows, rows_splits, trained],
    resources={{"lancedb": lancedb, "io_manager": LanceDBIOManager(db=lancedb)}},
)
"""

ASSET_QUERY = """
query AssetState($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    staleStatus
    assetMaterializations(limit: 1) {
      runId
      tags { key value }
      metadataEntries {
        label
        ... on IntMetadataEntry { intValue }
        ... on JsonMetadataEntry { jsonString }
        ... on TextMetadataEntry { text }
      }
    }
  }
}
"""

WORKSPACE_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation { repositories { name } }
        }
      }
    }
  }
}
"""


class Dagster:
    """A running ``dagster dev`` reached over GraphQL."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.client = DagsterGraphQLClient(HOST, port_number=port, timeout=30)

    def query(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST a GraphQL query; GraphQL errors fail the test with the server's message."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"http://{HOST}:{self.port}/graphql",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert "errors" not in answer, answer["errors"]
        return answer["data"]

    def location_loaded(self) -> bool:
        """Whether the code location has loaded; a load error fails at once with its message."""
        try:
            data = self.query(WORKSPACE_QUERY)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False  # the webserver is not listening yet
        entries = data["workspaceOrError"].get("locationEntries", [])
        for entry in entries:
            loaded = entry["locationOrLoadError"]
            if loaded is None:  # still loading
                return False
            if loaded["__typename"] == "PythonError":
                raise AssertionError(f"code location {entry['name']} failed: {loaded['message']}")
            return REPOSITORY in {r["name"] for r in loaded["repositories"]}
        return False

    def launch(self, *, run_config: dict[str, Any], assets: list[str] | None = None) -> str:
        """Launch the asset job as the launchpad does; the run is queued for the daemon."""
        return self.client.submit_job_execution(
            "__ASSET_JOB",
            repository_location_name=LOCATION,
            repository_name=REPOSITORY,
            run_config=run_config,
            asset_selection=assets,
        )

    def wait_for_success(self, run_id: str) -> None:
        status = self.client.get_run_status(run_id)
        deadline = time.monotonic() + RUN_TIMEOUT
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.25)
            status = self.client.get_run_status(run_id)
        assert status is DagsterRunStatus.SUCCESS, (
            f"run {run_id} ended {status.value} (QUEUED means the daemon did not pick it up); "
            f"dagster dev log:\n{log_tail(self.log, 60)}"
        )

    def asset(self, name: str) -> dict[str, Any]:
        """Stale status and latest materialization (metadata by label, tags by key) of ``name``."""
        nodes = self.query(ASSET_QUERY, {"keys": [{"path": [name]}]})["assetNodes"]
        assert len(nodes) == 1, nodes
        node = nodes[0]
        (latest,) = node["assetMaterializations"]
        metadata: dict[str, Any] = {}
        for entry in latest["metadataEntries"]:
            if "intValue" in entry:
                metadata[entry["label"]] = entry["intValue"]
            elif "jsonString" in entry:
                metadata[entry["label"]] = json.loads(entry["jsonString"])
            elif "text" in entry:
                metadata[entry["label"]] = entry["text"]
        return {
            "stale": node["staleStatus"],
            "run_id": latest["runId"],
            "metadata": metadata,
            "tags": {tag["key"]: tag["value"] for tag in latest["tags"]},
        }


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[tuple[Dagster, LanceDBResource]]:
    """``dagster dev`` on a free 127.0.0.1 port over a code location and instance in tmp_path."""
    db = LanceDBResource(uri=str(tmp_path / "lancedb"))
    (tmp_path / "location.py").write_text(LOCATION_SOURCE.format(db=db.uri))
    (tmp_path / "workspace.yaml").write_text(
        textwrap.dedent(
            f"""\
            load_from:
              - python_file:
                  relative_path: location.py
                  location_name: {LOCATION}
            """
        )
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    # The daemon dequeues every second instead of every five: the test waits less.
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_queue:\n  dequeue_interval_seconds: 1\n"
    )
    port = free_port()
    log = tmp_path / "dagster_dev.log"
    dagster = str(Path(sys.executable).with_name("dagster"))
    command = [dagster, "dev", "-w", "workspace.yaml", "-h", HOST, "-p", str(port)]
    env = child_env(DAGSTER_HOME=str(home))
    with process_group(command, log=log, cwd=tmp_path, env=env) as process:
        server = Dagster(port, log)
        wait_for(
            server.location_loaded,
            timeout=STARTUP_TIMEOUT,
            what=f"dagster dev on {HOST}:{port} loading location {LOCATION}",
            process=process,
            log=log,
            interval=0.5,
        )
        yield server, db


@pytest.mark.slow
# dagster_graphql 1.13.27's client passes variable_values the way gql 4 deprecates; not ours.
@pytest.mark.filterwarnings(
    "ignore:Using variable_values and operation_name arguments:DeprecationWarning"
)
def test_resplit_launched_over_graphql_makes_a_new_version_and_marks_training_stale(
    dagster_dev: tuple[Dagster, LanceDBResource],
) -> None:
    server, db = dagster_dev
    server.wait_for_success(server.launch(run_config={}))
    first = server.asset(PERM)
    assert (first["metadata"]["rows/train"], first["metadata"]["rows/test"]) == (800, 200)
    trained = server.asset("trained")
    assert (trained["metadata"]["train_rows"], trained["stale"]) == (800, "FRESH")

    # What a person types into the launchpad for the permutation asset alone.
    resplit = {"ops": {PERM: {"config": {"seed": 7, "ratios": [0.5, 0.5]}}}}
    run_id = server.launch(run_config=resplit, assets=[PERM])
    server.wait_for_success(run_id)

    second = server.asset(PERM)
    meta = second["metadata"]
    assert second["run_id"] == run_id
    assert meta["lance/version"] == first["metadata"]["lance/version"] + 1
    assert (meta["rows/train"], meta["rows/test"]) == (500, 500)
    assert meta["perm_assets/spec"]["split"]["seed"] == 7
    assert meta["perm_assets/spec"]["split"]["ratios"] == [0.5, 0.5]
    assert meta["perm_assets/spec"]["shuffle"]["seed"] == 1  # not in the run config: default
    old_version = first["tags"]["dagster/data_version"]
    new_version = second["tags"]["dagster/data_version"]
    assert new_version != old_version
    # Same base table version, new spec: only the spec hash part changed.
    assert new_version.split("/")[0] == old_version.split("/")[0]

    assert second["stale"] == "FRESH"
    assert server.asset("rows")["stale"] == "FRESH"
    trained = server.asset("trained")
    assert trained["stale"] == "STALE"
    assert trained["run_id"] != run_id  # training was not re-run: it read the old split

    # The metadata describes the table on disk: the recorded version holds exactly the rows
    # lancedb's builder assigns with the new seed and ratios.
    stored = db.open_table(PERM, version=meta["lance/version"]).to_arrow()
    assert db.open_table(PERM).version == meta["lance/version"]
    base = db.open_table("rows", version=meta["lance/base_version"])
    expected = (
        permutation_builder(base)
        .split_random(ratios=[0.5, 0.5], seed=7, split_names=["train", "test"])
        .shuffle(seed=1)
        .execute()
        .to_arrow()
    )
    assert stored.column("row_id").to_pylist() == expected.column("row_id").to_pylist()
    assert stored.column("split_id").to_pylist() == expected.column("split_id").to_pylist()
