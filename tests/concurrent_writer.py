"""Writer processes for tests/test_concurrency.py: ``python -m tests.concurrent_writer JOB``.

``JOB`` is a JSON file. ``{"kind": "perm", ...}`` materializes the permutation asset once per
round, started together with the other writers (file barriers at the start of the run and again
right before the write), and appends one result per round to ``out``. ``{"kind": "stream",
...}`` materializes `big`, a table asset whose output is a lazily generated
`pyarrow.RecordBatchReader` (1.6 GB in the test), touching a marker file part way through it
so the test can SIGKILL it mid-write.

Both use ``DagsterInstance.get()``: ``$DAGSTER_HOME`` is shared with the test, as two runs
launched from one deployment share one instance.

No ``from __future__ import annotations``: Dagster reads `big`'s config annotation at definition
time and needs the class itself.
"""

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

from perm_assets import LanceDBIOManager, LanceDBResource, RandomSplit, Shuffle, permutation_asset
from tests.conftest import table_asset

ROWS = 200_000  # a 3.2 MB permutation: its write lasts long enough for two to overlap
SOURCE = table_asset("rows", ROWS)
PERM = permutation_asset(
    "perm",
    source=SOURCE,
    split=RandomSplit(ratios=[0.5, 0.5], seed=0, split_names=["train", "test"]),
    shuffle=Shuffle(seed=0),
)
BARRIER_TIMEOUT = 60.0


class StreamConfig(dg.Config):
    """How much `big` streams, and when it says it is in the middle of it."""

    batches: int = 1
    rows_per_batch: int = 1_000
    marker: str | None = None
    marker_after: int = 0


@dg.asset(name="big")
def big(config: StreamConfig) -> pa.RecordBatchReader:
    """``batches`` x ``rows_per_batch`` rows (int64 id, float64 x), streamed lazily."""
    schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])

    def batches() -> Any:
        for i in range(config.batches):
            if config.marker is not None and i == config.marker_after:
                Path(config.marker).touch()  # every earlier batch is in the writer's hands
            ids = np.arange(i * config.rows_per_batch, (i + 1) * config.rows_per_batch)
            yield pa.record_batch([pa.array(ids), pa.array(ids * 0.5)], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def resources(uri: str) -> dict[str, Any]:
    """The project's resources on the database at ``uri``."""
    db = LanceDBResource(uri=uri)
    return {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}


class BarrierIOManager(LanceDBIOManager):
    """The project's IO manager, holding each write until every writer of the round is ready
    to write too.

    A run takes seconds; writing a 200k-row permutation takes milliseconds. Lined up at the
    start of their runs, two writers' commits land 40-200 ms apart and rarely collide; lined up
    here, their writes overlap and one of them meets a real commit conflict most rounds.
    """

    barrier: str
    writers: int

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        _wait_for_all(Path(self.barrier), "write", context.run_id, self.writers)
        super().handle_output(context, obj)


def perm_config(seed: int) -> dict[str, Any]:
    """Run config giving the permutation asset ``seed`` for its split and its shuffle."""
    return {"ops": {"perm": {"config": {"seed": seed, "shuffle_seed": seed}}}}


class _ConflictCounter(logging.Handler):
    """Counts the commit-conflict retries that `perm_assets.tables.write_table` logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "commit conflict" in record.getMessage():
            self.count += 1


def _wait_for_all(directory: Path, what: str, me: str, writers: int) -> None:
    """Announce ``me`` ready for ``what`` and spin until ``writers`` have: they go on within
    about a millisecond of each other."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{what}.{me}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while len(list(directory.glob(f"{what}.*"))) < writers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{directory}: not all {writers} writers reached '{what}'")
        time.sleep(0.0005)


def _perm_rounds(job: dict[str, Any]) -> None:
    counter = _ConflictCounter()
    tables_log = logging.getLogger("perm_assets.tables")
    tables_log.addHandler(counter)
    tables_log.setLevel(logging.DEBUG)
    out = Path(job["out"])
    results: list[dict[str, Any]] = []
    with dg.DagsterInstance.get() as instance:
        for round_, seed in enumerate(job["seeds"]):
            barrier = Path(job["barrier"]) / f"round-{round_}"
            _wait_for_all(barrier, "start", str(job["me"]), job["writers"])
            before = counter.count
            started = time.time()
            db = LanceDBResource(uri=job["uri"])
            io_manager = BarrierIOManager(db=db, barrier=str(barrier), writers=job["writers"])
            result = dg.materialize(
                [SOURCE, PERM],
                selection=[PERM],
                resources={"lancedb": db, "io_manager": io_manager},
                instance=instance,
                run_config=perm_config(seed),
                raise_on_error=False,
            )
            entry: dict[str, Any] = {
                "round": round_,
                "seed": seed,
                "run_id": result.run_id,
                "success": result.success,
                "started": started,
                "finished": time.time(),
                "conflicts_retried": counter.count - before,
                "errors": [
                    f"{e.step_failure_data.error.cls_name}: {e.step_failure_data.error.message}"
                    for e in result.get_step_failure_events()
                    if e.step_failure_data.error is not None
                ],
            }
            for mat in result.asset_materializations_for_node("perm"):
                entry["lance_version"] = mat.metadata["lance/version"].value
                entry["base_version"] = mat.metadata["lance/base_version"].value
            results.append(entry)
            out.write_text(json.dumps(results))  # after every round: partial results survive


def _stream(job: dict[str, Any]) -> None:
    with dg.DagsterInstance.get() as instance:
        dg.materialize(
            [big],
            resources=resources(job["uri"]),
            instance=instance,
            run_config={"ops": {"big": {"config": job["config"]}}},
        )


def main(path: str) -> int:
    job = json.loads(Path(path).read_text())
    try:
        if job["kind"] == "perm":
            _perm_rounds(job)
        else:
            _stream(job)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
