"""A Dagster step executed on a real Ray cluster through dagster-ray's executor.

`perm_assets.ray_steps.ray_step_executor` submits each step as a Ray job. The cluster (a head
with no CPUs and one worker) runs in a loopback-only network namespace, with the orchestrating
process (`tests/dagster_ray_child.py`): Ray advertises the machine's external address even when
told 127.0.0.1, and nothing may leave loopback. The instance and the tables are files shared by
both sides, as PostgreSQL and object storage are in a team deployment.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
from lancedb.permutation import Permutation

from perm_assets import LanceDBIOManager, LanceDBResource
from perm_assets.errors import SpecError
from perm_assets.ray_steps import ray_step_executor
from tests.dagster_ray_child import N, rows, rows_splits
from tests.processes import REPO, child_env, free_port, log_tail

CHILD = Path(__file__).with_name("dagster_ray_child.py")
# tests/ray_netns.py (the suite's Ray harness) starts its head without the dashboard, which holds
# Ray's job server that dagster-ray submits to; so this test starts its own cluster
# (dagster_ray_child.ray_cluster) in namespaces made the same way. --kill-child: if the test
# times out and kills unshare, the namespace's first process dies and the kernel kills the rest.
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
# Nothing listens here: the port was free a moment ago, on loopback.
DOWN = f"http://127.0.0.1:{free_port()}"


def job_on_a_ray_that_is_down() -> dg.JobDefinition:
    """The child's permutation job, submitting to an address where no Ray job server runs."""
    db = LanceDBResource(uri=dg.EnvVar("PERM_ASSETS_LANCEDB_URI"))
    defs = dg.Definitions(
        assets=[rows, rows_splits],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        jobs=[dg.define_asset_job("down", [rows_splits], executor_def=ray_step_executor(DOWN))],
    )
    return defs.resolve_job_def("down")


def _resources(uri: Path) -> dict[str, object]:
    db = LanceDBResource(uri=str(uri))
    return {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}


def _in_netns(command: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    """``command`` in new network and PID namespaces, its output to ``log``. The network has
    only loopback; when ``command`` (the namespace's first process) exits, the kernel kills
    every process left in it, so no Ray process outlives the test."""
    script = 'ip link set lo up && exec "$@"'
    with log.open("wb") as out:
        done = subprocess.run(
            [*UNSHARE, "--", "sh", "-c", script, "sh", *command],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{log_tail(log, 80)}"


@pytest.mark.slow
def test_permutation_step_runs_as_a_ray_job_on_a_worker_node(tmp_path: Path) -> None:
    home, uri = tmp_path / "home", tmp_path / "lancedb"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    resources = _resources(uri)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        dg.materialize([rows], resources=resources, instance=instance)

    out = tmp_path / "ray.json"
    env = child_env(
        DAGSTER_HOME=str(home),
        PERM_ASSETS_LANCEDB_URI=str(uri),
        RAY_USAGE_STATS_ENABLED="0",
        # The step's entrypoint is `dagster api execute_step`: the nodes find `dagster` on PATH.
        PATH=f"{Path(sys.executable).parent}:{child_env()['PATH']}",
    )
    _in_netns([sys.executable, str(CHILD), str(out)], env, tmp_path / "child.log", timeout=180)
    report = json.loads(out.read_text())
    assert report["success"], report

    # The step was a Ray job that succeeded on the worker node (the head has no CPUs)...
    step = report["steps"]["rows_splits"]
    assert step["status"] == "SUCCEEDED"
    workers = {n["node_id"] for n in report["nodes"] if not n["is_head"]}
    assert step["driver_node_id"] in workers, (step["driver_node_id"], report["nodes"])
    # The asset's own dagster-ray/config tag won over the executor's default (num_cpus=1).
    assert step["entrypoint_num_cpus"] == 0.5
    # The URI was not passed with the job: the step read it from the worker node's environment.
    assert "PERM_ASSETS_LANCEDB_URI" not in step["runtime_env_vars"], step["runtime_env_vars"]
    # ... and that job's process is the one that recorded the materialization.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        materialized = instance.get_latest_materialization_event(rows_splits.key)
        assert materialized is not None and materialized.run_id == report["run_id"]
        step_pid = materialized.dagster_event.pid  # pyright: ignore[reportOptionalMemberAccess]
        assert step_pid not in (report["orchestrator_pid"], None)
        assert f" - {step_pid} - rows_splits - STEP_SUCCESS" in step["logs"], step["logs"][-3000:]

        # The table it wrote reads through the project's views...
        seen: dict[str, np.ndarray] = {}

        @dg.asset(
            ins={
                "splits": dg.AssetIn(
                    rows_splits.key,
                    metadata={"split": ["train", "test"], "columns": ["id"], "format": "arrow"},
                )
            }
        )
        def consumer(splits: dict[str, Permutation]) -> None:
            for name, view in splits.items():
                seen[name] = np.concatenate(
                    [cast(pa.RecordBatch, b).column("id").to_numpy() for b in view.iter(25_000)]
                )

        dg.materialize(
            [rows, rows_splits, consumer],
            selection=[consumer],
            resources=resources,
            instance=instance,
        )
    assert (len(seen["train"]), len(seen["test"])) == (N * 8 // 10, N * 2 // 10)
    assert np.array_equal(np.sort(np.concatenate([seen["train"], seen["test"]])), np.arange(N))

    # ... and is row for row the table the same asset writes when built in this process.
    local = _resources(tmp_path / "local")
    dg.materialize([rows, rows_splits], resources=local)
    on_ray = LanceDBResource(uri=str(uri)).open_table("rows_splits").to_arrow()
    assert on_ray.equals(
        LanceDBResource(uri=str(tmp_path / "local")).open_table("rows_splits").to_arrow()
    )


def test_unreachable_job_server_fails_the_run_naming_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = tmp_path / "lancedb"
    monkeypatch.setenv("PERM_ASSETS_LANCEDB_URI", str(uri))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        dg.materialize([rows], resources=_resources(uri), instance=instance)
        with pytest.raises(
            ConnectionError, match=re.escape(f"no Ray job server answers at '{DOWN}'")
        ):
            dg.execute_job(dg.reconstructable(job_on_a_ray_that_is_down), instance=instance)
        # Dagster creates the executor before the run starts: the run never started.
        run = instance.get_runs(limit=1)[0]
        assert (run.job_name, run.status) == ("down", dg.DagsterRunStatus.NOT_STARTED)
        # Nothing was submitted, so nothing was written.
        assert instance.get_latest_materialization_event(rows_splits.key) is None
    assert "rows_splits" not in LanceDBResource(uri=str(uri)).connect().table_names()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "ray://head:10001"}, "'ray://head:10001' is a Ray Client address"),
        ({"address": "127.0.0.1:6379"}, "'127.0.0.1:6379' is not a URL"),
        ({"address": "http://h:8265", "num_cpus": 0}, "num_cpus 0 must be above 0"),
        ({"address": "http://h:8265", "env_vars": ["A=1"]}, "entry 'A=1' must be a variable"),
        (
            {"address": "http://h:8265", "env_vars": ["PERM_ASSETS_S3_SECRET_ACCESS_KEY"]},
            "'PERM_ASSETS_S3_SECRET_ACCESS_KEY' looks like a secret",
        ),
        (
            {"address": "http://h:8265", "runtime_env": {"env_vars": {"PG_PASSWORD": "x"}}},
            "'PG_PASSWORD' looks like a secret",
        ),
    ],
)
def test_bad_executor_settings_fail_where_written(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        ray_step_executor(**kwargs)
