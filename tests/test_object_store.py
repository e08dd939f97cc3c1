"""LanceDB tables on an S3-compatible object store that this suite starts itself.

The server is moto's standalone server (``moto[server]``, tests/servers.py) on 127.0.0.1, with
IAM authentication on. Why moto: it is the S3-compatible server installable here (no MinIO
package), and it honours ``If-None-Match: *`` on PUT, the conditional write Lance's commits rely
on on S3. The first tests check exactly that, down to the requests Lance sends, before anything
else trusts it.

Credentials reach the resource as ``dg.EnvVar`` storage options; the server rejects any other
key, so every test here that writes or reads through Dagster also shows the env vars resolved.
The local-table tests for outputs, permutations, views, pinning, reproduction and retention are
collected again at the bottom of this module, where the `db` and `resources` fixtures below put
them on S3.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import dagster as dg
import lancedb
import pyarrow as pa
import pytest
from torch.utils.data import DataLoader, Dataset

from perm_assets import (
    LanceDBIOManager,
    LanceDBResource,
    PermutationSpec,
    RandomSplit,
    Shuffle,
    permutation_asset,
)
from perm_assets.tables import WriteMode, write_table
from perm_assets.training import BatchLoader
from perm_assets.views import ViewRequest, open_view, read_arrow
from tests import test_io_manager as local_io
from tests import test_lineage as local_lineage
from tests import test_permutation_asset as local_permutations
from tests.conftest import Runner, make_rows, row_ids, table_asset
from tests.servers import S3Server, moto_s3_server

ROOT = Path(__file__).resolve().parent.parent

# Where the credentials come from: the environment of whichever process runs the asset.
ENV = {
    "endpoint": "PERM_ASSETS_S3_ENDPOINT",
    "region": "PERM_ASSETS_S3_REGION",
    "aws_access_key_id": "PERM_ASSETS_S3_ACCESS_KEY_ID",
    "aws_secret_access_key": "PERM_ASSETS_S3_SECRET_ACCESS_KEY",
}


def env_storage_options() -> dict[str, str]:
    """Storage options as docs/deployment.md recommends: ``dg.EnvVar`` values, plus allow_http."""
    return {**{option: dg.EnvVar(var) for option, var in ENV.items()}, "allow_http": "true"}


def server_env(server: S3Server) -> dict[str, str]:
    """The env vars `env_storage_options` reads, with this server's values."""
    values = server.storage_options()
    return {var: values[option] for option, var in ENV.items()}


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_uri(s3: S3Server) -> str:
    """A fresh database prefix in the shared bucket for each test."""
    return f"s3://{s3.bucket}/{uuid.uuid4().hex}"


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the variables `env_storage_options` names, for this test only."""
    env = server_env(s3)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return env


@pytest.fixture
def resources(s3_uri: str, s3_env: dict[str, str]) -> dict[str, Any]:
    """What Dagster gets: the S3 database with ``dg.EnvVar`` credentials (overrides conftest)."""
    lancedb_resource = LanceDBResource(uri=s3_uri, storage_options=env_storage_options())
    return {"lancedb": lancedb_resource, "io_manager": LanceDBIOManager(db=lancedb_resource)}


@pytest.fixture
def db(resources: dict[str, Any]) -> LanceDBResource:
    """The same database for the test's own reads (overrides conftest).

    Outside a run a ``dg.EnvVar`` field still holds the variable's *name*;
    ``process_config_and_initialize`` resolves it as Dagster does at run start.
    """
    resource = resources["lancedb"]
    assert isinstance(resource, LanceDBResource)
    return resource.process_config_and_initialize()


# --------------------------------------------------------- is the server safe for Lance commits?


def test_server_refuses_a_create_only_put_over_an_existing_object(s3: S3Server) -> None:
    client = s3.client()
    key = f"{uuid.uuid4().hex}/_versions/1.manifest"
    client.put_object(Bucket=s3.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError) as refused:
        client.put_object(Bucket=s3.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert body == b"first"


def test_lance_commits_each_version_with_a_create_only_put(s3: S3Server, s3_uri: str) -> None:
    connection = lancedb.connect(s3_uri, storage_options=s3.storage_options())
    with s3.recorded_requests() as requests:
        connection.create_table("t", pa.table({"a": [1]}))
        connection.create_table("t", pa.table({"a": [2]}), mode="overwrite")
    manifests = [r for r in requests if r["method"] == "PUT" and "/t.lance/_versions/" in r["url"]]
    assert len(manifests) == 2, [r["url"] for r in requests]
    assert all(r["headers"].get("if-none-match") == "*" for r in manifests)


def test_an_overwrite_from_a_stale_handle_is_a_retryable_conflict(
    s3: S3Server, s3_uri: str
) -> None:
    connection = lancedb.connect(s3_uri, storage_options=s3.storage_options())
    connection.create_table("t", pa.table({"a": [0]}))
    first, second = connection.open_table("t"), connection.open_table("t")
    first.add(pa.table({"a": [1]}), mode="overwrite")
    with pytest.raises(RuntimeError, match="Retryable commit conflict"):
        second.add(pa.table({"a": [2]}), mode="overwrite")
    assert connection.open_table("t").to_arrow().column("a").to_pylist() == [1]


def test_racing_overwrites_each_commit_their_own_version_or_conflict(
    s3: S3Server, s3_uri: str
) -> None:
    """Six writers on their own connections overwrite one table at once, six times each.

    A lost write would be a writer told "committed version v" while v holds another's rows.
    """
    writers, rounds = 6, 6
    lancedb.connect(s3_uri, storage_options=s3.storage_options()).create_table(
        "t", pa.table({"w": [-1] * 10})
    )
    start = threading.Barrier(writers, timeout=30)
    committed: list[tuple[int, int]] = []
    conflicts: list[str] = []

    def write(writer: int) -> None:
        connection = lancedb.connect(s3_uri, storage_options=s3.storage_options())
        start.wait()
        for i in range(rounds):
            payload = writer * 100 + i
            try:
                table = connection.create_table(
                    "t", pa.table({"w": [payload] * 10}), mode="overwrite"
                )
            except RuntimeError as exc:
                conflicts.append(str(exc))
            else:
                committed.append((payload, table.version))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "writers still running after 60 s"
    assert len(committed) + len(conflicts) == writers * rounds
    assert all("Retryable commit conflict" in message for message in conflicts), conflicts[:3]
    versions = [version for _, version in committed]
    assert len(set(versions)) == len(versions), "two writers were told the same version"
    table = lancedb.connect(s3_uri, storage_options=s3.storage_options()).open_table("t")
    for payload, version in committed:
        table.checkout(version)
        assert set(table.to_arrow().column("w").to_pylist()) == {payload}


def test_first_writes_of_a_new_table_racing_on_s3_both_commit(s3: S3Server, s3_uri: str) -> None:
    """Two writers create the same new table at once, ten times over.

    On S3 a raw lancedb 0.40 ``create_table(mode="overwrite")`` panics for the loser of this race
    ("rust future panicked", listing.rs "unreachable"); a local directory does not. `write_table`
    must make it a retry, like any other commit conflict, so both writes commit.
    """
    committed: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []
    for round_ in range(10):
        name = f"t{round_}"
        start = threading.Barrier(2, timeout=30)

        def write(writer: int, name: str = name, start: threading.Barrier = start) -> None:
            connection = lancedb.connect(s3_uri, storage_options=s3.storage_options())
            start.wait()
            try:
                table = write_table(
                    connection, name, pa.table({"w": [writer] * 10}), WriteMode.OVERWRITE
                )
            except Exception as exc:
                errors.append(exc)
            else:
                committed.append((name, writer, table.version))

        threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), f"round {round_} hung"
    assert not errors, [str(e).splitlines()[0] for e in errors]
    connection = lancedb.connect(s3_uri, storage_options=s3.storage_options())
    for name, writer, version in committed:
        table = connection.open_table(name)
        table.checkout(version)
        assert set(table.to_arrow().column("w").to_pylist()) == {writer}


def test_table_exists_does_not_report_a_refused_request_as_a_missing_table(
    s3: S3Server, s3_uri: str, db: LanceDBResource
) -> None:
    db.connect().create_table("rows", make_rows(5))
    wrong = LanceDBResource(
        uri=s3_uri, storage_options={**s3.storage_options(), "aws_secret_access_key": "wrong"}
    )
    # A refused request must not read as "no such table" (the refresh demo counts on it).
    with pytest.raises(ValueError, match="SignatureDoesNotMatch"):
        wrong.table_exists("rows")


# ------------------------------------------------------------------ credentials from dg.EnvVar


def test_env_var_storage_options_resolve_inside_runs(
    run: Runner, resources: dict[str, Any], s3: S3Server, s3_uri: str
) -> None:
    seen: dict[str, dict[str, str]] = {}

    @dg.asset(name="rows")
    def rows(lancedb: LanceDBResource) -> pa.Table:
        seen["resource"] = dict(lancedb.storage_options)
        return make_rows(10)

    @dg.asset(deps=[rows], required_resource_keys={"io_manager"})
    def peek(context) -> None:  # no annotation: this module's annotations are strings
        io_manager = context.resources.io_manager
        assert isinstance(io_manager, LanceDBIOManager)
        seen["io_manager"] = dict(io_manager.db.storage_options)

    run([rows, peek])
    assert seen["resource"] == seen["io_manager"] == s3.storage_options()
    # Outside a run the fields still hold the variables' names...
    unresolved = resources["lancedb"]
    assert dict(unresolved.storage_options) == {**ENV, "allow_http": "true"}
    # ...which the server refuses as credentials: a run that got through had resolved them.
    names_as_keys = {
        **s3.storage_options(),
        "aws_access_key_id": ENV["aws_access_key_id"],
        "aws_secret_access_key": ENV["aws_secret_access_key"],
    }
    with pytest.raises(ValueError, match=r"403.*InvalidAccessKeyId"):
        lancedb.connect(s3_uri, storage_options=names_as_keys).open_table("rows")


def test_env_var_storage_options_resolve_outside_runs_too(
    run: Runner, s3_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dg.asset(name="rows")
    def rows() -> pa.Table:
        return make_rows(10)

    run([rows])
    # Built and used directly, as in a notebook: no run ever resolves the fields.
    direct = LanceDBResource(uri=s3_uri, storage_options=env_storage_options())
    assert dict(direct.storage_options) == {**ENV, "allow_http": "true"}
    assert direct.open_table("rows").count_rows() == 10
    monkeypatch.delenv(ENV["aws_secret_access_key"])
    with pytest.raises(
        ValueError, match=rf"'aws_secret_access_key'.*'{ENV['aws_secret_access_key']}'.*not set"
    ):
        direct.open_table("rows")


def test_table_asset_lives_in_the_bucket_at_its_recorded_versions(
    run: Runner, db: LanceDBResource, s3: S3Server, s3_uri: str
) -> None:
    sizes = iter([100, 40])

    @dg.asset(name="rows")
    def rows() -> pa.Table:
        return make_rows(next(sizes))

    run([rows])
    first = run.metadata("rows")
    run([rows])
    second = run.metadata("rows")
    assert second["dagster/uri"] == f"{s3_uri}/rows.lance"
    assert db.open_table("rows", version=first["lance/version"]).to_arrow().equals(make_rows(100))
    assert db.open_table("rows", version=second["lance/version"]).to_arrow().equals(make_rows(40))
    prefix = s3_uri.removeprefix(f"s3://{s3.bucket}/") + "/rows.lance/_versions/"
    listing = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    assert len(listing.get("Contents", [])) == second["lance/version"]


def _materialize_splits(run: Runner) -> None:
    """Table asset ``rows`` (3,000 rows) and permutation ``splits`` (80/20 train/test,
    shuffled), materialized in the bucket."""
    source = table_asset("rows", 3_000)
    splits = permutation_asset(
        "splits",
        source=source,
        split=RandomSplit(ratios=[0.8, 0.2], seed=0, split_names=["train", "test"]),
        shuffle=Shuffle(seed=0),
    )
    run([source, splits])


def test_a_cached_view_reads_the_base_table_once_then_makes_no_data_requests(
    run: Runner, db: LanceDBResource, s3: S3Server, s3_uri: str, tmp_path: Path
) -> None:
    """Without the cache every shuffled pass GETs the base table's data files again; with it,
    one sequential fetch, then passes read only the permutation table's row ids."""
    _materialize_splits(run)
    cached_db = db.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    data = s3_uri.removeprefix(f"s3://{s3.bucket}/") + "/rows.lance/data/"

    def read(cache: bool) -> tuple[list[int], int]:
        with s3.recorded_requests() as requests:
            view = open_view(
                cached_db,
                asset="splits",
                table="splits",
                version=None,
                request=ViewRequest(split="train", columns=["id"], format="arrow", cache=cache),
            )
            ids = [i for b in BatchLoader(view, batch_size=100) for i in b.column("id").to_pylist()]
        return ids, sum(1 for r in requests if r["method"] == "GET" and data in r["url"])

    plain, plain_gets = read(cache=False)
    first, fetch_gets = read(cache=True)  # fetches the column once
    again, cached_gets = read(cache=True)
    assert first == plain and again == plain and len(plain) == 2_400
    assert plain_gets > 0 and fetch_gets > 0
    assert cached_gets == 0


