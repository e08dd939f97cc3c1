"""Rows/s of a shuffled split delivered to a training loop: perm_assets against the alternatives.

One table of ``--rows`` rows with two numeric columns (``id`` int64, ``x`` float64), written
through the project's IO manager in 1M-row chunks, and a ``permutation_asset`` splitting it
80/20 at random and shuffling; the ``train`` split is read in ``--batch``-row training batches
by

1. this project's `BatchLoader` over the view the IO manager hands out (I/O in ``--io-mib``
   reads on a background thread, re-sliced into training batches),
2. a hand-built lancedb ``Permutation`` of the same tables, iterated at the training batch size,
3. lancedb's ``StreamingDataset`` over the table (it builds its own shuffle of every row, as it
   cannot read a persisted split), through a ``DataLoader`` at the training batch size,
4. Hugging Face ``datasets``: the same split rows saved with ``save_to_disk`` (memory-mapped
   Arrow), ``.shuffle(seed)``, then ``.with_format("arrow").iter(batch)``.

Each training step touches the batch (sums ``x``, keeps ``id``). A variant stops at the end of
the split or after ``--budget`` seconds. Then lancedb's ``clump_size`` trade-off: the same
split built with ``clump_size`` 1, 64 and 1024, read by (1) and (2), with two randomness
figures over the ids delivered: the share of adjacent pairs that are consecutive rows (0 for a
uniform shuffle) and the mean jump between adjacent rows relative to a uniform shuffle's
(1.0 for a uniform shuffle).

First, time to first batch, each on a freshly opened view (nothing read before): `BatchLoader`,
`BatchLoader` over rank 0 of a 2-rank `shard`, a map-style ``DataLoader(view, num_workers=2)``
under ``spawn`` (worker start-up included), ``Permutation.iter`` and lancedb's own
``Permutation.take_offsets`` (whose first call builds an offset map of the whole split).

Tables are kept under ``--data-dir`` and reused by later runs of the same size. Prints figures,
asserts nothing. Run: ``make bench`` or ``.venv/bin/python bench/bench_torch.py --rows 1000000``.
No ``from __future__ import annotations``: Dagster reads the asset functions' annotations.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import torch
from lancedb.permutation import Permutation
from lancedb.streaming import StreamingDataset
from torch.utils.data import DataLoader

from perm_assets import (
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    Shuffle,
    ViewRequest,
    open_view,
    permutation_asset,
)
from perm_assets.training import BatchLoader, shard

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "torch"
SOURCE = "torch_rows"
SPLITS = "torch_splits"
CLUMPS = (1, 64, 1024)
COLUMNS = ["id", "x"]
RATIOS = [0.8, 0.2]
SPLIT_SEED = 42
SHUFFLE_SEED = 7
CHUNK_ROWS = 1_000_000
TARGET = 1.5  # the project's loader must deliver >= 1.5x HF datasets' shuffled rows/s
LAYOUT_VERSION = 1  # bump when the cached tables' layout changes
QUIET_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# ------------------------------------------------------------------------------ the data
def source_asset(rows: int) -> dg.AssetsDefinition:
    @dg.asset(name=SOURCE)
    def _source() -> pa.RecordBatchReader:
        # A stream of 1M-row chunks: the IO manager writes it without the table in memory.
        schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])

        def chunks() -> Iterator[pa.RecordBatch]:
            rng = np.random.default_rng(0)
            for start in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - start)
                ids = np.arange(start, start + n, dtype=np.int64)
                yield pa.record_batch([ids, rng.standard_normal(n)], schema=schema)

        return pa.RecordBatchReader.from_batches(schema, chunks())

    return _source


def splits_asset(name: str, source: dg.AssetsDefinition, clump: int | None) -> dg.AssetsDefinition:
    return permutation_asset(
        name,
        source=source,
        split=RandomSplit(
            ratios=RATIOS, seed=SPLIT_SEED, split_names=["train", "test"], clump_size=clump
        ),
        shuffle=Shuffle(seed=SHUFFLE_SEED, clump_size=clump),
    )


def clump_asset_name(clump: int) -> str:
    return f"{SPLITS}_clump_{clump}"


def prepare(root: Path, rows: int, hf: bool) -> LanceDBResource:
    """Write the table and permutations (and the HF copy) unless a previous run left them."""
    db = LanceDBResource(uri=str(root / "lancedb"))
    marker = root / "ready.json"
    wanted = {"rows": rows, "layout": LAYOUT_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"reusing tables in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        source = source_asset(rows)
        assets = [
            source,
            splits_asset(SPLITS, source, None),
            *(splits_asset(clump_asset_name(c), source, c) for c in CLUMPS),
        ]
        resources = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}
        with dg.DagsterInstance.ephemeral() as instance:
            for asset in assets:
                started = time.perf_counter()
                dg.materialize(
                    assets,
                    selection=[asset],
                    resources=resources,
                    instance=instance,
                    run_config=QUIET_RUN_CONFIG,
                )
                print(f"materialized {asset.key.to_user_string()} in {_since(started):.1f} s")
        marker.write_text(json.dumps(wanted))
    if hf and not (root / "hf_train").exists():
        started = time.perf_counter()
        _write_hf_split(db, root / "hf_train")
        print(f"wrote the train split for HF datasets (save_to_disk) in {_since(started):.1f} s")
    return db


def _write_hf_split(db: LanceDBResource, path: Path) -> None:
    """The train split's rows in table order, as HF datasets keeps data (Arrow files on disk)."""
    import datasets

    rows = pa.Table.from_batches(list(BatchLoader(train_view(db, SPLITS), 1 << 20)))
    rows = rows.take(np.argsort(rows.column("id").to_numpy()))
    data = {name: rows.column(name).to_numpy() for name in COLUMNS}
    datasets.Dataset.from_dict(data).save_to_disk(str(path))


