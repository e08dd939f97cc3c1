"""Issue 11's read figures: time to first batch, rows/s and peak RSS per read path, side by side.

One table of ``--rows`` rows with two numeric columns (``id`` int64, ``x`` float64), written
through the project's IO manager in 1M-row chunks, and a ``permutation_asset`` splitting it
80/10/10 at random into ``train``/``val``/``test`` and shuffling. The ``train`` split is read in
batches of ``--batch`` (1,024) rows by each path below, each in a fresh process (so nothing is
cached in Python, and the peak RSS is that path's own):

- ``loader``: `BatchLoader(view)` over the view the IO manager hands out;
- ``cache first`` / ``cache after``: the same over ``ViewRequest(cache=True)``, first with an
  empty cache folder (the first batch waits for the one sequential fetch of both columns),
  then in a new process over the published entry;
- ``shard x2``: `BatchLoader(shard(view, rank, world_size=2))`, both ranks at once in two
  processes (default bijection order; ``shard x2 sampler``: ``order="distributed_sampler"``):
  the slower rank's first batch, the two ranks' rows/s added up, the larger peak RSS;
- ``DataLoader spawn`` / ``fork``: a map-style ``DataLoader(view, batch_size, num_workers=2)``;
  worker start-up (a DataLoader over a dataset that reads nothing) is measured apart and
  included in the first batch. A spawned worker's start-up re-imports this script (torch,
  dagster, lancedb, perm_assets), as it would a training script; a forked worker reads through
  its lean helper process (`perm_assets.forked`), whose start-up is in the first batch;
- ``Permutation.iter``: lancedb's own ``Permutation.from_tables(...).iter(batch)``;
- ``StreamingDataset``: lancedb's ``lancedb.streaming.StreamingDataset`` (setup: building its
  own shuffle of the whole table, as it cannot read a persisted split) through a DataLoader;
- ``HF datasets``: the train rows as a memory-mapped Arrow file, ``.shuffle(seed)`` (setup),
  then ``.with_format("arrow").iter(batch)``.

Columns: setup (s, untimed by the first batch), first batch (s from opening the view, or from
the end of setup), rows/s after the first batch for up to ``--budget`` s, peak RSS of the
reading process and of its largest worker or helper (MiB). The page cache is warmed first.

``make bench`` runs it at 10M rows (data under bench/data/read, kept and reused);
``make bench-read-scale`` at 100M rows with ``--remove-data`` (about 4 GB, removed at the end).
Prints figures, asserts nothing. No ``from __future__ import annotations``: Dagster reads the
asset functions' annotations.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa

from perm_assets import (
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    Shuffle,
    ViewRequest,
    open_view,
    permutation_asset,
)

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "read"
SOURCE = "read_rows"
SPLITS = "read_splits"
COLUMNS = ["id", "x"]
RATIOS = [0.8, 0.1, 0.1]
CHUNK_ROWS = 1_000_000
LAYOUT_VERSION = 1
QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
PATHS = [
    "loader",
    "cache first",
    "cache after",
    "shard x2",
    "shard x2 sampler",
    "DataLoader spawn",
    "DataLoader fork",
    "Permutation.iter",
    "StreamingDataset",
    "HF datasets",
]


# ------------------------------------------------------------------------------ the data
def prepare(root: Path, rows: int) -> None:
    """Write the table, its 3-way shuffled split and the HF copy, unless already there."""
    marker = root / "ready.json"
    wanted = {"rows": rows, "layout": LAYOUT_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"reusing tables in {root}")
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    db = LanceDBResource(uri=str(root / "lancedb"))
    schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])

    @dg.asset(name=SOURCE)
    def source() -> pa.RecordBatchReader:
        def chunks() -> Iterator[pa.RecordBatch]:
            rng = np.random.default_rng(0)
            for start in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - start)
                yield pa.record_batch(
                    [np.arange(start, start + n, dtype=np.int64), rng.standard_normal(n)],
                    schema=schema,
                )

        return pa.RecordBatchReader.from_batches(schema, chunks())

    splits = permutation_asset(
        SPLITS,
        source=source,
        split=RandomSplit(ratios=RATIOS, seed=42, split_names=["train", "val", "test"]),
        shuffle=Shuffle(seed=7),
    )
    resources = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}
    with dg.DagsterInstance.ephemeral() as instance:
        for asset in (source, splits):
            started = time.perf_counter()
            dg.materialize(
                [source, splits],
                selection=[asset],
                resources=resources,
                instance=instance,
                run_config=QUIET,
            )
            print(f"materialized {asset.key.to_user_string()} in {_since(started):.1f} s")
    started = time.perf_counter()
    _write_hf_rows(db, root / "hf_train.arrow")
    print(f"wrote the train rows for HF datasets in {_since(started):.1f} s")
    marker.write_text(json.dumps(wanted))


def _write_hf_rows(db: LanceDBResource, path: Path) -> None:
    """The train split's rows in table order as an Arrow stream file (HF datasets' format),
    by one scan of the base table: never the whole table in memory."""
    rows = train_view(db).split_rows()
    assert rows is not None
    train = np.sort(rows.all())
    base = db.connect().open_table(SOURCE)
    query = base.search().select(COLUMNS).with_row_id(True)
    schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in query.to_batches(CHUNK_ROWS):
            ids = batch.column("_rowid").to_numpy()
            found = np.searchsorted(train, ids)
            keep = train[np.minimum(found, train.size - 1)] == ids
            writer.write_batch(batch.select(COLUMNS).filter(pa.array(keep)))


def train_view(db: LanceDBResource, cache: bool = False) -> Any:
    request = ViewRequest(split="train", columns=COLUMNS, format="arrow", cache=cache)
    return open_view(db, asset=SPLITS, table=SPLITS, version=None, request=request)


def warm(root: Path) -> None:
    """Read every data file once, so no path pays for cold disk reads."""
    for path in (root / "lancedb").rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass


# --------------------------------------------------------------------------- one path
def measure(path: str, root: Path, batch: int, budget: float, rank: int) -> dict[str, Any]:
    """Open ``path``'s reader, time its first batch and its rows/s (runs in a child process)."""
    from torch.utils.data import DataLoader, default_convert

    from perm_assets.training import BatchLoader, shard

    db = LanceDBResource(uri=str(root / "lancedb"), cache_dir=str(root / "cache"))
    setup = 0.0
    startup = float("nan")
    started = time.perf_counter()
    batches: Any
    if path == "loader":
        batches = BatchLoader(train_view(db), batch)
    elif path.startswith("cache"):
        batches = BatchLoader(train_view(db, cache=True), batch)
    elif path.startswith("shard"):
        order = "distributed_sampler" if path.endswith("sampler") else "bijection"
        part = shard(train_view(db), rank=rank, world_size=2, seed=1, order=cast(Any, order))
        batches = BatchLoader(part, batch)
    elif path.startswith("DataLoader"):
        context = path.split()[-1]
        # lancedb warns in every forked child that its runtime was reset; a view never calls
        # lancedb there (its reads go through perm_assets.forked's helper process).
        warnings.filterwarnings("ignore", "lancedb fork support is experimental", RuntimeWarning)
        empty = DataLoader(cast(Any, _Empty()), num_workers=2, multiprocessing_context=context)
        next(iter(empty))
        startup = _since(started)
        del empty
        started = time.perf_counter()
        batches = DataLoader(
            train_view(db),
            batch_size=batch,
            num_workers=2,
            multiprocessing_context=context,
            collate_fn=default_convert,
        )
    elif path == "Permutation.iter":
        from lancedb.permutation import Permutation

        connection = lancedb.connect(db.uri)
        permutation = Permutation.from_tables(
            connection.open_table(SOURCE), connection.open_table(SPLITS), "train"
        )
        arrow = permutation.select_columns(COLUMNS).with_format("arrow")
        batches = arrow.iter(batch, skip_last_batch=False)
    elif path == "StreamingDataset":
        from lancedb.streaming import StreamingDataset

        with db.builder_memory():  # its builder sorts in lancedb's 100 MiB pool otherwise
            streaming = StreamingDataset(
                lancedb.connect(db.uri).open_table(SOURCE),
                shuffle=True,
                shuffle_seed=7,
                columns=COLUMNS,
                read_batch_size=batch,
            )
        setup = _since(started)
        started = time.perf_counter()
        batches = DataLoader(streaming, batch_size=batch)
    elif path == "HF datasets":
        import datasets

        datasets.disable_progress_bars()
        data = datasets.Dataset.from_file(str(root / "hf_train.arrow"), in_memory=False)
        shuffled = data.shuffle(seed=7, keep_in_memory=True)
        setup = _since(started)
        started = time.perf_counter()
        batches = shuffled.with_format("arrow").iter(batch_size=batch)
    else:
        raise SystemExit(f"unknown path {path!r}")
    iterator = iter(batches)
    first = next(iterator)
    first_batch = _since(started)
    rows = 0
    total = 0.0
    reading = time.perf_counter()
    for item in iterator:
        x = item["x"] if isinstance(item, dict) else item.column("x").to_numpy()
        total += float(np.asarray(x).sum())
        rows += len(x)
        if _since(reading) > budget:
            break
    seconds = _since(reading)
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    del iterator, batches, first
    return {
        "setup": setup,
        "startup": startup,
        "first": first_batch,
        "rows_per_s": rows / seconds if seconds > 0 else float("nan"),
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


class _Empty:
    """A map-style dataset that reads nothing: a DataLoader's worker start-up alone."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return index


# ------------------------------------------------------------------------------- driver
def run_path(path: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``path`` measured in fresh processes (two at once for the 2-rank shards)."""
    if path == "cache first":
        shutil.rmtree(root / "cache", ignore_errors=True)
    ranks = [0, 1] if path.startswith("shard") else [0]
    command = [sys.executable, __file__, "--child", path, "--data-dir", str(args.data_dir)]
    command += ["--rows", str(args.rows), "--batch", str(args.batch)]
    command += ["--budget", str(args.budget)]
    children = [
        subprocess.Popen([*command, "--rank", str(r)], stdout=subprocess.PIPE, text=True)
        for r in ranks
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=1800)
        if child.returncode != 0:
            return {"error": f"exit code {child.returncode}"}
        results.append(json.loads(out.strip().splitlines()[-1]))
    merged = dict(results[0])
    if len(results) > 1:
        merged["first"] = max(r["first"] for r in results)
        merged["rows_per_s"] = sum(r["rows_per_s"] for r in results)
        merged["rss"] = max(r["rss"] for r in results)
    return merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000_000, help="table rows (10M)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data folder")
    parser.add_argument("--batch", type=int, default=1024, help="training batch rows (1024)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of reading per path")
    parser.add_argument("--paths", nargs="*", default=PATHS, help="paths to measure")
    parser.add_argument(
        "--remove-data", action="store_true", help="delete the data folder at the end"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.data_dir / f"rows_{args.rows}"
    if args.child is not None:
        print(json.dumps(measure(args.child, root, args.batch, args.budget, args.rank)))
        return 0
    started = time.perf_counter()
    print(
        f"perm_assets read bench: python {platform.python_version()}, lancedb "
        f"{lancedb.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{args.rows:,} rows (id int64, x float64), split 80/10/10 at random and shuffled; "
        f"train split, batches of {args.batch:,}; up to {args.budget:g} s of reading per path"
    )
    try:
        prepare(root, args.rows)
        warm(root)
        print(
            f"\n{'path':<22} {'setup s':>8} {'first batch s':>14} {'rows/s':>12} "
            f"{'peak RSS MiB':>13} {'workers MiB':>12}"
        )
        for path in args.paths:
            figures = run_path(path, root, args)
            if "error" in figures:
                print(f"{path:<22} {figures['error']}")
                continue
            first = f"{figures['first']:.2f}"
            if figures["startup"] == figures["startup"]:  # not NaN: a DataLoader
                first += f" ({figures['startup']:.2f} start-up)"
            workers = figures["workers_rss"]
            print(
                f"{path:<22} {figures['setup']:>8.2f} {first:>14} "
                f"{figures['rows_per_s']:>12,.0f} {figures['rss']:>13,.0f} "
                f"{workers if workers else float('nan'):>12,.0f}",
                flush=True,
            )
    finally:
        if args.remove_data:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {_since(started):.0f} s")
    return 0


def _since(started: float) -> float:
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