def _forked_pass(view: Any, out: Any) -> None:
    """A forked child's whole pass over ``view`` (lancedb's reads there go through the helper)."""
    reader_pid = None
    ids: list[int] = []
    for batch in view.iter(100):
        ids.extend(batch.column("id").to_pylist())
        reader_pid = view.reader._process.pid
    maps = Path(f"/proc/{reader_pid}/maps").read_text()
    out.put((ids, "_lancedb.abi3.so" in maps))


@pytest.mark.filterwarnings("ignore:lancedb fork support is experimental:RuntimeWarning")
def test_forked_workers_read_the_bucket_through_the_lean_helper(
    run: Runner, db: LanceDBResource, s3: S3Server
) -> None:
    """A forked DataLoader worker's helper opens the tables in the bucket with pylance (the
    parent's storage options) and reads the parent's rows, by position and in passes."""
    _materialize_splits(run)
    view = open_view(
        db,
        asset="splits",
        table="splits",
        version=None,
        request=ViewRequest(split="train", columns=["id"], format="arrow"),
    )
    expected = read_arrow(view).column("id").to_pylist()
    assert len(expected) == 2_400

    loader = DataLoader(
        cast(Dataset[Any], view),
        batch_size=500,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=lambda batch: batch,
    )
    by_position = [i for batch in loader for i in batch.column("id").to_pylist()]
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_forked_pass, args=(view, out))
    child.start()
    in_passes, helper_has_lancedb = out.get(timeout=120)
    child.join(timeout=60)

    assert by_position == expected
    assert in_passes == expected
    assert child.exitcode == 0 and not helper_has_lancedb