def train_view(db: LanceDBResource, asset: str) -> Permutation:
    """The view of split 'train' that the IO manager hands out, as Arrow batches."""
    request = ViewRequest(split="train", columns=COLUMNS, format="arrow")
    return open_view(db, asset=asset, table=asset, version=None, request=request)


def hand_built(db: LanceDBResource, asset: str) -> Permutation:
    """The same split by plain lancedb: ``Permutation.from_tables`` on the stored tables."""
    connection = lancedb.connect(db.uri)
    permutation = Permutation.from_tables(
        connection.open_table(SOURCE), connection.open_table(asset), "train"
    )
    return permutation.select_columns(COLUMNS).with_format("arrow")


# ----------------------------------------------------------------------------- measuring
def first_batch_times(db: LanceDBResource, batch: int, io_bytes: int) -> list[tuple[str, float]]:
    """Seconds from opening a view to holding its first training batch, per read path."""

    def timed(first: Callable[[], Any]) -> float:
        started = time.perf_counter()
        first()
        return _since(started)

    def loader() -> Any:
        return next(iter(BatchLoader(train_view(db, SPLITS), batch, io_bytes=io_bytes)))

    def sharded() -> Any:
        part = shard(train_view(db, SPLITS), rank=0, world_size=2, seed=1)
        return next(iter(BatchLoader(part, batch, io_bytes=io_bytes)))

    def workers() -> Any:
        batches = DataLoader(
            cast(Any, train_view(db, SPLITS)),
            batch_size=batch,
            num_workers=2,
            multiprocessing_context="spawn",
            collate_fn=torch.utils.data.default_convert,
        )
        iterator = iter(batches)
        try:
            return next(iterator)
        finally:
            del iterator  # stops the workers

    def lancedb_iter() -> Any:
        return next(iter(hand_built(db, SPLITS).iter(batch, skip_last_batch=False)))

    def lancedb_take() -> Any:
        return hand_built(db, SPLITS).take_offsets(list(range(batch)))

    def worker_start() -> Any:
        # A DataLoader over a dataset that reads nothing: the start-up part of `workers`.
        return next(iter(DataLoader(_Empty(), num_workers=2, multiprocessing_context="spawn")))

    return [
        ("(1) BatchLoader(view)", timed(loader)),
        ("(1b) BatchLoader(shard(view, rank 0 of 2))", timed(sharded)),
        ("DataLoader(view, num_workers=2, spawn)", timed(workers)),
        ("  of which spawn worker start-up (no reads)", timed(worker_start)),
        (f"(2) Permutation.iter({batch})", timed(lancedb_iter)),
        (f"lancedb Permutation.take_offsets({batch} rows)", timed(lancedb_take)),
    ]


class _Empty(torch.utils.data.Dataset[int]):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return index


