"""Driver scripts for tests/test_ray_engine.py, run on a namespaced Ray cluster by
`tests.ray_netns.run_on_ray`: ``python tests/ray_driver.py <command> [args]``; the last stdout
line is a JSON summary the test asserts on."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Literal, cast


def trivial() -> dict[str, Any]:
    """Where tasks run and what they see: the harness's own check."""
    from tests.ray_netns import connect

    ray = connect()

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def where() -> tuple[str, bool]:
        # Long enough that a busy node's CPU sends the next task to another node: instant
        # tasks all ran on one worker in some runs (a worker's first lease was faster).
        time.sleep(0.5)
        return ray.get_runtime_context().get_node_id(), "AWS_SECRET_ACCESS_KEY" in os.environ

    seen = ray.get([where.remote() for _ in range(6)])
    return {
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "alive_nodes": sum(bool(node["Alive"]) for node in ray.nodes()),
        "task_nodes": len({node for node, _ in seen}),
        "workers_have_credentials": all(has for _, has in seen),
        "args": sys.argv[2:],
    }


N = 30_000


def _rows(n: int) -> Any:
    import numpy as np
    import pyarrow as pa

    ids = np.arange(n, dtype=np.int64)
    tags = np.array(["d", "a", "c", "b", "e"])  # first appearance is not label order
    return pa.table(
        {
            "id": ids,
            "label": (ids * 7919 % 37).astype(np.int32),
            "tag": tags[ids * 31 % 11 % 5],
            "user": (ids * 104729 % 997).astype(np.int64),  # groups of ~30 rows
            "t": (ids * 7 % 1500 // 3).astype(np.float64),  # 500 times, ~60 rows each
        }
    )


def _cases() -> dict[str, dict[str, Any]]:
    """Permutation specs, and folds specs (those with ``folds``)."""
    from perm_assets import (
        CalculatedSplit,
        GroupSplit,
        HashSplit,
        RandomSplit,
        SequentialSplit,
        Shuffle,
        StratifiedKFold,
        TimeSplit,
    )

    return {
        "no_split_shuffled": {"filter": "id % 3 = 0", "shuffle": Shuffle(seed=4)},
        "random_shuffled": {
            "filter": "label < 30",
            "split": RandomSplit(ratios=[0.8, 0.1, 0.1], seed=7, split_names=["a", "b", "c"]),
            "shuffle": Shuffle(seed=1),
        },
        "random_counts": {"split": RandomSplit(counts=[1000, 333], seed=3)},
        "random_fixed_unshuffled": {"split": RandomSplit(fixed=3, seed=5)},
        # Per-class ranks by a seed (classes in ascending label order), filtered, read
        # shuffled; both folds tables compared (KFold's path plus classes).
        "stratified_kfold": {
            "filter": "label < 30",
            "folds": StratifiedKFold(k=4, label="label", seed=3),
            "shuffle": Shuffle(seed=2),
        },
        # Classes of a string label by first appearance, each ranked by row id.
        "stratified_kfold_in_order": {
            "filter": "id % 3 != 0",
            "folds": StratifiedKFold(k=3, label="tag", shuffle=False),
        },
        # Rank by row id (KFold(shuffle=False)'s path: the local engine's scan position).
        "sequential": {"filter": "id % 5 != 1", "split": SequentialSplit(ratios=[0.7, 0.3])},
        "hash": {
            "split": HashSplit(columns=["user"], weights=[3, 1], discard_weight=1),
            "shuffle": Shuffle(seed=9),
        },
        "calculated": {
            "filter": "id % 2 = 0",
            "split": CalculatedSplit(expression="id % 3", splits=3),
        },
        # Groups and (group, label) pairs counted; GroupKFold takes the same path.
        "group_stratified": {
            "split": GroupSplit(group="user", label="tag", ratios=[0.8, 0.2], seed=4),
        },
        "time": {
            "split": TimeSplit(column="t", ratios=[0.5, 0.3, 0.2]),
            "shuffle": Shuffle(seed=3),
        },
    }


FRAGMENT_ROWS = 10_000


def _fragmented_base(uri: str) -> None:
    """Table ``base`` of `_rows` written in three fragments of `FRAGMENT_ROWS` (fragment
    ``f`` holds ids ``f * FRAGMENT_ROWS + offset``), so Ray reads and sorts several blocks and
    the workers write several fragments; the permutation assets take it as an external
    source (``source="base"``)."""
    import lancedb

    rows = _rows(N)
    table = lancedb.connect(uri).create_table("base", rows.slice(0, FRAGMENT_ROWS))
    for start in range(FRAGMENT_ROWS, N, FRAGMENT_ROWS):
        table.add(rows.slice(start, FRAGMENT_ROWS))


def _materialize_cases(
    uri: str, db: Any, cases: dict[str, dict[str, Any]], instance: Any
) -> dict[str, Any]:
    """The ``cases`` as assets over `_fragmented_base`, materialized in one run; for each,
    the Ray task counts its disjoint-and-complete check reported (None: checked in this
    process), and its training check's (``<case>/training``) for k-fold kinds."""
    import dagster as dg

    from perm_assets import LanceDBIOManager

    _fragmented_base(uri)
    perms = [_asset(name, "base", spec) for name, spec in cases.items()]
    result = dg.materialize(
        [dg.AssetSpec("base"), *perms],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        selection=perms,
        instance=instance,
    )
    assert result.success
    tasks = {}
    for evaluation in result.get_asset_check_evaluations():
        found = getattr(evaluation.metadata.get("checked_by_ray_tasks"), "value", None)
        name = evaluation.asset_key.to_user_string()
        if evaluation.check_name == "splits_disjoint_and_complete":
            tasks[name] = found
        elif evaluation.check_name == "train_and_validation_disjoint":
            tasks[f"{name}/training"] = found
    return tasks


def _asset(name: str, base: Any, spec: dict[str, Any]) -> Any:
    from perm_assets import folds_asset, permutation_asset

    factory = folds_asset if "folds" in spec else permutation_asset
    return factory(name, source=base, **spec)


def _tables(cases: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """``(case, table)`` for every table the cases write: a folds asset writes two."""
    from perm_assets.folds import TRAIN_SUFFIX

    pairs = []
    for name, spec in cases.items():
        pairs.append((name, name))
        if "folds" in spec:
            pairs.append((name, name + TRAIN_SUFFIX))
    return pairs


def _digest(table: Any) -> str:
    """Hash of a permutation table: its row ids and split ids in order, and its split names."""
    import hashlib

    digest = hashlib.sha256(table.column("row_id").to_numpy().tobytes())
    digest.update(table.column("split_id").to_numpy().tobytes())
    digest.update(table.schema.metadata[b"split_names"])
    return digest.hexdigest()


def build() -> dict[str, Any]:
    """The cases named in ``argv[3]`` (comma-separated) by the local engine and by Ray (over
    the same base table and version, in two databases under ``argv[2]``): a hash of each
    table, the data versions, and whether a view over each Ray-built table reads the base rows
    its row ids address."""
    import dagster as dg
    import lancedb
    import numpy as np

    from perm_assets import LanceDBResource
    from perm_assets.tables import read_all
    from perm_assets.views import ViewRequest, open_view, read_arrow

    connect_ray = os.environ.get("RAY_ADDRESS")
    root = sys.argv[2]
    cases = {name: spec for name, spec in _cases().items() if name in sys.argv[3].split(",")}
    out: dict[str, Any] = {
        "hashes": {},
        "versions": {},
        "view_ok": {},
        "fragments": {},
        "split_rows": {},
    }
    # Small check shards and route tasks: `_fragmented_base`'s three fragments make three
    # shards, each permutation several routes (the default sizes make one of each here).
    from perm_assets.engines import ray_checks

    ray_checks.SHARD_ROWS, ray_checks.ROUTE_ROWS = FRAGMENT_ROWS, FRAGMENT_ROWS // 2
    for engine in ("local", "ray"):
        uri = f"{root}/{engine}"
        db = LanceDBResource(
            uri=uri, engine=engine, ray_address=connect_ray, spill_dir=f"{root}/spill"
        )
        with dg.DagsterInstance.ephemeral() as instance:
            out[f"checked_by_ray_tasks/{engine}"] = _materialize_cases(uri, db, cases, instance)
            for name in cases:
                event = instance.get_latest_materialization_event(dg.AssetKey(name))
                assert event is not None and event.asset_materialization is not None
                tags = event.asset_materialization.tags or {}
                out["versions"][f"{engine}/{name}"] = tags["dagster/data_version"]
        conn = lancedb.connect(uri)
        for case, name in _tables(cases):
            table = read_all(conn.open_table(name))
            row_ids = table.column("row_id").to_numpy()
            out["hashes"][f"{engine}/{name}"] = _digest(table)
            # Lance fragments of the table: one per block the Ray workers wrote.
            fragments = cast(Any, conn.open_table(name)).to_lance().get_fragments()
            out["fragments"][f"{engine}/{name}"] = [f.count_rows() for f in fragments]
            split_ids = table.column("split_id").to_numpy()
            out["split_rows"][f"{engine}/{name}"] = np.bincount(split_ids.astype(np.int64)).tolist()
            if engine != "ray" or name != case:  # a view of the training table needs a fold
                continue
            # The base rows each row id addresses (`_fragmented_base`: fragment f holds ids
            # f * FRAGMENT_ROWS + offset). The filters make the selected rows sparse, so row
            # ids that were positions among the selected rows would read other rows.
            fragment, offset = row_ids >> np.uint64(32), row_ids & np.uint64(0xFFFFFFFF)
            expected = (fragment * np.uint64(FRAGMENT_ROWS) + offset).astype(np.int64)
            names = json.loads(table.schema.metadata[b"split_names"])
            ok = bool((offset < FRAGMENT_ROWS).all())
            for index, split in enumerate(names):
                view = open_view(
                    db,
                    asset=name,
                    table=name,
                    version=None,
                    request=ViewRequest(split=split, columns=["id"]),
                )
                got = read_arrow(view).column("id").to_numpy()
                ok = ok and np.array_equal(got, expected[split_ids == index])
            out["view_ok"][name] = ok
    if "group_stratified" in cases:
        out["corrupted"] = _corrupted_checks(f"{root}/ray", connect_ray)
    sorting = {name: cases[name] for name in ("random_counts", "stratified_kfold") if name in cases}
    if sorting:
        out["sorted"] = _sort_path(root, connect_ray, sorting)
    if "calculated" in cases:
        out["out_of_range"] = _out_of_range(root, connect_ray)
    if sys.argv[4:] == ["then-kill-the-worker"]:
        out["no_worker"] = _no_worker_left(root, connect_ray)
    return out


def _corrupted_checks(uri: str, address: str | None) -> dict[str, Any]:
    """The Ray-built ``group_stratified`` table corrupted (a row dropped, one twice, an id of
    no base fragment, a split id past the splits), then its membership figures as Ray tasks
    (`ray_checks.cover`) and in this process (`membership`): both, to compare."""
    import lancedb
    import numpy as np
    import pyarrow as pa

    from perm_assets.engines import ray_checks
    from perm_assets.membership import (
        Membership,
        cover_figures,
        group_figures,
        scan_filtered,
        table_batches,
    )
    from perm_assets.tables import read_all

    spec = _cases()["group_stratified"]
    conn = lancedb.connect(uri)
    rows = read_all(conn.open_table("group_stratified"))
    row_ids = rows.column("row_id").to_numpy()
    split_ids = rows.column("split_id").to_numpy()
    stray = (np.uint64(40) << np.uint64(32)) | np.uint64(1)
    corrupted = pa.table(
        {
            "row_id": np.concatenate([row_ids[1:], row_ids[5:6], [stray]]).astype(np.uint64),
            "split_id": np.concatenate([split_ids[1:], [7], [0]]).astype(np.uint64),
        }
    )
    stored = conn.create_table("corrupted", corrupted.slice(0, 7_000))
    for start in range(7_000, corrupted.num_rows, 7_000):  # several fragments: several routes
        stored.add(corrupted.slice(start, 7_000))
    base = conn.open_table("base")
    keys = {"group": spec["split"].group}
    num_splits = len(spec["split"].ratios)
    found = ray_checks.cover(
        stored,
        base,
        spec.get("filter"),
        num_splits,
        address=address,
        storage_options={},
        asset="corrupted",
        **keys,
    )
    assert found is not None
    member, scan, tasks = found
    here = Membership.build(base, table_batches(stored), num_splits)
    assert here is not None
    with here:
        scan_here = scan_filtered(here, base, spec.get("filter"), asset="corrupted", **keys)
    return {
        "tasks": tasks,
        "ray": {"cover": cover_figures(member, scan), "groups": group_figures(scan)},
        "here": {"cover": cover_figures(here, scan_here), "groups": group_figures(scan_here)},
    }


def _sort_path(root: str, address: str | None, cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Hashes of the ``cases`` built by Ray with `_Build.bounds` refusing every histogram
    (``_FETCH_KEYS = 0``, as for very many classes), so their seeded ranks come from Ray Data's
    sort instead, and whether each call of `_Build.bounds` refused."""
    import dagster as dg
    import lancedb

    from perm_assets import LanceDBResource
    from perm_assets.engines import ray as ray_engine
    from perm_assets.tables import read_all

    uri = f"{root}/ray_sorted"
    db = LanceDBResource(uri=uri, engine="ray", ray_address=address)
    bounds, refused = ray_engine._Build.bounds, []

    def refusing(self: Any, *args: Any) -> Any:
        found = bounds(self, *args)
        refused.append(found is None)
        return found

    fetch_keys, ray_engine._FETCH_KEYS = ray_engine._FETCH_KEYS, 0
    build = cast(Any, ray_engine._Build)  # a class attribute, patched for these builds only
    build.bounds = refusing
    try:
        with dg.DagsterInstance.ephemeral() as instance:
            _materialize_cases(uri, db, cases, instance)
    finally:
        ray_engine._FETCH_KEYS, build.bounds = fetch_keys, bounds
    conn = lancedb.connect(uri)
    hashes = {name: _digest(read_all(conn.open_table(name))) for _, name in _tables(cases)}
    return {"hashes": hashes, "refused": refused}


def _out_of_range(root: str, address: str | None) -> dict[str, Any]:
    """A calculated split giving an undeclared split index, by each engine: the error (met
    by a Ray task, not before) and whether a table was written."""
    import dagster as dg

    from perm_assets import CalculatedSplit, LanceDBIOManager, LanceDBResource, permutation_asset

    out: dict[str, Any] = {}
    for engine in ("local", "ray"):
        db = LanceDBResource(uri=f"{root}/{engine}", engine=engine, ray_address=address)

        @dg.asset(name="base")
        def base() -> Any:
            return _rows(N)

        split = CalculatedSplit(expression="id % 4", splits=3)
        perm = permutation_asset("out_of_range", source=base, split=split)
        result = dg.materialize(
            [base, perm],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
            selection=[perm.key],
            raise_on_error=False,
        )
        failure = result.failure_data_for_node("out_of_range")
        error = failure.error if failure else None
        # The step's own error is Dagster's wrapper; its cause is what the build raised.
        cause = error.cause if error is not None else None
        out[engine] = {
            "success": result.success,
            "class": cause.cls_name if cause is not None else None,
            "message": cause.message if cause is not None else "",
            "written": db.table_exists("out_of_range"),
        }
    return out


def _no_worker_left(root: str, address: str | None) -> dict[str, Any]:
    """Every worker node dead (SIGKILLed, and Ray says so), then a Ray build: Ray would wait
    for a CPU forever; the engine fails it after ``NO_CPU_SECONDS`` (3 s here)."""
    import dagster as dg
    import lancedb

    from perm_assets import LanceDBIOManager, LanceDBResource, RandomSplit, permutation_asset
    from perm_assets.engines import ray as ray_engine

    ray = sys.modules["ray"]  # connected by the Ray builds above
    workers = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    pids = [pid for node in workers for pid in _node_processes(node["RayletSocketName"])]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60.0
    while ray.cluster_resources().get("CPU", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    uri = f"{root}/ray"
    before = lancedb.connect(uri).open_table("random_counts").list_versions()
    ray_engine.NO_CPU_SECONDS = 3.0
    db = LanceDBResource(uri=uri, engine="ray", ray_address=address)

    @dg.asset(name="base")
    def base() -> Any:
        return _rows(N)

    perm = permutation_asset("random_counts", source=base, split=RandomSplit(counts=[9, 9], seed=1))
    began = time.monotonic()
    result = dg.materialize(
        [base, perm],
        resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
        selection=[perm.key],
        raise_on_error=False,
    )
    failure = result.failure_data_for_node("random_counts")
    after = lancedb.connect(uri).open_table("random_counts").list_versions()
    return {
        "workers_killed": len(workers),
        "processes": len(pids),
        "cpus_left": ray.cluster_resources().get("CPU", 0),
        "success": result.success,
        "seconds": round(time.monotonic() - began, 1),
        "error": failure.error.to_string()[-3000:] if failure and failure.error else "",
        "versions_unchanged": [v["version"] for v in after] == [v["version"] for v in before],
    }


def s3() -> dict[str, Any]:
    """`trivial`'s checks, then one random split + shuffle over moto's S3 by the local engine
    and by Ray; the Ray workers have credentials only from their environment. Reports whether
    the secret appears in the permutation table's metadata or in any of Ray's logs."""
    from pathlib import Path

    import dagster as dg

    from perm_assets import LanceDBIOManager, LanceDBResource, permutation_asset
    from perm_assets.tables import read_all

    out = trivial()
    bucket = os.environ["RAY_NETNS_S3_BUCKET"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    # No credentials in the storage options: the driver and the workers take them from their
    # environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    options = {
        "endpoint": os.environ["AWS_ENDPOINT_URL"],
        "region": os.environ["AWS_REGION"],
        "allow_http": "true",
    }
    spec = _cases()["random_shuffled"]
    hashes, metadata = {}, ""
    for engine in ("local", "ray"):
        uri = f"s3://{bucket}/{engine}"
        db = LanceDBResource(uri=uri, engine=engine, storage_options=options)
        resources = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}

        @dg.asset(name="base")
        def base() -> Any:
            return _rows(N)

        perm = permutation_asset("perm", source=base, **spec)
        result = dg.materialize([base, perm], resources=resources)
        assert result.success
        if engine == "ray":  # while the run's result (with the data's streams) is still kept
            out["objects_held_after_build"] = _objects_held()
        table = db.open_table("perm")
        rows = read_all(table)
        hashes[engine] = _digest(rows)
        metadata += str(table.schema.metadata)
    logs = Path(os.environ["RAY_NETNS_TEMP_DIR"]) / "session_latest" / "logs"
    leaked = [
        str(path.relative_to(logs))
        for path in logs.rglob("*")
        if path.is_file() and secret.encode() in path.read_bytes()
    ]
    out.update(
        same_rows=hashes["local"] == hashes["ray"],
        hash=hashes["ray"],
        secret_in_metadata=secret in metadata,
        secret_in_ray_logs=leaked,
        ray_log_files=sum(1 for path in logs.rglob("*") if path.is_file()),
    )
    # Last, as it leaves one worker node: the Ray-built "perm" above is the previous version.
    out["killed"] = _worker_killed_mid_build(bucket, options, previous=hashes["ray"])
    return out


def _objects_held() -> int:
    """Object refs this driver still holds (Ray's reference table): a finished build must hold
    none, or its blocks stay in the object stores and Ray rebuilds them when a node dies."""
    from ray._private import worker  # the reference table: no public API

    return len(cast(Any, worker).global_worker.core_worker.get_all_reference_counts())


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (exists and is not a zombie: in the harness's PID namespace the
    dead are reaped only when the cluster stops)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _node_processes(raylet_socket: str) -> list[int]:
    """A Ray node's processes: its raylet (found by the socket named on its command line) and
    every descendant (core workers, the agents)."""
    parents: dict[int, int] = {}
    raylets = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if args[0].endswith("/raylet") and f"--raylet_socket_name={raylet_socket}" in args:
            raylets.append(int(entry))
    found, frontier = list(raylets), list(raylets)
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _kill_a_busy_worker(ray: Any, started: threading.Event, report: dict[str, Any]) -> None:
    """Once ``started`` is set, wait until a worker node has a CPU in use (a task of the
    build runs there), then SIGKILL that node's processes and wait until they are dead."""
    from ray._private import state as ray_state  # per-node resources: no public API

    workers = {
        node["NodeID"]: node
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) > 0
    }
    started.wait()
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        free = ray_state.available_resources_per_node()
        busy = [
            node_id
            for node_id, node in workers.items()
            if free.get(node_id, {}).get("CPU", 0) < node["Resources"]["CPU"]
        ]
        if busy:
            pids = _node_processes(workers[busy[0]]["RayletSocketName"])
            report["node"] = busy[0]
            report["alive_when_killed"] = bool(pids) and all(_running(pid) for pid in pids)
            report["processes"] = len(pids)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            while any(_running(pid) for pid in pids):
                time.sleep(0.01)
            report["dead_at"] = time.monotonic()
            return
        time.sleep(0.01)


def _worker_killed_mid_build(bucket: str, options: dict[str, str], previous: str) -> dict:
    """The Ray-built "perm" (random_shuffled) is at version V; materialize it again with
    another seed and SIGKILL a worker node while the Ray build runs; then once more. Reports
    the outcome of the killed run, the table's versions and row hashes after each run, and the
    local engine's hash for the new spec."""
    import dagster as dg

    from perm_assets import LanceDBIOManager, LanceDBResource, RandomSplit, permutation_asset
    from perm_assets.tables import read_all

    spec = {
        **_cases()["random_shuffled"],
        "split": RandomSplit(ratios=[0.8, 0.1, 0.1], seed=8, split_names=["a", "b", "c"]),
    }

    def materialize(engine: Literal["local", "ray"]) -> dg.ExecuteInProcessResult:
        db = LanceDBResource(uri=f"s3://{bucket}/{engine}", engine=engine, storage_options=options)

        @dg.asset(name="base")
        def base() -> Any:
            return _rows(N)

        perm = permutation_asset("perm", source=base, **spec)
        resources = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}
        # The base as a source only (its table is at the same version as before).
        return dg.materialize(
            [base, perm], resources=resources, selection=[perm.key], raise_on_error=False
        )

    def state() -> dict[str, Any]:
        db = LanceDBResource(uri=f"s3://{bucket}/ray", storage_options=options)
        table = db.open_table("perm")
        versions = sorted(v["version"] for v in table.list_versions())
        return {"versions": versions, "latest": table.version, "hash": _digest(read_all(table))}

    assert materialize("local").success
    local_db = LanceDBResource(uri=f"s3://{bucket}/local", storage_options=options)
    report: dict[str, Any] = {"previous": state(), "previous_built": previous}
    report["expected_hash"] = _digest(read_all(local_db.open_table("perm")))

    ray = sys.modules["ray"]  # connected by the Ray build above
    started = threading.Event()
    killer = threading.Thread(target=_kill_a_busy_worker, args=(ray, started, report))
    killer.start()
    began = time.monotonic()
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    started.set()
    result = materialize("ray")
    ended = time.monotonic()
    killer.join()
    report["alive_at_start"] = report.get("node") in alive
    report["dead_before_end"] = began < report.get("dead_at", ended + 1) < ended
    report["seconds"] = round(ended - began, 1)
    report["killed_after"] = round(report.get("dead_at", ended) - began, 1)
    report["killed_run"] = {"success": result.success, **state()}
    if not result.success:
        failure = result.failure_data_for_node("perm")
        report["killed_run"]["error"] = str(
            failure.error.to_string() if failure and failure.error else ""
        )[-2000:]
    deadline, dead = time.monotonic() + 30.0, []
    while time.monotonic() < deadline:
        dead = [n for n in ray.nodes() if n["NodeID"] == report.get("node") and not n["Alive"]]
        if dead:
            break
        time.sleep(0.2)
    report["reported_dead"] = bool(dead)
    report["next_run"] = {"success": materialize("ray").success, **state()}
    return report


COMMANDS = {"trivial": trivial, "build": build, "s3": s3}

if __name__ == "__main__":
    from tests.ray_netns import dump_stacks_on_sigusr1

    dump_stacks_on_sigusr1()
    print(json.dumps(COMMANDS[sys.argv[1]]()), flush=True)  # noqa: T201 - the test reads it
