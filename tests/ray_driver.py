"""Driver scripts for tests/test_ray_engine.py, run on a namespaced Ray cluster by
`tests.ray_netns.run_on_ray`: ``python tests/ray_driver.py <command> [args]``; the last stdout
line is a JSON summary the test asserts on."""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any


def trivial() -> dict[str, Any]:
    """Where tasks run and what they see: the harness's own check."""
    from tests.ray_netns import connect

    ray = connect()

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def where() -> tuple[str, bool]:
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
    return pa.table({"id": ids, "label": (ids * 7919 % 37).astype(np.int32)})


def _cases() -> dict[str, dict[str, Any]]:
    from perm_assets import RandomSplit, Shuffle

    return {
        "no_split_shuffled": {"filter": "id % 3 = 0", "shuffle": Shuffle(seed=4)},
        "random_shuffled": {
            "filter": "label < 30",
            "split": RandomSplit(ratios=[0.8, 0.1, 0.1], seed=7, split_names=["a", "b", "c"]),
            "shuffle": Shuffle(seed=1),
        },
        "random_counts": {"split": RandomSplit(counts=[1000, 333], seed=3)},
        "random_fixed_unshuffled": {"split": RandomSplit(fixed=3, seed=5)},
    }


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

    from perm_assets import LanceDBIOManager, LanceDBResource, permutation_asset
    from perm_assets.tables import read_all
    from perm_assets.views import ViewRequest, open_view, read_arrow

    connect_ray = os.environ.get("RAY_ADDRESS")
    root = sys.argv[2]
    cases = {name: spec for name, spec in _cases().items() if name in sys.argv[3].split(",")}
    out: dict[str, Any] = {"hashes": {}, "versions": {}, "view_ok": {}}
    for engine in ("local", "ray"):
        uri = f"{root}/{engine}"
        db = LanceDBResource(
            uri=uri, engine=engine, ray_address=connect_ray, spill_dir=f"{root}/spill"
        )
        resources = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}

        @dg.asset(name="base")
        def base() -> Any:
            return _rows(N)

        perms = [permutation_asset(name, source=base, **spec) for name, spec in cases.items()]
        with dg.DagsterInstance.ephemeral() as instance:
            result = dg.materialize([base, *perms], resources=resources, instance=instance)
            assert result.success
            for name in cases:
                event = instance.get_latest_materialization_event(dg.AssetKey(name))
                assert event is not None and event.asset_materialization is not None
                tags = event.asset_materialization.tags or {}
                out["versions"][f"{engine}/{name}"] = tags["dagster/data_version"]
        conn = lancedb.connect(uri)
        for name in cases:
            table = read_all(conn.open_table(name))
            row_ids = table.column("row_id").to_numpy()
            out["hashes"][f"{engine}/{name}"] = _digest(table)
            if engine != "ray":
                continue
            # The base rows each row id addresses: the base is one fragment (0) holding ids
            # 0..N-1 at offsets 0..N-1. The filters make the selected rows sparse, so row ids
            # that were positions among the selected rows would read other rows.
            fragment, offset = row_ids >> np.uint64(32), row_ids & np.uint64(0xFFFFFFFF)
            expected = offset.astype(np.int64)
            split_ids = table.column("split_id").to_numpy()
            names = json.loads(table.schema.metadata[b"split_names"])
            ok = bool((fragment == 0).all())
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
    return out


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
        assert dg.materialize([base, perm], resources=resources).success
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
    return out


COMMANDS = {"trivial": trivial, "build": build, "s3": s3}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]]()), flush=True)  # noqa: T201 - the test reads it