@dataclass
class Figure:
    label: str
    rows: int
    seconds: float
    ids: np.ndarray

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def drain(
    label: str, batches: Iterable[Any], columns: Callable[[Any], tuple[Any, Any]], budget: float
) -> Figure:
    """Run a training loop over ``batches`` until exhausted or ``budget`` seconds have passed.

    ``columns`` gives a batch's ``id`` and ``x`` columns; the step sums ``x`` (touching the
    data, as a model would) and keeps ``id`` for the order checks.
    """
    ids: list[np.ndarray] = []
    rows = 0
    total = 0.0
    iterator = iter(batches)
    started = time.perf_counter()
    for batch in iterator:
        id_col, x_col = columns(batch)
        total += float(np.asarray(x_col).sum())
        ids.append(np.asarray(id_col))
        rows += len(ids[-1])
        if time.perf_counter() - started > budget:
            break
    seconds = time.perf_counter() - started
    close = getattr(iterator, "close", None)
    if close is not None:
        close()  # stop read-ahead threads before the next variant runs
    return Figure(label, rows, seconds, np.concatenate(ids) if ids else np.empty(0, np.int64))


def arrow_columns(batch: pa.RecordBatch | pa.Table) -> tuple[Any, Any]:
    return batch.column("id").to_numpy(), batch.column("x").to_numpy()