# ------------------------------------------------------- two processes, one permutation asset

CONCURRENT_ROWS = 2_000
CONCURRENT_SOURCE = table_asset("rows", CONCURRENT_ROWS)
CONCURRENT_SPLITS = permutation_asset(
    "splits",
    source=CONCURRENT_SOURCE,
    split=RandomSplit(ratios=[0.8, 0.2], seed=0, split_names=["train", "test"]),
    shuffle=Shuffle(seed=0),
)


def materialize_splits(dagster_home: str, uri: str, seeds: str, ready: str, gate: str) -> None:
    """Entry point of each competing process (see the test below).

    Once imported, creates ``ready`` and waits for ``gate``, then materializes ``splits`` once
    per comma-separated seed on the shared on-disk instance and prints one JSON line per run:
    seed, success, the Lance version recorded or the error.
    """
    lancedb_resource = LanceDBResource(uri=uri, storage_options=env_storage_options())
    resources = {"lancedb": lancedb_resource, "io_manager": LanceDBIOManager(db=lancedb_resource)}
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        Path(ready).touch()
        _wait_for(Path(gate), timeout=60)
        for seed in (int(s) for s in seeds.split(",")):
            started = time.monotonic()
            result = dg.materialize(
                [CONCURRENT_SOURCE, CONCURRENT_SPLITS],
                selection=[CONCURRENT_SPLITS],
                resources=resources,
                instance=instance,
                run_config={"ops": {"splits": {"config": {"seed": seed, "shuffle_seed": seed}}}},
                raise_on_error=False,
            )
            outcome: dict[str, Any] = {
                "seed": seed,
                "success": result.success,
                "seconds": round(time.monotonic() - started, 2),
            }
            if result.success:
                (mat,) = result.asset_materializations_for_node("splits")
                outcome["version"] = mat.metadata["lance/version"].value
            else:
                outcome["error"] = "; ".join(
                    e.step_failure_data.error.to_string()
                    for e in result.get_step_failure_events()
                    if e.step_failure_data.error is not None
                )
            print(json.dumps(outcome), flush=True)  # noqa: T201 - the parent reads it


