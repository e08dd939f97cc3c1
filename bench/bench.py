"""Build and read figures for perm_assets against plain lancedb, on synthetic tables.

For each size: write a synthetic table through the project's IO manager (untimed for the
ratios), then time

1. building and persisting a filtered, random-split, shuffled permutation: (a) directly with
   lancedb's builder, (b) as a ``permutation_asset`` through ``dg.materialize``; also the
   project's build without Dagster and a no-op Dagster run, to show where (b)'s time goes;
2. reading the ``train`` split fully in Arrow batches: (a) a hand-built
   ``Permutation.from_tables``, (b) the view that the IO manager hands out (``open_view``);
3. stratified 5-fold cross-validation on the 100-class ``label`` column: (a) scikit-learn's
   ``StratifiedKFold(shuffle=True).split`` on the label array, all folds' (train, test) index
   arrays, (b) a ``folds_asset`` through ``dg.materialize``: assignment, both persisted tables
   and the blocking asset checks that re-read them; also the project's ``build_folds`` without
   Dagster or writes, and ``assign.stratified_kfold`` on the label array alone (``--no-folds``
   skips this phase);
4. the peak RSS of every timed call, against the base table's size on disk.

Run: ``make bench`` or ``.venv/bin/python bench/bench.py --rows 1000000 10000000``.
No ``from __future__ import annotations``: Dagster reads the asset functions' annotations.
"""

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
from lancedb.db import DBConnection
from lancedb.permutation import Permutation, Transforms, permutation_builder
from lancedb.table import LanceTable
from sklearn import __version__ as sklearn_version
from sklearn.model_selection import StratifiedKFold as SklearnStratifiedKFold

from perm_assets import (
    FoldsSpec,
    LanceDBIOManager,
    LanceDBResource,
    PermutationSpec,
    RandomSplit,
    Shuffle,
    StratifiedKFold,
    ViewRequest,
    WriteMode,
    build_permutation,
    folds_asset,
    open_view,
    permutation_asset,
    table_name,
)
from perm_assets.assign import check_stratified, stratified_kfold
from perm_assets.folds import TRAIN_SUFFIX, build_folds
from perm_assets.lineage import recorded_version
from perm_assets.tables import write_table

DEFAULT_ROWS = (1_000_000, 10_000_000)
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"

# The permutation under test: ~90% of rows kept, 80/20 train/test, shuffled, fixed seeds so that
# every variant builds the same rows (checked after the build phase).
FILTER = "label >= 10"
NUM_CLASSES = 100
RATIOS = [0.8, 0.2]
SPLIT_NAMES = ["train", "test"]
SPLIT_SEED = 42
SHUFFLE_SEED = 7
READ_SPLIT = "train"
READ_COLUMNS = ["x", "y"]
# Large read batches: lancedb's shuffled take is ~12x faster at 65,536 than at 1,024 rows.
READ_BATCH = 65_536
GEN_CHUNK = 262_144

# lancedb's own variable, named here rather than imported so the baseline owes nothing to the
# project. Its 100 MiB default fails random splits from about 3M rows.
LANCEDB_MEMORY_ENV = "LANCEDB_PERM_BUILDER_MEMORY_LIMIT"
BASELINE_MEMORY_LIMIT = 8 << 30

# Variant labels; an indented one is an extra figure that explains the (a)/(b) pair above it.
BUILD_A = "(a) lancedb builder direct"
BUILD_B = "(b) permutation_asset, materialize"
BUILD_A_BATCHED = "    (a) with 1M-row batches, not to_arrow"
BUILD_NO_DAGSTER = "    project build, no Dagster"
BUILD_NOOP = "    Dagster no-op materialize"
READ_A = "(a) Permutation.from_tables"
READ_B = "(b) open_view (IO manager)"
READ_FLOOR = "    (a) without with_* copies (floor)"
FOLDS_A = "(a) sklearn StratifiedKFold.split"
FOLDS_B = "(b) folds_asset, materialize+checks"
FOLDS_NO_DAGSTER = "    build_folds, no Dagster/writes"
FOLDS_ASSIGN = "    assign.stratified_kfold"

