"""Engines at scale: time and peak memory of a permutation (and folds) build per engine.

Generates ``N`` rows (``id`` int64, ``label`` int32 with 100 classes, ``x``, ``y`` float32)
into a LanceDB table under a temporary folder it removes afterwards, then materializes, each in
its own process (so peak RSS is that build's alone, read from the child's ``ru_maxrss``):

- ``split``: ``filter="label < 90"``, ``RandomSplit([0.8, 0.1, 0.1], names)``, ``Shuffle``;
- ``skfold`` / ``kfold`` (with ``--folds``): ``StratifiedKFold(k=5)`` / ``KFold(k=5)``,
- ``hash`` (``--kinds hash``): ``HashSplit(columns=["id"], weights=[8, 1, 1])``, materialized
  once untimed and then timed, so that its stability check compares two versions,

with each of ``--engines`` (default: all): ``builder`` is lancedb's builder + ``create_table``
alone (split only: the reference of issue 10's bounds), ``lancedb`` and ``local`` the engines
(defaults otherwise), ``ray1`` / ``ray2`` ``engine="ray"`` on a fresh Ray cluster of 1 or 2
worker nodes, started by tests/ray_netns.py in a loopback-only network namespace (its peak is
the driver's, and the cluster's peak, the sum of PSS of every process in the namespace, follows
the hash); each but the builder through ``dg.materialize`` with the blocking checks. It prints
time, peak RSS, rows/s, the ratio to the builder's time (to the lancedb engine's for folds) and a
short hash of the written table (engines differ by design; the same engine twice must agree,
and local and ray do).

    python bench/bench_scale.py --rows 10000000 100000000 [--folds] [--dir /big/disk]
    python bench/bench_scale.py --rows 1000000000 --engines local --folds --build-only \
        --dir /big/disk --keep        # generate 1B rows once (~16 GB), reuse them next time

``--build-only`` measures the engine's build and the write of the permutation table(s), without
Dagster, the blocking checks or the materialization report (for sizes where those do not fit).
A child whose RSS passes ``--max-rss-gib``, or that runs past ``--max-minutes``, is killed and
reported as such (the machine is shared; lancedb's builder at 1B rows is reported this way).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

CHUNK = 1_000_000
KINDS = ("split", "skfold", "kfold", "hash")


def generate(uri: str, rows: int) -> float:
    """Write ``rows`` rows as table ``base`` (streamed in 1M-row batches); seconds taken."""
    import lancedb

    schema = pa.schema(
        [("id", pa.int64()), ("label", pa.int32()), ("x", pa.float32()), ("y", pa.float32())]
    )

    def batches():
        rng = np.random.default_rng(0)
        for start in range(0, rows, CHUNK):
            size = min(CHUNK, rows - start)
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(np.arange(start, start + size, dtype=np.int64)),
                    pa.array(rng.integers(0, 100, size, dtype=np.int32)),
                    pa.array(rng.random(size, dtype=np.float32)),
                    pa.array(rng.random(size, dtype=np.float32)),
                ],
                schema=schema,
            )

    started = time.perf_counter()
    lancedb.connect(uri).create_table("base", pa.RecordBatchReader.from_batches(schema, batches()))
    return time.perf_counter() - started


def _data_folder(parent: str | None, rows: int, *, keep: bool) -> tuple[Path, bool]:
    """The folder of the ``rows``-row table and whether it already holds it: a fixed folder
    under ``parent`` with ``keep`` (reused by the next run), else a new temporary one."""
    if not keep:
        return Path(tempfile.mkdtemp(prefix="perm_assets-bench-scale-", dir=parent)), False
    if parent is None:
        raise SystemExit("--keep needs --dir (where the generated table stays)")
    folder = Path(parent) / f"perm_assets-bench-scale-{rows}"
    done = folder / "generated"  # written after the table: a half-written table is redone
    if done.exists():
        return folder, True
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder, False


def _spec(kind: str):
    from perm_assets import (
        FoldsSpec,
        KFold,
        PermutationSpec,
        RandomSplit,
        Shuffle,
        StratifiedKFold,
    )

    if kind == "hash":
        return PermutationSpec(split=_hash_split())
    if kind == "split":
        return PermutationSpec(
            filter="label < 90",
            split=RandomSplit(ratios=[0.8, 0.1, 0.1], seed=7, split_names=["train", "val", "test"]),
            shuffle=Shuffle(seed=1),
        )
    folds = StratifiedKFold(k=5, label="label", seed=1) if kind == "skfold" else KFold(k=5, seed=1)
    return FoldsSpec(folds=folds)


def _hash_split():  # the bench's hash split (imports perm_assets only in the child)
    from perm_assets import HashSplit

    return HashSplit(columns=["id"], weights=[8, 1, 1], split_names=["train", "val", "test"])


def _digest(db, name: str) -> str:
    from perm_assets.tables import READ_BATCH_ROWS

    # One digest per column, so the hash does not depend on where batches (fragments) end:
    # the Ray engine writes the same rows as other fragments than the local engine.
    columns = {"row_id": hashlib.sha256(), "split_id": hashlib.sha256()}
    table = db.open_table(name)
    for batch in table.search().select(list(columns)).to_batches(READ_BATCH_ROWS):
        for column, digest in columns.items():
            digest.update(batch.column(column).to_numpy().tobytes())
    both = hashlib.sha256(b"".join(digest.digest() for digest in columns.values()))
    return both.hexdigest()[:12]


def child_build_only(uri: str, engine: str, kind: str, spill: str) -> None:
    """The engine's build and the table write(s) in this process, no Dagster or checks."""
    from lancedb.table import Table

    from perm_assets import LanceDBResource, PermutationSpec, engines
    from perm_assets.tables import WriteMode, write_table

    db = LanceDBResource(uri=uri, engine=engine, spill_dir=spill)  # type: ignore[arg-type]
    base = db.open_table("base")
    spec = _spec(kind).resolve_seeds()
    connection = db.connect()
    started, cpu = time.perf_counter(), time.process_time()
    if isinstance(spec, PermutationSpec):
        with engines.build_permutation(db, base, spec, asset="perm") as data:
            written: Table = write_table(
                connection, "perm", data.persistable({}), WriteMode.OVERWRITE
            )
            rows = data.num_rows
    else:
        with engines.build_folds(db, base, spec, asset="perm") as folds:
            write_table(connection, "perm__train", folds.train_persistable({}), WriteMode.OVERWRITE)
            data = folds.validation
            written = write_table(connection, "perm", data.persistable({}), WriteMode.OVERWRITE)
            rows = data.num_rows
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    figures = {"seconds": seconds, "cpu_s": cpu, "success": True, "rows": rows}
    figures["checks_passed"] = None
    figures["written_rows"] = written.count_rows()
    figures["hash"] = _digest(db, "perm")
    print("RESULT " + json.dumps(figures), flush=True)


