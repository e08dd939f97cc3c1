"""One Dagster run whose permutation step executes on a Ray cluster (tests/test_dagster_ray.py).

Run as a script inside the loopback-only network and PID namespaces the test makes: it starts a
Ray cluster with its job server (`ray_cluster`), launches the run with ``dg.execute_job`` (the
orchestrator, in this process), and writes what Ray says about each step's job to the JSON file
named by its argument. Ray's step processes
load this same file (``dg.reconstructable`` records its path) to find the job, so importing it
has no side effects. Settings come from the environment, as on a real cluster:
``PERM_ASSETS_LANCEDB_URI`` and ``PERM_ASSETS_RAY_JOBS`` (the job server's URL).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import dagster as dg
import numpy as np
import pyarrow as pa

from perm_assets import LanceDBIOManager, LanceDBResource, RandomSplit, Shuffle, permutation_asset
from perm_assets.ray_steps import ray_step_executor

N = 100_000
JOB = "splits_on_ray"
RAY_JOBS = os.environ.get("PERM_ASSETS_RAY_JOBS", "http://127.0.0.1:8265")


@dg.asset(name="rows", kinds={"lancedb"})
def rows() -> pa.Table:
    ids = np.arange(N, dtype=np.int64)
    return pa.table({"id": ids, "label": ids % 10})


rows_splits = permutation_asset(
    "rows_splits",
    source=rows,
    split=RandomSplit(ratios=[0.8, 0.2], seed=11, split_names=["train", "test"]),
    shuffle=Shuffle(seed=12),
    # Overrides the executor's default of 1 CPU per step (the job records what it reserved).
    op_tags={"dagster-ray/config": {"num_cpus": 0.5}},
)

# The URI is read where the step runs (a Ray node's environment), never passed in run config.
_db = LanceDBResource(uri=dg.EnvVar("PERM_ASSETS_LANCEDB_URI"))
defs = dg.Definitions(
    assets=[rows, rows_splits],
    resources={"lancedb": _db, "io_manager": LanceDBIOManager(db=_db)},
    jobs=[
        dg.define_asset_job(
            JOB, selection=[rows_splits], executor_def=ray_step_executor(RAY_JOBS, num_cpus=1)
        )
    ],
)


def _nodes(nodes: list[Any]) -> list[Any]:
    """Ray's ``NodeState`` records (typed as bare pydantic dataclasses in its stubs)."""
    return nodes


def _supervisor_cpus(submission_id: str) -> float | None:
    from ray.util.state import list_actors

    name = f"_ray_internal_job_actor_{submission_id}"
    actors = list_actors(address=RAY_JOBS, filters=[("name", "=", name)], detail=True)
    return (cast(Any, actors[0]).required_resources or {}).get("CPU") if actors else None


def splits_on_ray() -> dg.JobDefinition:
    return defs.resolve_job_def(JOB)


@contextmanager
def ray_cluster(workers: int = 1) -> Iterator[str]:
    """A Ray head (no CPUs: nothing but the job server and GCS runs there) and ``workers`` worker
    nodes of one CPU each, every ``ray start --block`` leading its own process group, which is
    killed by its pid on exit (``ray stop`` would kill every Ray process on the machine)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    temp = tempfile.mkdtemp(prefix="dray-", dir="/tmp")  # Ray's socket paths must stay short
    common = ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    common += [f"--temp-dir={temp}", "--object-store-memory=80000000"]
    ray = [os.path.join(os.path.dirname(sys.executable), "ray"), "start"]
    head = [*ray, "--head", "--port=6379", "--num-cpus=0", "--include-dashboard=true"]
    head += ["--dashboard-host=127.0.0.1", "--dashboard-port=8265", *common]
    groups = [subprocess.Popen([*head], start_new_session=True)]
    try:
        # The workers wait for the head's GCS themselves: start them at once.
        for _ in range(workers):
            worker = [*ray, "--address=127.0.0.1:6379", "--num-cpus=1", *common]
            groups.append(subprocess.Popen(worker, start_new_session=True))
        deadline = time.monotonic() + 60
        while True:
            try:
                JobSubmissionClient(RAY_JOBS)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        while sum(not n.is_head_node for n in _nodes(list_nodes(address=RAY_JOBS))) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{workers} Ray worker node(s) not up within 60 s")
            time.sleep(0.2)
        yield temp
    finally:
        # The cluster is thrown away: SIGKILL each node's group (a graceful SIGTERM drains and
        # took 10 s per node). The test's PID namespace reaps anything that left its group.
        for group in groups:
            with suppress(ProcessLookupError):
                os.killpg(group.pid, signal.SIGKILL)
            group.wait()
        shutil.rmtree(temp, ignore_errors=True)


def main(out: str) -> None:
    started = time.monotonic()
    with ray_cluster() as temp:
        sys.stderr.write(f"TIMING cluster {time.monotonic() - started:.1f} s\n")
        _run(out, temp)
        sys.stderr.write(f"TIMING run {time.monotonic() - started:.1f} s\n")
    sys.stderr.write(f"TIMING stopped {time.monotonic() - started:.1f} s\n")


def _run(out: str, temp: str) -> None:
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(splits_on_ray), instance=instance)
        records = instance.all_logs(result.run_id)
    client = JobSubmissionClient(RAY_JOBS)
    steps = {}
    for record in records:
        event = record.dagster_event
        if event is None or event.event_type_value != "STEP_WORKER_STARTING":
            continue
        submission_id = str(event.event_specific_data.metadata["Ray Submission ID"].value)  # type: ignore[union-attr]
        # The step reports success before its process exits: wait for Ray's final status.
        info = client.get_job_info(submission_id)
        deadline = time.monotonic() + 30
        while not info.status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.2)
            info = client.get_job_info(submission_id)
        steps[event.step_key] = {
            "submission_id": submission_id,
            "status": str(info.status),
            "driver_node_id": info.driver_node_id,
            # What the job reserved: its supervisor actor's resources (JobDetails drops them).
            "entrypoint_num_cpus": _supervisor_cpus(submission_id),
            "runtime_env_vars": sorted((info.runtime_env or {}).get("env_vars", {})),
            # The driver's log file (the dashboard's log endpoint needs the node's agent port).
            "logs": "".join(
                Path(f).read_text(errors="replace")
                for f in glob.glob(f"{temp}/session_*/logs/job-driver-{submission_id}.log")
            ),
        }
    nodes = [
        {"node_id": n.node_id, "is_head": n.is_head_node, "state": n.state}
        for n in _nodes(list_nodes(address=RAY_JOBS))
    ]
    with open(out, "w") as f:
        json.dump(
            {
                "run_id": result.run_id,
                "success": result.success,
                "orchestrator_pid": os.getpid(),
                "steps": steps,
                "nodes": nodes,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