SOURCE_ASSET = "bench_table"
PERM_ASSET = "bench_splits"
DIRECT_PERM_TABLE = "bench_splits_direct"
NOOP_ASSET = "bench_noop"
FOLDS_ASSET = "bench_folds"

# Cross-validation: stratified k-fold on the synthetic label column, the same seed everywhere.
FOLDS_K = 5
FOLDS_LABEL = "label"
FOLDS_SEED = 0

BUILD_TARGET = 1.3  # (b) may take at most 1.3x the direct build
READ_TARGET = 0.95  # (b) must read at least 95% as fast as the hand-built permutation
FOLDS_TARGET = 1.0  # folds (b) and assign.stratified_kfold: no slower than scikit-learn
# A timed call whose RSS grows by more than this share of the base table's on-disk size is
# suspected of loading the whole table.
RSS_SUSPECT_SHARE = 0.5
# Below this the fixed allocations of lancedb/DataFusion (tens of MiB) swamp the comparison.
RSS_MIN_TABLE_MIB = 128

# Keep Dagster's per-event console logging out of the figures' output (events are still stored).
QUIET_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# ----------------------------------------------------------------------------- measuring
def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) so each call gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS); clear_refs resets it along with VmHWM.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class Sample:
    """One timed call: wall seconds, peak RSS during it and how far it rose above the start."""

    seconds: float
    peak_mib: float
    growth_mib: float


def measure(fn: Callable[[], int]) -> tuple[int, Sample]:
    """Run ``fn`` (returns a row count) once, timing it and tracking its peak RSS."""
    gc.collect()
    reset = _reset_peak_rss()
    start_rss = _current_rss_mib()
    started = time.perf_counter()
    rows = fn()
    seconds = time.perf_counter() - started
    peak = _peak_rss_mib()
    growth = max(0.0, peak - start_rss) if reset else float("nan")
    return rows, Sample(seconds, peak, growth)


@dataclass
class Figure:
    """Best-of-N result of one variant (fastest time; largest RSS over all repeats)."""

    size: int
    phase: str
    variant: str
    rows: int
    seconds: float
    peak_mib: float
    growth_mib: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def best_of(size: int, phase: str, variant: str, samples: list[tuple[int, Sample]]) -> Figure:
    rows = {r for r, _ in samples}
    if len(rows) != 1:
        raise AssertionError(f"{phase} {variant}: row counts differ between repeats: {rows}")
    return Figure(
        size=size,
        phase=phase,
        variant=variant,
        rows=rows.pop(),
        seconds=min(s.seconds for _, s in samples),
        peak_mib=max(s.peak_mib for _, s in samples),
        growth_mib=max(s.growth_mib for _, s in samples),
    )


# ------------------------------------------------------------------------------ the data
def synthetic_schema(vector_dim: int) -> pa.Schema:
    fields = [
        pa.field("id", pa.int64()),
        pa.field("label", pa.int64()),
        pa.field("x", pa.float32()),
        pa.field("y", pa.float32()),
    ]
    if vector_dim:
        fields.append(pa.field("vector", pa.list_(pa.float32(), vector_dim)))
    return pa.schema(fields)