def _wait_for(path: Path, *, timeout: float, process: subprocess.Popen[str] | None = None) -> None:
    """Wait until ``path`` exists, failing on timeout or when ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            _, stderr = process.communicate()
            raise RuntimeError(f"process exited ({process.returncode}):\n{stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.01)


def _expected_splits(db: LanceDBResource, base_version: int, seed: int) -> pa.Table:
    spec = PermutationSpec.model_validate(
        {
            "split": RandomSplit(ratios=[0.8, 0.2], seed=seed, split_names=["train", "test"]),
            "shuffle": Shuffle(seed=seed),
        }
    )
    base = db.open_table("rows", version=base_version)
    return local_permutations._lancedb_reference(base, spec)


@pytest.mark.slow
def test_two_processes_materializing_one_permutation_never_mix_or_lose_versions(
    tmp_path: Path,
    s3_uri: str,
    s3_env: dict[str, str],
    resources: dict[str, Any],
    db: LanceDBResource,
) -> None:
    home = tmp_path / "dagster_home"  # the single-machine SQLite instance, shared by both
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.sqlite.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        Runner(resources, instance)([CONCURRENT_SOURCE])
        base_version = Runner(resources, instance).metadata("rows")["lance/version"]

    gate = tmp_path / "go"
    seeds = {"a": [11, 12], "b": [21, 22]}
    ready = {name: tmp_path / f"ready_{name}" for name in seeds}
    code = (
        "import sys; from tests.test_object_store import materialize_splits; "
        "materialize_splits(*sys.argv[1:])"
    )
    processes = {
        name: subprocess.Popen(
            [
                *(sys.executable, "-c", code, str(home), s3_uri),
                *(",".join(map(str, s)), str(ready[name]), str(gate)),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **s3_env},  # credentials only through the environment
        )
        for name, s in seeds.items()
    }
    outputs: dict[str, tuple[str, str, int]] = {}
    try:
        for name, path in ready.items():  # both imported and set up: start them together
            _wait_for(path, timeout=90, process=processes[name])
        gate.touch()
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=120)
            outputs[name] = (stdout, stderr, process.returncode)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    runs: list[dict[str, Any]] = []
    for name, (stdout, stderr, code_) in outputs.items():
        assert code_ == 0, f"process {name} crashed (exit {code_}):\n{stderr[-3000:]}"
        runs += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(runs) == 4
    failed = [r for r in runs if not r["success"]]
    # A run that loses every retry fails cleanly, on the commit conflict, writing nothing.
    unclean = [r["error"] for r in failed if "commit conflict" not in r["error"].lower()]
    assert not unclean, "\n\n".join(unclean)
    succeeded = [r for r in runs if r["success"]]
    assert succeeded, "no run succeeded"
    versions = [r["version"] for r in succeeded]
    assert len(set(versions)) == len(versions)
    # Each recorded version holds exactly its own run's permutation: nothing mixed or lost.
    for r in succeeded:
        stored = db.open_table("splits", version=r["version"]).to_arrow()
        expected = _expected_splits(db, base_version, r["seed"])
        assert row_ids(stored) == row_ids(expected), f"version {r['version']} (seed {r['seed']})"
        assert stored.column("split_id").equals(expected.column("split_id"))

    # Dagster's latest materialization names one of those versions, and it reads back whole.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        latest = Runner(resources, instance).metadata("splits")
    assert latest["lance/version"] in versions
    assert db.open_table("splits").version in versions  # no failed write became a version
    views = {
        split: read_arrow(
            open_view(
                db,
                asset="splits",
                table="splits",
                version=latest["lance/version"],
                request=ViewRequest(split=split, columns=["id"]),
            )
        )
        for split in ("train", "test")
    }
    ids = views["train"].column("id").to_pylist() + views["test"].column("id").to_pylist()
    assert sorted(ids) == list(range(CONCURRENT_ROWS))


# ------------------------------------- the local-table tests, collected again here, on S3
# Same functions, this module's `db`/`resources` fixtures: outputs, permutations vs lancedb's
# builder (random split + shuffle among them), reproduction from a recorded seed and of a past
# training view, views of a split with columns, pinning against tables changed behind Dagster's
# back, Lance tags (pins) and retention on the object store.

test_table_output_overwrites_as_a_new_version_each_time = (
    local_io.test_table_output_overwrites_as_a_new_version_each_time
)
test_permutation_input_is_a_pinned_view_of_the_split = (
    local_io.test_permutation_input_is_a_pinned_view_of_the_split
)
test_view_stays_pinned_when_the_tables_move_on_outside_dagster = (
    local_io.test_view_stays_pinned_when_the_tables_move_on_outside_dagster
)
test_dict_input_gives_one_view_per_split = local_io.test_dict_input_gives_one_view_per_split
test_persisted_permutation_equals_lancedbs_builder = (
    local_permutations.test_persisted_permutation_equals_lancedbs_builder
)
test_rematerializing_writes_a_new_version_and_keeps_the_old_one = (
    local_permutations.test_rematerializing_writes_a_new_version_and_keeps_the_old_one
)
test_unset_seed_is_drawn_and_recorded_so_the_run_can_be_reproduced = (
    local_permutations.test_unset_seed_is_drawn_and_recorded_so_the_run_can_be_reproduced
)
test_a_past_training_view_is_reproduced_after_refresh_and_resplit = (
    local_lineage.test_a_past_training_view_is_reproduced_after_refresh_and_resplit
)
test_a_recreated_base_table_fails_instead_of_returning_other_rows = (
    local_lineage.test_a_recreated_base_table_fails_instead_of_returning_other_rows
)
test_pins_survive_cleanup_and_retain_retires_the_unneeded_ones = (
    local_lineage.test_pins_survive_cleanup_and_retain_retires_the_unneeded_ones
)