def child(uri: str, engine: str, kind: str, spill: str) -> None:
    """One materialization in this process; prints a JSON line with its figures."""
    if engine == "builder":
        builder_child(uri)
        return
    import dagster as dg

    from perm_assets import (
        KFold,
        LanceDBIOManager,
        LanceDBResource,
        RandomSplit,
        Shuffle,
        StratifiedKFold,
        folds_asset,
        permutation_asset,
    )

    db = LanceDBResource(uri=uri, engine=engine, spill_dir=spill)  # type: ignore[arg-type]
    resources = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}
    if kind == "hash":
        asset = permutation_asset("perm", source="base", split=_hash_split())
        # Untimed: a previous version for the timed run's stability check to compare with.
        first = dg.materialize(
            [asset, dg.AssetSpec("base")], resources=resources, selection=[asset]
        )
        assert first.success
    elif kind == "split":
        asset = permutation_asset(
            "perm",
            source="base",
            filter="label < 90",
            split=RandomSplit(ratios=[0.8, 0.1, 0.1], seed=7, split_names=["train", "val", "test"]),
            shuffle=Shuffle(seed=1),
        )
    else:
        folds = (
            StratifiedKFold(k=5, label="label", seed=1) if kind == "skfold" else KFold(k=5, seed=1)
        )
        asset = folds_asset("perm", source="base", folds=folds)
    cluster: list[float] = []
    if engine == "ray":  # in run_on_ray's PID namespace: /proc lists the cluster's processes
        threading.Thread(target=_sample_cluster, args=(cluster,), daemon=True).start()
    started, cpu = time.perf_counter(), time.process_time()
    result = dg.materialize(
        [asset, dg.AssetSpec("base")],
        resources=resources,
        selection=[asset],
        raise_on_error=False,
    )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    figures: dict[str, object] = {"seconds": seconds, "cpu_s": cpu, "success": result.success}
    if result.success:
        checks = result.get_asset_check_evaluations()
        figures["checks_passed"] = all(c.passed for c in checks)
        metadata = result.asset_materializations_for_node("perm")[0].metadata
        figures["rows"] = metadata["dagster/row_count"].value
        figures["hash"] = _digest(db, "perm")
    else:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        error = failure.step_failure_data.error if failure is not None else None  # type: ignore[union-attr]
        figures["error"] = (error.message.strip().splitlines()[-1] if error else "failed")[:300]
    figures["self_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if cluster:
        figures["cluster_peak_gib"] = max(cluster)
        figures["cluster_idle_gib"] = cluster[0]  # before the build: Ray's own processes
    print("RESULT " + json.dumps(figures), flush=True)


def _pss_gib() -> float:
    """Sum of the proportional set size of every process this /proc lists (shared pages, such
    as Ray's object store, counted once across the processes that map them)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:  # gone, or not ours to read
            continue
    return total / 2**20


def _sample_cluster(peaks: list[float]) -> None:
    """Append the cluster's memory (`_pss_gib`: head, worker nodes, their workers, this driver)
    every half second; the build's cluster peak is the largest."""
    while True:
        peaks.append(_pss_gib())
        time.sleep(0.5)


def builder_child(uri: str) -> None:
    """The reference: lancedb's builder + ``create_table`` alone (same spec as ``split``, the
    builder's sort pool raised as the resource does), in this process."""
    import lancedb
    from lancedb.permutation import permutation_builder

    os.environ.setdefault("LANCEDB_PERM_BUILDER_MEMORY_LIMIT", str(4096 << 20))  # as the resource
    db = lancedb.connect(uri)
    started, cpu = time.perf_counter(), time.process_time()
    builder = permutation_builder(db.open_table("base")).filter("label < 90")
    builder = builder.split_random(ratios=[0.8, 0.1, 0.1], seed=7, split_names=["a", "b", "c"])
    result = builder.shuffle(seed=1).execute()
    table = db.create_table("perm_builder", result.to_arrow(), mode="overwrite")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    figures = {"seconds": seconds, "cpu_s": cpu, "success": True, "checks_passed": None}
    figures["rows"] = table.count_rows()
    figures["hash"] = "-"
    print("RESULT " + json.dumps(figures), flush=True)


def measure_ray(uri: str, workers: int, kind: str, spill: str) -> dict[str, object]:
    """`child` with engine="ray" as the driver of a fresh Ray cluster of ``workers`` worker
    nodes (tests/ray_netns.py); peak RSS is the driver's own (workers not counted)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.ray_netns import run_on_ray

    run = run_on_ray(
        __file__, "--child", uri, "ray", kind, spill, workers=workers, timeout=24 * 3600.0
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"success": False, "peak_gib": float("nan"), "error": run.stderr[-300:]}
    figures = json.loads(lines[-1].removeprefix("RESULT "))
    figures["peak_gib"] = figures["self_peak_gib"]
    return figures


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _watch(
    process: subprocess.Popen, limit_gib: float, max_seconds: float | None, killed: list[str]
) -> None:
    """Kill ``process`` when its RSS passes ``limit_gib`` (others share the machine) or it
    runs past ``max_seconds``; ``killed`` gets the reason, printed as the build's outcome."""
    started = time.monotonic()
    while process.poll() is None:
        rss = _rss_gib(process.pid)
        if rss > limit_gib:
            killed.append(f"killed at {rss:.1f} GiB RSS (limit {limit_gib:g} GiB)")
            process.kill()
            return
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            killed.append(
                f"did not finish within {max_seconds / 60:g} min (killed; RSS then {rss:.1f} GiB)"
            )
            process.kill()
            return
        time.sleep(0.5)


def measure(
    uri: str,
    engine: str,
    kind: str,
    spill: str,
    *,
    build_only: bool,
    max_rss_gib: float,
    max_minutes: float | None = None,
) -> dict[str, object]:
    """Run `child` in a subprocess; its figures plus its peak RSS (ru_maxrss of that process)."""
    if engine in ("ray1", "ray2"):
        return measure_ray(uri, int(engine[-1]), kind, spill)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    flag = "--child-build-only" if build_only else "--child"
    command = [sys.executable, __file__, flag, uri, engine, kind, spill]
    killed: list[str] = []
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        limit_s = None if max_minutes is None else max_minutes * 60
        watcher = threading.Thread(target=_watch, args=(process, max_rss_gib, limit_s, killed))
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        watcher.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    figures: dict[str, object] = (
        json.loads(lines[-1].removeprefix("RESULT "))
        if lines
        else {"success": False, "error": f"exit {process.returncode}: {text[-300:]}"}
    )
    if killed:
        figures = {"success": False, "error": killed[0]}
    figures["peak_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    # CPU seconds of the measured section (all threads), from the child; on a shared machine
    # the wall time moves with the load, this much less. A child that died: its whole life.
    figures.setdefault("cpu_s", usage.ru_utime + usage.ru_stime)
    return figures


def _drop_outputs(folder: Path) -> None:
    """Remove what builds wrote under ``folder``: spill files and output tables (the base
    table stays)."""
    shutil.rmtree(folder / "spill", ignore_errors=True)
    for name in ("perm", "perm__train", "perm_builder"):
        shutil.rmtree(folder / "lancedb" / f"{name}.lance", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000_000])
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["builder", "lancedb", "local", "ray1", "ray2"],
        choices=["builder", "lancedb", "local", "ray1", "ray2"],
    )
    parser.add_argument("--folds", action="store_true", help="also StratifiedKFold and KFold")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="these kinds only")
    parser.add_argument("--dir", default=None, help="parent of the data folder")
    parser.add_argument(
        "--keep", action="store_true", help="keep the generated table under --dir and reuse it"
    )
    parser.add_argument(
        "--build-only", action="store_true", help="engine build + write only (no checks)"
    )
    parser.add_argument("--max-rss-gib", type=float, default=8.0, help="kill a child above it")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="kill a build running longer (e.g. lancedb's builder at 1B: printed as its outcome)",
    )
    parser.add_argument("--child", nargs=4, metavar=("URI", "ENGINE", "KIND", "SPILL"))
    parser.add_argument("--child-build-only", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.child_build_only:
        child_build_only(*args.child_build_only)
        return
    if args.build_only and {"ray1", "ray2"} & set(args.engines):
        # The Ray engine's workers write fragments that the IO manager commits: there is no
        # build without the materialization to measure.
        parser.error("--build-only does not apply to ray1 / ray2: run them without it")
    kinds = args.kinds or (KINDS[:3] if args.folds else KINDS[:1])
    mode = "engine build + write, no checks" if args.build_only else "dg.materialize + checks"
    print(f"{os.cpu_count()} cores, {mode}; figures on a shared machine vary by +-20%", flush=True)
    print(
        "vs ref: time over lancedb's builder + create_table (the split; for folds, over the "
        "lancedb engine)",
        flush=True,
    )
    header = f"{'rows':>13} {'kind':>7} {'engine':>8} {'s':>8} {'cpu s':>8} {'peak GiB':>9} "
    print(header + f"{'rows/s':>11} {'vs ref':>10}  hash / error", flush=True)
    for rows in args.rows:
        folder, reused = _data_folder(args.dir, rows, keep=args.keep)
        uri = str(folder / "lancedb")
        try:
            if reused:
                print(f"reusing {rows:,} rows in {folder}", flush=True)
            else:
                seconds = generate(uri, rows)
                (folder / "generated").touch()
                print(f"generated {rows:,} rows in {seconds:.1f} s", flush=True)
            for kind in kinds:
                reference: float | None = None
                for engine in args.engines:
                    if engine == "builder" and kind != "split":
                        continue  # lancedb's builder makes no folds tables
                    figures = measure(
                        uri,
                        engine,
                        kind,
                        str(folder / "spill"),
                        build_only=args.build_only,
                        max_rss_gib=args.max_rss_gib,
                        max_minutes=args.max_minutes,
                    )
                    # Each build's outputs go before the next: at 1B rows a folds build writes
                    # ~25 GB, and an overwrite keeps the old version's files.
                    _drop_outputs(folder)
                    took = float(figures.get("seconds", float("nan")))  # type: ignore[arg-type]
                    # The builder (run first) is the reference; else the lancedb engine.
                    if engine in ("builder", "lancedb") and figures.get("success"):
                        reference = reference or took
                    ratio = f"{took / reference:.2f}x" if reference else "-"
                    passed = figures.get("checks_passed")
                    checked = "skipped" if passed is None else "ok" if passed else "FAILED"
                    if "cluster_peak_gib" in figures:  # the driver's is in the peak column
                        peak, idle = figures["cluster_peak_gib"], figures["cluster_idle_gib"]
                        checked += (
                            f", cluster peak {peak:.2f} GiB ({peak - idle:+.2f} over idle; "  # type: ignore[operator]
                            "sampled every 0.5 s), cpu s: the driver's"
                        )
                    tail = (
                        f"{figures.get('hash')} checks={checked}"
                        if figures.get("success")
                        else f"FAILED: {figures.get('error')}"
                    )
                    print(
                        f"{rows:>13,} {kind:>7} {engine:>8} {took:>8.1f} "
                        f"{float(figures['cpu_s']):>8.1f} "  # type: ignore[arg-type]
                        f"{float(figures['peak_gib']):>9.2f} {rows / took:>11,.0f} {ratio:>10}  "  # type: ignore[arg-type]
                        + tail,
                        flush=True,
                    )
        finally:
            if args.keep:  # the table stays for the next run; spill and outputs do not
                _drop_outputs(folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