def tensor_columns(batch: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    return batch["id"].numpy(), batch["x"].numpy()


def randomness(ids: np.ndarray, table_rows: int) -> tuple[float, float]:
    """Share of adjacent pairs that are consecutive rows, and mean |jump| / (rows / 3)."""
    if ids.size < 2:
        return float("nan"), float("nan")
    jumps = np.diff(ids)
    # For two independent uniform positions in [0, n) the mean distance is n / 3.
    return float(np.mean(jumps == 1)), float(np.mean(np.abs(jumps)) / (table_rows / 3))


def _since(started: float) -> float:
    return time.perf_counter() - started


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000_000, help="table rows (default 10M)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"where tables are kept and reused (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument("--batch", type=int, default=1024, help="training batch rows (1024)")
    parser.add_argument("--io-mib", type=float, default=4.0, help="BatchLoader I/O MiB (4)")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds per variant at most (20)"
    )
    parser.add_argument("--no-hf", action="store_true", help="leave out HF datasets")
    args = parser.parse_args(argv)
    if args.rows < 10_000:
        parser.error("--rows must be at least 10000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    hf_version = "not used"
    if not args.no_hf:
        import datasets

        datasets.disable_progress_bars()
        hf_version = datasets.__version__
    print(
        f"perm_assets torch bench: python {platform.python_version()}, lancedb "
        f"{lancedb.__version__}, torch {torch.__version__}, datasets {hf_version}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{args.rows:,} rows (id int64, x float64); split train {RATIOS[0]:.0%} at random "
        f"(seed {SPLIT_SEED}), shuffled (seed {SHUFFLE_SEED}); training batch {args.batch:,}; "
        f"budget {args.budget:g} s per variant"
    )
    root = args.data_dir / f"rows_{args.rows}"
    db = prepare(root, args.rows, hf=not args.no_hf)

    view = train_view(db, SPLITS)
    split_rows = view.num_rows
    io_bytes = int(args.io_mib * 2**20)
    # Warm the page cache, so the first variant does not pay for cold reads.
    for _ in BatchLoader(view, 1 << 20):
        pass

    print("\ntime to first batch (s), each on a freshly opened view of split 'train':")
    for label, seconds in first_batch_times(db, args.batch, io_bytes):
        print(f"  {label:<46} {seconds:8.2f}")

    figures: list[Figure] = []
    loader = BatchLoader(view, args.batch, io_bytes=io_bytes)
    figures.append(drain("(1) perm_assets BatchLoader", loader, arrow_columns, args.budget))
    permutation = hand_built(db, SPLITS)
    figures.append(
        drain(
            f"(2) Permutation.iter({args.batch})",
            permutation.iter(args.batch, skip_last_batch=False),
            arrow_columns,
            args.budget,
        )
    )
    build_started = time.perf_counter()
    # Its builder sorts in lancedb's 100 MiB pool, which fails from ~3M rows: the resource's
    # builder_memory() raises it, as it does for the project's own builds.
    with db.builder_memory():
        streaming = StreamingDataset(
            lancedb.connect(db.uri).open_table(SOURCE),
            shuffle=True,
            shuffle_seed=SHUFFLE_SEED,
            columns=COLUMNS,
            read_batch_size=args.batch,
        )
    streaming_build = _since(build_started)
    figures.append(
        drain(
            "(3) StreamingDataset+DataLoader",
            DataLoader(streaming, batch_size=args.batch),
            tensor_columns,
            args.budget,
        )
    )
    hf_shuffle = float("nan")
    if not args.no_hf:
        import datasets

        hf = cast(datasets.Dataset, datasets.load_from_disk(str(root / "hf_train")))
        shuffle_started = time.perf_counter()
        shuffled = hf.shuffle(seed=SHUFFLE_SEED, keep_in_memory=True)
        hf_shuffle = _since(shuffle_started)
        batches = shuffled.with_format("arrow").iter(batch_size=args.batch)
        figures.append(drain("(4) HF datasets shuffled", batches, arrow_columns, args.budget))

    sharded = drain(
        "(1b) BatchLoader, shard rank 0 of 2",
        BatchLoader(shard(view, rank=0, world_size=2, seed=1), args.batch, io_bytes=io_bytes),
        arrow_columns,
        args.budget,
    )
    print(f"\ntrain split: {split_rows:,} rows; rows/s delivered to the training loop:")
    print(
        f"  {sharded.label:<34} {sharded.rows:>11,} rows {sharded.seconds:7.2f} s "
        f"{sharded.rows_per_s:>12,.0f} rows/s  (one rank's loop; 2 ranks share the cores)"
    )
    hf_figure = figures[3] if len(figures) > 3 else None
    for figure in figures:
        vs_hf = (
            f"{figure.rows_per_s / hf_figure.rows_per_s:6.2f}x HF" if hf_figure is not None else ""
        )
        print(
            f"  {figure.label:<34} {figure.rows:>11,} rows {figure.seconds:7.2f} s "
            f"{figure.rows_per_s:>12,.0f} rows/s  {vs_hf}"
        )
    print(
        f"  (setup, untimed above: StreamingDataset built its own shuffle in "
        f"{streaming_build:.2f} s; HF .shuffle() took {hf_shuffle:.2f} s)"
    )
    project, lancedb_iter = figures[0], figures[1]
    prefix = lancedb_iter.ids.size
    same = bool(np.array_equal(project.ids[:prefix], lancedb_iter.ids))
    print(f"same rows in the same order as Permutation.iter: {same} (first {prefix:,} rows)")
    print(
        f"ratio project/Permutation.iter = {project.rows_per_s / lancedb_iter.rows_per_s:.2f}x; "
        f"project/StreamingDataset = {project.rows_per_s / figures[2].rows_per_s:.2f}x"
    )
    if hf_figure is not None:
        ratio = project.rows_per_s / hf_figure.rows_per_s
        verdict = "met" if ratio >= TARGET else "NOT met"
        print(f"ratio project/HF = {ratio:.2f}x (target >= {TARGET}x: {verdict})")

    print(
        f"\nclump_size trade-off (the same split built with clump_size; budget {args.budget:g} s):"
    )
    print(
        f"  {'':<16} {'BatchLoader':>14} {f'iter({args.batch})':>14} "
        f"{'consecutive':>12} {'mean jump':>10}"
    )
    for clump in CLUMPS:
        asset = clump_asset_name(clump)
        fast = drain(
            "loader",
            BatchLoader(train_view(db, asset), args.batch, io_bytes=io_bytes),
            arrow_columns,
            args.budget,
        )
        plain = drain(
            "iter",
            hand_built(db, asset).iter(args.batch, skip_last_batch=False),
            arrow_columns,
            args.budget,
        )
        consecutive, jump = randomness(fast.ids, args.rows)
        print(
            f"clump_size {clump:<5} {fast.rows_per_s:>14,.0f} {plain.rows_per_s:>14,.0f} "
            f"{consecutive:>12.3f} {jump:>10.3f}"
        )
    print(
        "  (rows/s; consecutive: share of adjacent rows that are neighbours in the table, 0 for "
        "a uniform shuffle; mean jump: 1.0 for a uniform shuffle)"
    )
    print(f"\ntotal {_since(started):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