def synthetic_reader(rows: int, *, vector_dim: int, seed: int = 0) -> pa.RecordBatchReader:
    """``rows`` random rows, generated chunk by chunk with numpy so memory stays flat."""
    schema = synthetic_schema(vector_dim)

    def batches() -> Iterator[pa.RecordBatch]:
        rng = np.random.default_rng(seed)
        for start in range(0, rows, GEN_CHUNK):
            n = min(GEN_CHUNK, rows - start)
            columns: list[pa.Array] = [
                pa.array(np.arange(start, start + n, dtype=np.int64)),
                pa.array(rng.integers(0, NUM_CLASSES, n, dtype=np.int64)),
                pa.array(rng.standard_normal(n, dtype=np.float32)),
                pa.array(rng.standard_normal(n, dtype=np.float32)),
            ]
            if vector_dim:
                flat = pa.array(rng.standard_normal(n * vector_dim, dtype=np.float32))
                columns.append(pa.FixedSizeListArray.from_arrays(flat, vector_dim))
            yield pa.RecordBatch.from_arrays(columns, schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------- assets
def source_asset(rows: int, vector_dim: int) -> dg.AssetsDefinition:
    @dg.asset(name=SOURCE_ASSET)
    def _source() -> pa.RecordBatchReader:
        # A stream, so the IO manager writes it without the whole table in memory.
        return synthetic_reader(rows, vector_dim=vector_dim)

    return _source


@dg.asset(name=NOOP_ASSET)
def noop_asset() -> dg.MaterializeResult:
    """Does nothing: its run time is Dagster's fixed cost per materialization."""
    return dg.MaterializeResult()


def spec() -> PermutationSpec:
    return PermutationSpec(
        filter=FILTER,
        split=RandomSplit(ratios=RATIOS, seed=SPLIT_SEED, split_names=SPLIT_NAMES),
        shuffle=Shuffle(seed=SHUFFLE_SEED),
    )


def stratified_folds() -> StratifiedKFold:
    return StratifiedKFold(k=FOLDS_K, label=FOLDS_LABEL, seed=FOLDS_SEED)


def folds_spec() -> FoldsSpec:
    """What ``folds_asset`` makes of ``folds=stratified_folds()`` (no filter, no shuffle)."""
    return FoldsSpec(folds=stratified_folds())


# ---------------------------------------------------------------------------- the bench
@contextmanager
def baseline_memory_limit() -> Iterator[None]:
    """Raise lancedb's builder pool for the baseline only; the project must not need it."""
    os.environ[LANCEDB_MEMORY_ENV] = str(BASELINE_MEMORY_LIMIT)
    try:
        yield
    finally:
        os.environ.pop(LANCEDB_MEMORY_ENV, None)


def _require_clean_env() -> None:
    if LANCEDB_MEMORY_ENV in os.environ:
        raise AssertionError(f"{LANCEDB_MEMORY_ENV} leaked into a project code path")


class SizeBench:
    """All figures for one table size, in its own database and Dagster instance."""

    def __init__(
        self,
        size: int,
        *,
        root: Path,
        repeat: int,
        vector_dim: int,
        instance: dg.DagsterInstance,
        folds: bool = True,
    ) -> None:
        self.size = size
        self.repeat = repeat
        self.with_folds = folds
        self.root = root
        self.instance = instance
        self.db = LanceDBResource(uri=str(root / "lancedb"))
        self.resources: dict[str, Any] = {
            "lancedb": self.db,
            "io_manager": LanceDBIOManager(db=self.db),
        }
        self.source = source_asset(size, vector_dim)
        s = spec()
        self.perm = permutation_asset(
            PERM_ASSET, source=self.source, filter=s.filter, split=s.split, shuffle=s.shuffle
        )
        self.source_table = table_name(self.source.key)
        self.perm_table = table_name(self.perm.key)
        self.folds = folds_asset(FOLDS_ASSET, source=self.source, folds=stratified_folds())
        self.folds_table = table_name(self.folds.key)
        self.figures: list[Figure] = []
        self.base_bytes = 0
        # Folds phase: the label column (read untimed) and the last fold ids of each variant.
        self.labels: np.ndarray = np.empty(0, dtype=np.int64)
        self._sklearn_tests: list[np.ndarray] = []
        self._assigned: np.ndarray = np.empty(0, dtype=np.uint64)

    def log(self, text: str) -> None:
        print(f"  [{self.size:,} rows] {text}", flush=True)

    def _materialize(
        self, assets: list[dg.AssetsDefinition], selection: list[dg.AssetsDefinition]
    ) -> dg.ExecuteInProcessResult:
        result = dg.materialize(
            assets,
            selection=selection,
            resources=self.resources,
            instance=self.instance,
            run_config=QUIET_RUN_CONFIG,
        )
        if not result.success:
            raise RuntimeError(f"materializing {[a.key for a in selection]} failed")
        return result

    def _connect(self) -> DBConnection:
        # lancedb's defaults (no read-consistency checks): the fastest plain-lancedb setup.
        return lancedb.connect(self.db.uri)

    # ------------------------------------------------------------------ phase 0: the data
    def write_source(self) -> None:
        def run() -> int:
            self._materialize([self.source], [self.source])
            return self.size

        rows, sample = measure(run)
        self.figures.append(best_of(self.size, "write", "source via IO manager", [(rows, sample)]))
        self.base_bytes = dir_bytes(Path(self.db.uri) / f"{self.source_table}.lance")
        self.log(f"wrote source in {sample.seconds:.2f} s, {self.base_bytes / 2**20:,.1f} MiB")

    # --------------------------------------------------------------------- phase 1: build
    def build_direct(self) -> int:
        """(a): lancedb's builder and ``create_table``, nothing else."""
        with baseline_memory_limit():
            conn = self._connect()
            result = self._direct_permutation(conn)
            conn.create_table(DIRECT_PERM_TABLE, result.to_arrow(), mode="overwrite")
        return self.size

    def build_direct_batched(self) -> int:
        """(a) as a user who knows lancedb's ``to_arrow`` reads in small batches would write it:
        the builder's table streamed to ``create_table`` in 1M-row batches (as the project
        reads it)."""
        with baseline_memory_limit():
            conn = self._connect()
            batches = self._direct_permutation(conn).search().to_batches(batch_size=1 << 20)
            conn.create_table(DIRECT_PERM_TABLE + "_batched", batches, mode="overwrite")
        return self.size

    def _direct_permutation(self, conn: DBConnection) -> LanceTable:
        return (
            permutation_builder(conn.open_table(self.source_table))
            .filter(FILTER)
            .split_random(ratios=RATIOS, seed=SPLIT_SEED, split_names=SPLIT_NAMES)
            .shuffle(seed=SHUFFLE_SEED)
            .execute()
        )

    def build_project_no_dagster(self) -> int:
        """The project's build and write functions without Dagster (attributes (b)'s time)."""
        _require_clean_env()
        table = self.db.open_table(self.source_table)
        with self.db.builder_memory():
            data = build_permutation(table, spec(), asset=PERM_ASSET)
        write_table(
            self.db.connect(), f"{self.perm_table}_nodagster", data.data, WriteMode.OVERWRITE
        )
        return self.size

    def build_project(self) -> int:
        """(b): the permutation asset, materialized by Dagster with the source already written."""
        _require_clean_env()
        self._materialize([self.source, self.perm], [self.perm])
        return self.size

    def build_noop(self) -> int:
        self._materialize([noop_asset], [noop_asset])
        return self.size

    def bench_build(self) -> None:
        variants: list[tuple[str, Callable[[], int]]] = [
            (BUILD_A, self.build_direct),
            (BUILD_B, self.build_project),
            (BUILD_A_BATCHED, self.build_direct_batched),
            (BUILD_NO_DAGSTER, self.build_project_no_dagster),
            (BUILD_NOOP, self.build_noop),
        ]
        self._run_alternating("build", variants)
        self._check_same_permutation()

    def _check_same_permutation(self) -> None:
        """All builds must hold the same rows in the same order, or the ratios mean nothing."""
        conn = self._connect()
        project = self.db.open_table(self.perm_table, version=self._perm_version()).to_arrow()
        same = all(
            conn.open_table(name).to_arrow().column(c).equals(project.column(c))
            for name in (DIRECT_PERM_TABLE, DIRECT_PERM_TABLE + "_batched")
            for c in ("row_id", "split_id")
        )
        self.log(f"direct and project permutations identical: {same} ({project.num_rows:,} rows)")
        if not same:
            raise AssertionError("the direct and project builds differ; the comparison is void")

    def _perm_version(self) -> int:
        return self._version(self.perm.key)

    def _version(self, key: dg.AssetKey) -> int:
        version = recorded_version(self.instance, key)
        if version is None:
            raise AssertionError(f"{key.to_user_string()} has no recorded version")
        return version

    # ---------------------------------------------------------------------- phase 2: read
    def _hand_built(self) -> Permutation:
        """``Permutation.from_tables`` by hand, pinned to the recorded versions."""
        conn = self._connect()
        perm_table = conn.open_table(self.perm_table)
        perm_table.checkout(self._perm_version())
        metadata = perm_table.schema.metadata or {}
        base = conn.open_table(self.source_table)
        base.checkout(int(metadata[b"base_version"]))
        split = json.loads(metadata[b"split_names"]).index(READ_SPLIT)
        return Permutation.from_tables(base, perm_table, split)

    def read_direct(self) -> int:
        """(a): the hand-built permutation refined with lancedb's public ``with_*`` methods."""
        return _drain(self._hand_built().select_columns(READ_COLUMNS).with_format("arrow"))

    def read_direct_in_place(self) -> int:
        """lancedb's floor: (a) without its ``with_*`` copies.

        lancedb's ``select_columns``/``with_format`` go through ``copy.copy``, i.e. pickle
        state: each reads the whole permutation table into Arrow and re-creates it in memory.
        Setting the same fields in place shows what reading alone costs.
        """
        perm = self._hand_built()
        perm.selection = {c: c for c in READ_COLUMNS}
        perm.transform_fn = Transforms.arrow2arrow
        return _drain(perm)

    def read_project(self) -> int:
        """(b): the view the IO manager hands to a downstream asset."""
        view = open_view(
            self.db,
            asset=self.perm.key.to_user_string(),
            table=self.perm_table,
            version=self._perm_version(),
            request=ViewRequest(split=READ_SPLIT, columns=READ_COLUMNS, format="arrow"),
        )
        return _drain(view)

    def bench_read(self) -> None:
        variants: list[tuple[str, Callable[[], int]]] = [
            (READ_A, self.read_direct),
            (READ_B, self.read_project),
            (READ_FLOOR, self.read_direct_in_place),
        ]
        figures = self._run_alternating("read", variants)
        rows = {f.rows for f in figures}
        if len(rows) != 1:
            raise AssertionError(f"the read variants got different row counts: {rows}")

    # --------------------------------------------------------------------- phase 3: folds
    def _read_labels(self) -> np.ndarray:
        """The label column alone, in table order (as ``build_folds`` scans it)."""
        table = self._connect().open_table(self.source_table)
        data = table.search().select([FOLDS_LABEL]).to_arrow()
        labels = data.column(FOLDS_LABEL).to_numpy()
        if labels.size != self.size:
            raise AssertionError(f"read {labels.size:,} labels from {self.size:,} rows")
        return labels

    def folds_sklearn(self) -> int:
        """(a): scikit-learn's shuffled StratifiedKFold, all k (train, test) index arrays."""
        labels = self.labels
        splitter = SklearnStratifiedKFold(n_splits=FOLDS_K, shuffle=True, random_state=FOLDS_SEED)
        folds = list(splitter.split(np.zeros(labels.size), labels))
        self._sklearn_tests = [test for _, test in folds]
        return labels.size

    def folds_project(self) -> int:
        """(b): the folds asset, materialized with the source already written: assignment,
        the folds and training tables written, and the blocking checks re-reading them."""
        _require_clean_env()
        result = self._materialize([self.source, self.folds], [self.folds])
        evaluations = result.get_asset_check_evaluations()
        failed = [e.check_name for e in evaluations if not e.passed]
        if not evaluations or failed:
            raise AssertionError(f"folds checks: {len(evaluations)} ran, failed: {failed}")
        return self.size

    def folds_project_no_dagster(self) -> int:
        """The project's fold assignment in memory: scan, assign, both tables; no writes."""
        _require_clean_env()
        table = self.db.open_table(self.source_table)
        data = build_folds(table, folds_spec().resolve_seeds(), asset=FOLDS_ASSET)
        return data.validation.num_rows

    def folds_assign(self) -> int:
        """The project's assignment function alone, on the label array."""
        self._assigned = stratified_kfold(self.labels, FOLDS_K, seed=FOLDS_SEED)
        return self._assigned.size

    def bench_folds(self) -> None:
        self.labels = self._read_labels()
        classes = np.unique(self.labels).size
        self.log(f"folds: {classes} classes in {self.labels.size:,} labels")
        variants: list[tuple[str, Callable[[], int]]] = [
            (FOLDS_A, self.folds_sklearn),
            (FOLDS_B, self.folds_project),
            (FOLDS_NO_DAGSTER, self.folds_project_no_dagster),
            (FOLDS_ASSIGN, self.folds_assign),
        ]
        self._run_alternating("folds", variants)
        self._check_folds()
        self.labels = np.empty(0, dtype=np.int64)
        self._sklearn_tests, self._assigned = [], np.empty(0, dtype=np.uint64)

    def _check_folds(self) -> None:
        """The persisted folds are assign's, and both assignments are stratified alike."""
        n = self.labels.size
        persisted = self.db.open_table(self.folds_table, version=self._version(self.folds.key))
        fold_ids = persisted.search().select(["split_id"]).to_arrow().column("split_id")
        project_sizes = np.bincount(fold_ids.to_numpy().astype(np.int64), minlength=FOLDS_K)
        assign_sizes = np.bincount(self._assigned.astype(np.int64), minlength=FOLDS_K)
        train_rows = self.db.open_table(self.folds_table + TRAIN_SUFFIX).count_rows()
        sklearn_ids = np.empty(n, dtype=np.uint64)
        for i, test in enumerate(self._sklearn_tests):
            sklearn_ids[test] = i
        sklearn_sizes = np.array([t.size for t in self._sklearn_tests])
        stratified = [
            check_stratified(ids, self.labels, FOLDS_K)["passed"]
            for ids in (self._assigned, sklearn_ids)
        ]
        same = (
            project_sizes.tolist() == assign_sizes.tolist() == sklearn_sizes.tolist()
            # Folds 1..k-1 then 0..k-2: each fold's training rows are one range of it.
            and train_rows == 2 * n - int(project_sizes[0]) - int(project_sizes[-1])
        )
        self.log(
            f"fold sizes project, assign and sklearn identical: {same} "
            f"({project_sizes.tolist()}, {train_rows:,} training rows); each class within one "
            f"row of n/k per fold: project {stratified[0]}, sklearn {stratified[1]}"
        )
        if not (same and all(stratified)):
            raise AssertionError("the fold assignments differ in size or stratification")

    # ------------------------------------------------------------------------- plumbing
    def _run_alternating(
        self, phase: str, variants: list[tuple[str, Callable[[], int]]]
    ) -> list[Figure]:
        """Best of ``repeat`` per variant, rotating the order so caches favour none of them."""
        samples: dict[str, list[tuple[int, Sample]]] = {name: [] for name, _ in variants}
        for i in range(self.repeat):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for name, fn in order:
                rows, sample = measure(fn)
                samples[name].append((rows, sample))
                self.log(f"{phase} {name.strip()}: {sample.seconds:.3f} s (repeat {i + 1})")
        figures = [best_of(self.size, phase, name, samples[name]) for name, _ in variants]
        self.figures.extend(figures)
        return figures

    def run(self) -> None:
        self.write_source()
        self.bench_build()
        self.bench_read()
        if self.with_folds:
            self.bench_folds()


def _drain(view: Permutation) -> int:
    """Read every row of ``view`` in Arrow batches; the row count proves nothing was skipped."""
    # Both views were given format "arrow"; lancedb types every format's batches as dicts.
    batches = cast(Iterator[pa.RecordBatch], view.iter(READ_BATCH, skip_last_batch=False))
    rows = 0
    for batch in batches:
        rows += batch.num_rows
    return rows


# ------------------------------------------------------------------------------ reporting
def _ratio(value: float, target: float, *, at_most: bool) -> str:
    ok = value <= target if at_most else value >= target
    sign = "<=" if at_most else ">="
    return f"{value:.3f}  (target {sign} {target:.2f}: {'ok' if ok else 'MISSED'})"


def report(benches: list[SizeBench], total_seconds: float) -> None:
    header = (
        f"{'rows':>12}  {'phase':<5}  {'variant':<38} {'seconds':>9} {'rows/s':>13} "
        f"{'peak RSS MiB':>12} {'RSS growth':>10}"
    )
    print()
    print("=" * len(header))
    print(header)
    print("-" * len(header))
    for bench in benches:
        for f in bench.figures:
            print(
                f"{f.size:>12,}  {f.phase:<5}  {f.variant:<38} {f.seconds:>9.3f} "
                f"{f.rows_per_s:>13,.0f} {f.peak_mib:>12,.0f} {f.growth_mib:>10,.0f}"
            )
        print("-" * len(header))
    print("rows/s: build = base-table rows / s; read = rows of the split / s. Best of the repeats;")
    print("peak RSS: largest over repeats of the process peak during one call (growth: above")
    print("the RSS at the call's start).")
    if any(f.phase == "folds" for b in benches for f in b.figures):
        print("folds: rows/s = labelled base-table rows / s.")
    print()
    for bench in benches:
        fig = {f.variant: f for f in bench.figures}
        build_a, build_b = fig[BUILD_A], fig[BUILD_B]
        read_a, read_b, floor = fig[READ_A], fig[READ_B], fig[READ_FLOOR]
        print(
            f"ratio build rows={bench.size}  (b)/(a) seconds = "
            + _ratio(build_b.seconds / build_a.seconds, BUILD_TARGET, at_most=True)
        )
        print(
            f"ratio read  rows={bench.size}  (b)/(a) rows/s  = "
            + _ratio(read_b.rows_per_s / read_a.rows_per_s, READ_TARGET, at_most=False)
        )
        batched = fig[BUILD_A_BATCHED]
        print(
            f"  build (b)/(a with 1M-row batches) seconds = {build_b.seconds / batched.seconds:.3f}"
            ": against the tuned direct path, which skips to_arrow's small batches as (b) does"
        )
        print(
            f"  build (b) - (a) = {build_b.seconds - build_a.seconds:+.3f} s; a Dagster run alone "
            f"takes {fig[BUILD_NOOP].seconds:.3f} s, the project's build without Dagster "
            f"{fig[BUILD_NO_DAGSTER].seconds - build_a.seconds:+.3f} s vs (a)"
        )
        print(
            f"  read (b)/(floor) rows/s = {read_b.rows_per_s / floor.rows_per_s:.3f}: the view "
            "against lancedb without its with_* copies"
        )
        if FOLDS_A in fig:
            _report_folds(bench, fig)
    print()
    for bench in benches:
        base_mib = bench.base_bytes / 2**20
        timed = [f for f in bench.figures if f.phase in ("build", "read")]
        worst = max(timed, key=lambda f: f.growth_mib if math.isfinite(f.growth_mib) else -1)
        share = worst.growth_mib / base_mib if base_mib else float("nan")
        if not math.isfinite(share):
            verdict = "unknown: this OS cannot reset the peak RSS per call"
        elif base_mib < RSS_MIN_TABLE_MIB:
            verdict = "inconclusive: the table is smaller than the libraries' own allocations"
        elif share < RSS_SUSPECT_SHARE:
            verdict = "ok: no build/read path loaded the whole base table"
        else:
            verdict = "SUSPECT: a path may have loaded the whole base table"
        print(
            f"memory rows={bench.size}  base table on disk {base_mib:,.1f} MiB; largest RSS "
            f"growth {worst.growth_mib:,.1f} MiB in {worst.phase} {worst.variant.strip()} "
            f"({share:.2f}x the table): {verdict}"
        )
    for bench in benches:
        _report_folds_memory(bench)
    print(f"\ntotal run time: {total_seconds:.1f} s")


def _report_folds(bench: SizeBench, fig: dict[str, Figure]) -> None:
    sklearn, project = fig[FOLDS_A], fig[FOLDS_B]
    no_dagster, alone = fig[FOLDS_NO_DAGSTER], fig[FOLDS_ASSIGN]
    print(
        f"ratio folds  rows={bench.size}  (b)/(a) seconds = "
        + _ratio(project.seconds / sklearn.seconds, FOLDS_TARGET, at_most=True)
    )
    print(
        f"ratio assign rows={bench.size}  stratified_kfold/(a) seconds = "
        + _ratio(alone.seconds / sklearn.seconds, FOLDS_TARGET, at_most=True)
    )
    noop = (
        f"; a Dagster run alone takes {fig[BUILD_NOOP].seconds:.3f} s" if BUILD_NOOP in fig else ""
    )
    print(
        f"  folds (b) {project.seconds:.3f} s = build_folds {no_dagster.seconds:.3f} s (of which "
        f"stratified_kfold {alone.seconds:.3f} s) + writes, checks and Dagster "
        f"{project.seconds - no_dagster.seconds:.3f} s{noop}"
    )


def _report_folds_memory(bench: SizeBench) -> None:
    """RSS growth of each folds call against the base table on disk."""
    figures = [f for f in bench.figures if f.phase == "folds"]
    if not figures:
        return
    base_mib = bench.base_bytes / 2**20
    worst = max(figures, key=lambda f: f.growth_mib if math.isfinite(f.growth_mib) else -1)
    share = worst.growth_mib / base_mib if base_mib else float("nan")
    if not math.isfinite(share):
        verdict = "unknown: this OS cannot reset the peak RSS per call"
    elif base_mib < RSS_MIN_TABLE_MIB:
        verdict = "inconclusive: the table is smaller than the libraries' own allocations"
    elif share < RSS_SUSPECT_SHARE:
        verdict = f"ok: every call under {RSS_SUSPECT_SHARE:.2f}x the table"
    else:
        verdict = f"MISSED: {worst.variant.strip()} grew by {share:.2f}x the table"
    growths = ", ".join(
        f"{f.variant.strip().split(',')[0]} {f.growth_mib:,.1f} MiB "
        f"({f.growth_mib / base_mib if base_mib else float('nan'):.2f}x)"
        for f in figures
    )
    print(
        f"memory folds rows={bench.size}  base table on disk {base_mib:,.1f} MiB; RSS growth: "
        f"{growths}; {verdict}"
    )


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=list(DEFAULT_ROWS),
        help="table sizes to run (default: 1000000 10000000)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timings per variant, the best kept (default: 3)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"where the tables are written, replaced per run (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--no-folds",
        action="store_true",
        help="skip the cross-validation phase (folds_asset and assignment vs scikit-learn)",
    )
    parser.add_argument(
        "--vector-dim",
        type=int,
        default=64,
        help="width of the float32 vector column; it makes the base table large (0: none)",
    )
    args = parser.parse_args(argv)
    if any(n < 1000 for n in args.rows):
        parser.error("--rows must each be at least 1000")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if LANCEDB_MEMORY_ENV in os.environ:
        # The project must work without it: drop an inherited value so (b) runs out of the box.
        print(f"note: ignoring {LANCEDB_MEMORY_ENV}={os.environ.pop(LANCEDB_MEMORY_ENV)}")
    print(
        f"perm_assets bench: python {platform.python_version()}, lancedb {lancedb.__version__}, "
        f"dagster {dg.__version__}, pyarrow {pa.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"permutation: filter {FILTER!r}, random split {RATIOS} {SPLIT_NAMES} seed {SPLIT_SEED}, "
        f"shuffle seed {SHUFFLE_SEED}; read: split {READ_SPLIT!r}, columns {READ_COLUMNS}, "
        f"arrow batches of {READ_BATCH:,}; vector dim {args.vector_dim}"
    )
    if not args.no_folds:
        print(
            f"folds: stratified {FOLDS_K}-fold on {FOLDS_LABEL!r} ({NUM_CLASSES} classes), seed "
            f"{FOLDS_SEED}, against scikit-learn {sklearn_version}'s StratifiedKFold(shuffle=True)"
        )
    benches: list[SizeBench] = []
    for size in args.rows:
        root = args.data_dir / f"rows_{size}"
        shutil.rmtree(root, ignore_errors=True)  # each run starts from one fresh table version
        print(f"\n{size:,} rows, best of {args.repeat}:", flush=True)
        with dg.DagsterInstance.ephemeral() as instance:
            bench = SizeBench(
                size,
                root=root,
                repeat=args.repeat,
                vector_dim=args.vector_dim,
                instance=instance,
                folds=not args.no_folds,
            )
            bench.run()
        benches.append(bench)
    report(benches, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
