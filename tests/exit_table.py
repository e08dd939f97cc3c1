"""A shuffled 80/20 split of an ``id``/``x`` table, built once per test module (real Dagster
materializations), for the child processes of tests/test_clean_exit.py and test_resume.py.

``python tests/exit_table.py DB_URI ROWS`` builds it by hand (e.g. 10M rows for a manual run).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import dagster as dg
import numpy as np
import pyarrow as pa

from perm_assets import LanceDBIOManager, LanceDBResource, RandomSplit, Shuffle, permutation_asset

SOURCE = "exit_rows"
SPLITS = "exit_splits"
CHUNK = 1 << 20


def build(uri: str, rows: int) -> None:
    """Write ``rows`` rows (``id`` = position, ``x`` float) and split them 80/20, shuffled."""

    @dg.asset(name=SOURCE)
    def source() -> pa.RecordBatchReader:
        schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])

        def chunks() -> Iterator[pa.RecordBatch]:
            for start in range(0, rows, CHUNK):
                ids = np.arange(start, min(start + CHUNK, rows), dtype=np.int64)
                yield pa.record_batch([ids, ids * 0.5], schema=schema)

        return pa.RecordBatchReader.from_batches(schema, chunks())

    splits = permutation_asset(
        SPLITS,
        source=source,
        split=RandomSplit(ratios=[0.8, 0.2], seed=3, split_names=["train", "test"]),
        shuffle=Shuffle(seed=5),
    )
    db = LanceDBResource(uri=uri)
    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize(
            [source, splits],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
            instance=instance,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )


if __name__ == "__main__":
    build(sys.argv[1], int(sys.argv[2]))
