"""Shuffled reads from object storage, with and without the pinned local column cache.

Starts the same S3-compatible server the test suite uses (moto, on 127.0.0.1, with IAM
authentication), writes a synthetic table (id int64, x float32) and a shuffled 80/20 split to
it through the IO manager, then reads the whole ``train`` split with `BatchLoader` in batches
of 1,024 rows, and reports

- without the cache: rows/s and S3 GET requests per 1,000 rows (moto's request recorder);
- with the cache: the one sequential fetch (seconds, GETs), then rows/s of the same read;
- the same read from a local-disk copy of the tables, the reference for the cache's target
  (>= 0.8x local-disk throughput after the fetch).

moto is a Python server on this machine: its latency is far below a real object store's and
its bandwidth far lower, so the GET counts carry over to S3 and the rows/s do not (see the
README's object-storage section for what to expect there).

Run: ``make bench`` or ``.venv/bin/python bench/bench_s3.py --rows 1000000``.
No ``from __future__ import annotations``: Dagster reads the asset functions' annotations.
"""

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.servers: the suite's own moto server

from perm_assets import (  # noqa: E402
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    Shuffle,
    ViewRequest,
    open_view,
    permutation_asset,
)
from perm_assets.training import BatchLoader  # noqa: E402
from tests.servers import moto_s3_server  # noqa: E402

BATCH = 1024
CHUNK_ROWS = 1_000_000
QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _assets(rows: int) -> list[dg.AssetsDefinition]:
    @dg.asset(name="s3_rows")
    def source() -> pa.RecordBatchReader:
        schema = pa.schema([("id", pa.int64()), ("x", pa.float32())])

        def chunks() -> Iterator[pa.RecordBatch]:
            rng = np.random.default_rng(0)
            for start in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - start)
                ids = np.arange(start, start + n, dtype=np.int64)
                x = rng.standard_normal(n).astype(np.float32)
                yield pa.record_batch([ids, x], schema=schema)

        return pa.RecordBatchReader.from_batches(schema, chunks())

    splits = permutation_asset(
        "s3_splits",
        source=source,
        split=RandomSplit(ratios=[0.8, 0.2], seed=42, split_names=["train", "test"]),
        shuffle=Shuffle(seed=7),
    )
    return [source, splits]


def _write(db: LanceDBResource, rows: int) -> None:
    result = dg.materialize(
        _assets(rows),
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        run_config=QUIET,
    )
    assert result.success


def _read(db: LanceDBResource, *, cache: bool) -> tuple[float, int, float]:
    """(seconds to open, rows, seconds to read them all) of the train split."""
    started = time.perf_counter()
    view = open_view(
        db,
        asset="s3_splits",
        table="s3_splits",
        version=None,
        request=ViewRequest(split="train", columns=["id", "x"], format="arrow", cache=cache),
    )
    first = None
    rows = 0
    opened = time.perf_counter() - started
    started = time.perf_counter()
    for batch in BatchLoader(view, batch_size=BATCH):
        if first is None:
            first = time.perf_counter() - started
        rows += batch.num_rows
    return opened + (first or 0.0), rows, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the table")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="perm_assets-bench-s3-"))
    try:
        with moto_s3_server(work / "moto") as server:
            options = server.storage_options()
            remote = LanceDBResource(
                uri=f"s3://{server.bucket}/bench",
                storage_options=options,
                cache_dir=str(work / "cache"),
                cache_max_bytes=8 << 30,
            )
            local = LanceDBResource(uri=str(work / "local"))
            _write(remote, args.rows)
            _write(local, args.rows)
            print(f"S3-compatible server (moto, 127.0.0.1): {args.rows:,} rows, train split")
            print(f"{'read':36s} {'first batch s':>13s} {'rows/s':>12s} {'GETs/1k rows':>13s}")

            def report(name: str, cache: bool, db: LanceDBResource, s3: bool) -> float:
                if s3:
                    with server.recorded_requests() as requests:
                        first, rows, took = _read(db, cache=cache)
                    gets = sum(1 for r in requests if r["method"] == "GET")
                    per_k = f"{gets / rows * 1000:13.2f}"
                else:
                    first, rows, took = _read(db, cache=cache)
                    per_k = f"{'-':>13s}"
                rate = rows / took
                print(f"{name:36s} {first:13.2f} {rate:12,.0f} {per_k}")
                return rate

            report("S3, no cache", False, remote, True)
            with server.recorded_requests() as requests:
                started = time.perf_counter()
                _read(remote, cache=True)  # the first read fetches the columns once
                fetch = time.perf_counter() - started
            gets = sum(1 for r in requests if r["method"] == "GET")
            print(
                f"{'S3, cache: first read incl. fetch':36s} {fetch:13.2f} {'':>12s} {gets:>9d} GETs"
            )
            cached = report("S3, cache (after the fetch)", True, remote, True)
            disk = report("local disk, no cache", False, local, False)
            print(f"cache after the fetch / local disk: {cached / disk:.2f}x (target >= 0.8x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
