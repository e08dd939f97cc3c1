"""`permutation_asset` materialized for real: every split kind, twice, read back from LanceDB.

Each persisted permutation is compared with lancedb's own builder run on the same table with the
same arguments, so the asset is shown to delegate (not re-implement) and to lose nothing.
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
from lancedb.permutation import permutation_builder
from lancedb.table import Table

from perm_assets import (
    CalculatedSplit,
    HashSplit,
    LanceDBResource,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    Shuffle,
    permutation_asset,
)
from tests.conftest import Runner, make_rows, row_ids, table_asset

N = 1_000
SOURCE = table_asset("rows", N)


def _stored(db: LanceDBResource, name: str, version: int | None = None) -> pa.Table:
    return db.open_table(name, version=version).to_arrow()


def _lancedb_reference(table: Table, spec: PermutationSpec) -> pa.Table:
    """What lancedb's builder makes of ``spec`` when called by hand."""
    builder = permutation_builder(table)
    if spec.filter is not None:
        builder = builder.filter(spec.filter)
    split = spec.split
    if isinstance(split, RandomSplit):
        ratios, counts = split.builder_sizes()
        builder = builder.split_random(
            ratios=ratios, counts=counts, seed=split.seed, clump_size=split.clump_size
        )
    elif isinstance(split, SequentialSplit):
        ratios, counts = split.builder_sizes()
        builder = builder.split_sequential(ratios=ratios, counts=counts)
    elif isinstance(split, HashSplit):
        builder = builder.split_hash(
            split.columns, split.weights, discard_weight=split.discard_weight
        )
    elif isinstance(split, CalculatedSplit):
        builder = builder.split_calculated(split.expression)
    if spec.shuffle is not None:
        builder = builder.shuffle(seed=spec.shuffle.seed, clump_size=spec.shuffle.clump_size)
    return builder.execute().to_arrow()


SPECS: dict[str, dict[str, Any]] = {
    "filter_only": {"filter": "label != 3"},
    "random_ratios": {
        "split": RandomSplit(ratios=[0.7, 0.2, 0.1], seed=11, split_names=["tr", "va", "te"]),
        "shuffle": Shuffle(seed=5),
    },
    "random_counts": {"split": RandomSplit(counts=[300, 100], seed=2)},
    "random_fixed": {"split": RandomSplit(fixed=3, seed=4), "filter": "value > 10"},
    "random_clumped": {
        "split": RandomSplit(ratios=[0.5, 0.5], seed=9, clump_size=16),
        "shuffle": Shuffle(seed=9, clump_size=16),
    },
    "sequential": {"split": SequentialSplit(ratios=[0.75, 0.25], split_names=["old", "new"])},
    "hash": {"split": HashSplit(columns=["id"], weights=[8, 2], split_names=["train", "test"])},
    "hash_discard": {"split": HashSplit(columns=["id"], weights=[1, 1], discard_weight=2)},
    "calculated": {
        "split": CalculatedSplit(expression="id % 4", split_names=["a", "b", "c", "d"]),
        "filter": "label < 8",
    },
    "shuffle_only": {"shuffle": Shuffle(seed=3)},
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_persisted_permutation_equals_lancedbs_builder(
    case: str, run: Runner, db: LanceDBResource
) -> None:
    kwargs = SPECS[case]
    perm = permutation_asset("perm", source=SOURCE, **kwargs)
    run([SOURCE, perm])

    stored = _stored(db, "perm")
    spec = PermutationSpec.model_validate(kwargs)
    expected = _lancedb_reference(db.open_table("rows"), spec)
    assert stored.column("row_id").to_pylist() == expected.column("row_id").to_pylist()
    assert stored.column("split_id").to_pylist() == expected.column("split_id").to_pylist()

    meta = run.metadata("perm")
    names = spec.split_names()
    assert meta["perm_assets/split_names"] == ", ".join(names)
    counts = np.bincount(
        stored.column("split_id").to_numpy().astype(np.int64), minlength=len(names)
    )
    assert {n: meta[f"rows/{n}"] for n in names} == dict(zip(names, counts.tolist(), strict=True))
    assert meta["dagster/row_count"] == stored.num_rows
    assert meta["lance/base_table"] == "rows"
    assert meta["lance/base_version"] == db.open_table("rows").version
    assert meta["lance/version"] == db.open_table("perm").version
    assert meta["dagster/table_name"] == "perm"
    assert str(meta["dagster/uri"]).endswith("/perm.lance")


def test_every_filtered_row_is_kept_when_no_discard_is_asked(
    run: Runner, db: LanceDBResource
) -> None:
    # lancedb's own `fixed=3` would drop N mod 3 rows; the spec sends equal ratios instead.
    perm = permutation_asset("perm", source=SOURCE, split=RandomSplit(fixed=3, seed=1))
    run([SOURCE, perm])
    ids = [
        i
        for name in ("split_0", "split_1", "split_2")
        for i in db_view(db, "perm", name).to_pylist()
    ]
    assert sorted(ids) == list(range(N))
    sizes = sorted(run.metadata("perm")[f"rows/split_{i}"] for i in range(3))
    assert sizes[-1] - sizes[0] <= 1
    assert sum(sizes) == N


def test_filter_is_applied_before_splitting(run: Runner, db: LanceDBResource) -> None:
    perm = permutation_asset(
        "perm",
        source=SOURCE,
        filter="label IN (1, 2)",
        split=RandomSplit(ratios=[0.5, 0.5], seed=0, split_names=["a", "b"]),
    )
    run([SOURCE, perm])
    labels: list[int] = []
    for split in ("a", "b"):
        view = db_view(db, "perm", split)
        labels += view.to_pylist()
    assert sorted(labels) == sorted(x for x in range(N) if x % 10 in (1, 2))


def db_view(db: LanceDBResource, table: str, split: str) -> pa.ChunkedArray:
    """The ``id`` values of one split, read with lancedb's own Permutation."""
    from perm_assets.views import ViewRequest, open_view, read_arrow

    view = open_view(db, asset=table, table=table, version=None, request=ViewRequest(split=split))
    return read_arrow(view).column("id")


def test_rematerializing_writes_a_new_version_and_keeps_the_old_one(
    run: Runner, db: LanceDBResource
) -> None:
    perm = permutation_asset(
        "perm", source=SOURCE, split=RandomSplit(ratios=[0.5, 0.5], seed=1), shuffle=Shuffle(seed=1)
    )
    run([SOURCE, perm])
    first_version = run.metadata("perm")["lance/version"]
    first = _stored(db, "perm")

    run([SOURCE, perm], selection=[perm], run_config=_config("perm", seed=2, shuffle_seed=3))
    second_version = run.metadata("perm")["lance/version"]
    assert second_version == first_version + 1
    second = _stored(db, "perm")
    assert row_ids(second) != row_ids(first)
    assert sorted(row_ids(second)) == sorted(row_ids(first))  # same rows, new assignment/order
    # The old version is still there, byte for byte.
    assert _stored(db, "perm", first_version).equals(first)


def _config(asset: str, **values: Any) -> dict[str, Any]:
    return {"ops": {asset: {"config": values}}}


def test_same_spec_same_base_gives_the_same_data_version(run: Runner) -> None:
    perm = permutation_asset("perm", source=SOURCE, split=RandomSplit(ratios=[0.5, 0.5], seed=1))
    run([SOURCE, perm])
    first = run.data_version("perm")
    run([SOURCE, perm], selection=[perm])
    assert run.data_version("perm") == first
    assert first.startswith("rows@")

    run([SOURCE, perm], selection=[perm], run_config=_config("perm", seed=99))
    assert run.data_version("perm") != first
    # A new version of the base table changes it too.
    run([SOURCE, perm])
    assert run.data_version("perm").split("/")[0] != first.split("/")[0]


def test_unset_seed_is_drawn_and_recorded_so_the_run_can_be_reproduced(
    run: Runner, db: LanceDBResource
) -> None:
    perm = permutation_asset("perm", source=SOURCE, split=RandomSplit(ratios=[0.6, 0.4]))
    run([SOURCE, perm])
    recorded = run.metadata("perm")["perm_assets/spec"]
    seed = recorded["split"]["seed"]
    assert isinstance(seed, int)

    again = permutation_asset(
        "perm", source=SOURCE, split=RandomSplit(ratios=[0.6, 0.4], seed=seed)
    )
    first = _stored(db, "perm")
    run([SOURCE, again], selection=[again])
    assert (
        _stored(db, "perm")
        .select(["row_id", "split_id"])
        .equals(first.select(["row_id", "split_id"]))
    )


def test_launchpad_config_overrides_ratios_filter_and_seed(run: Runner) -> None:
    perm = permutation_asset(
        "perm",
        source=SOURCE,
        split=RandomSplit(ratios=[0.8, 0.2], seed=1, split_names=["train", "test"]),
        shuffle=Shuffle(seed=1),
    )
    run([SOURCE, perm])
    assert run.metadata("perm")["rows/train"] == 800

    run(
        [SOURCE, perm],
        selection=[perm],
        run_config=_config("perm", ratios=[0.5, 0.5], filter="label < 5", seed=7, shuffle_seed=8),
    )
    meta = run.metadata("perm")
    assert (meta["rows/train"], meta["rows/test"]) == (250, 250)
    spec = meta["perm_assets/spec"]
    assert spec["filter"] == "label < 5"
    assert spec["split"]["seed"] == 7
    assert spec["shuffle"]["seed"] == 8


def test_bad_launchpad_ratios_fail_the_run_and_keep_the_previous_version(
    run: Runner, db: LanceDBResource
) -> None:
    perm = permutation_asset("perm", source=SOURCE, split=RandomSplit(ratios=[0.8, 0.2], seed=1))
    run([SOURCE, perm])
    before = _stored(db, "perm")
    with pytest.raises(ValueError, match=r"asset 'perm'.*ratios \[0\.9, 0\.9\] sum to 1\.8"):
        run([SOURCE, perm], selection=[perm], run_config=_config("perm", ratios=[0.9, 0.9]))
    assert _stored(db, "perm").equals(before)


def _growing_hash_split(
    rows_per_run: int, columns: tuple[str, ...] = ("id",)
) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    """A source that appends ``rows_per_run`` new ids per run, and a 3:1 hash split of it."""
    state = {"start": 0}

    @dg.asset(name="growing", metadata={"write_mode": "append"})
    def growing() -> pa.Table:
        rows = make_rows(rows_per_run, start=state["start"])
        state["start"] += rows_per_run
        return rows

    perm = permutation_asset(
        "perm",
        source=growing,
        split=HashSplit(columns=list(columns), weights=[3, 1], split_names=["train", "test"]),
    )
    return growing, perm


def test_hash_split_keeps_rows_in_their_split_when_the_source_grows(
    run: Runner, db: LanceDBResource
) -> None:
    growing, perm = _growing_hash_split(500)
    run([growing, perm])
    before = _split_of_each_id(db)
    run([growing, perm])
    after = _split_of_each_id(db)
    assert len(before) == 500 and len(after) == 1000
    assert {i: after[i] for i in before} == before
    assert {"train", "test"} == set(after.values())


def _with_keys(db: LanceDBResource, version: int, columns: tuple[str, ...]) -> pa.Table:
    """``split_id`` and the key ``columns`` of every row of permutation ``perm`` at ``version``."""
    perm = db.open_table("perm", version=version).to_arrow()
    base = db.open_table("rows").search().with_row_id(True).to_arrow()
    joined = perm.join(base, keys="row_id", right_keys="_rowid")
    return joined.select(["split_id", *columns])


def _split_of_each_id(db: LanceDBResource) -> dict[int, str]:
    return {
        int(i): split for split in ("train", "test") for i in db_view(db, "perm", split).to_pylist()
    }


def test_raw_lancedb_builder_output_is_persisted_with_its_metadata(
    run: Runner, db: LanceDBResource
) -> None:
    @dg.asset(name="raw_perm", deps=[SOURCE])
    def raw_perm(lancedb: LanceDBResource) -> Table:
        table = lancedb.open_table("rows")
        return (
            permutation_builder(table)
            .split_random(ratios=[0.5, 0.5], seed=3, split_names=["x", "y"])
            .execute()
        )

    run([SOURCE, raw_perm])
    stored = _stored(db, "raw_perm")
    assert stored.schema.metadata is not None
    assert json.loads(stored.schema.metadata[b"split_names"]) == ["x", "y"]
    assert stored.schema.metadata[b"perm_assets.base_table"] == b"rows"
    meta = run.metadata("raw_perm")
    assert meta["rows/x"] + meta["rows/y"] == N
    assert sorted(
        db_view(db, "raw_perm", "x").to_pylist() + db_view(db, "raw_perm", "y").to_pylist()
    ) == list(range(N))


# One integer key takes the packed-sort path; strings and several columns group in Arrow.
HASH_KEYS = [("id",), ("name",), ("group", "id")]


@pytest.mark.parametrize("columns", HASH_KEYS)
def test_hash_split_check_reports_no_moved_rows_and_rows_added_per_split(
    run: Runner, db: LanceDBResource, columns: tuple[str, ...]
) -> None:
    growing, perm = _growing_hash_split(400, columns)
    first = run([growing, perm])
    check = {e.check_name: e for e in first.get_asset_check_evaluations()}
    stable = check["no_row_moved_between_splits"]
    assert stable.passed
    meta: dict[str, Any] = {k: v.value for k, v in stable.metadata.items()}
    assert meta["rows_added/train"] + meta["rows_added/test"] == 400

    db.connect().open_table("growing").optimize()  # compaction renumbers row ids
    second = run([growing, perm])
    check = {e.check_name: e for e in second.get_asset_check_evaluations()}
    meta: dict[str, Any] = {
        k: v.value for k, v in check["no_row_moved_between_splits"].metadata.items()
    }
    assert check["no_row_moved_between_splits"].passed
    assert meta["rows_moved_between_splits"] == 0
    assert meta["keys_compared"] == 400
    assert meta["rows_added/train"] + meta["rows_added/test"] == 400
    after = _split_of_each_id(db)
    added = [i for i in after if i >= 400]
    assert meta["rows_added/test"] == sum(1 for i in added if after[i] == "test")


@pytest.mark.parametrize("columns", HASH_KEYS)
def test_hash_stability_check_catches_a_changed_assignment(
    run: Runner, db: LanceDBResource, columns: tuple[str, ...]
) -> None:
    # Fault injection: new weights re-deal rows between splits; the blocking check must say so.
    first = permutation_asset(
        "perm",
        source=SOURCE,
        split=HashSplit(columns=list(columns), weights=[1, 1], split_names=["train", "test"]),
    )
    run([SOURCE, first])
    result = run(
        [SOURCE, first],
        selection=[first],
        run_config=_config("perm", weights=[1, 3]),
        raise_on_error=False,
    )
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}
    stable = check["no_row_moved_between_splits"]
    assert not stable.passed
    moved: Any = stable.metadata["rows_moved_between_splits"].value
    # Recount by hand from the two persisted versions: keys whose split changed.
    version = db.open_table("perm").version
    before, after = (
        {
            tuple(row[c] for c in columns): row["split_id"]
            for row in _with_keys(db, v, columns).to_pylist()
        }
        for v in (version - 1, version)
    )
    assert moved == sum(1 for key, split in after.items() if before[key] != split) > 0
    assert stable.metadata["keys_compared"].value == len(after) == len(before)


def test_retry_policy_op_tags_and_pool_reach_the_step_and_a_retry_writes_one_version(
    run: Runner, db: LanceDBResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perm_assets import build, factories
    from perm_assets.specs import KFold

    # The lancedb engine's build (engine="auto" below its threshold), as the engines call it.
    real_build = build.build_permutation
    attempts: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:  # a transient object-store error on the first attempt
            raise OSError("connection reset by peer")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(build, "build_permutation", flaky)
    perm = permutation_asset(
        "perm",
        source=SOURCE,
        split=RandomSplit(ratios=[0.5, 0.5], seed=1),
        retry_policy=dg.RetryPolicy(max_retries=1),
        op_tags={"team": "ml"},
        pool="lance_builds",
    )
    folds = factories.folds_asset(
        "folds", source=SOURCE, folds=KFold(k=3, seed=0), op_tags={"team": "ml"}, pool="cv"
    )
    assert (perm.op.retry_policy, perm.op.tags["team"], perm.op.pool) == (
        dg.RetryPolicy(max_retries=1),
        "ml",
        "lance_builds",
    )
    assert (folds.op.tags["team"], folds.op.pool, folds.op.retry_policy) == ("ml", "cv", None)
    run([SOURCE])
    result = run([SOURCE, perm], selection=[perm])
    assert result.success and attempts == [1, 2]
    retried = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert len(retried) == 1
    # The failed attempt wrote nothing: one version, holding every row once.
    assert len(db.open_table("perm").list_versions()) == 1
    assert run.metadata("perm")["lance/version"] == db.open_table("perm").version
    ids = _stored(db, "perm").column("row_id").to_pylist()
    assert len(ids) == len(set(ids)) == N


@pytest.mark.parametrize("columns", HASH_KEYS)
def test_hash_stability_compares_every_key_when_the_number_of_splits_changes(
    run: Runner, columns: tuple[str, ...]
) -> None:
    # Split ids 0..2 of the previous version against 0..1 now: no id may spill into its key.
    perm = permutation_asset(
        "perm", source=SOURCE, split=HashSplit(columns=list(columns), weights=[1, 1, 1])
    )
    run([SOURCE, perm])
    result = run(
        [SOURCE, perm],
        selection=[perm],
        run_config=_config("perm", weights=[1, 1]),
        raise_on_error=False,
    )
    stable = {e.check_name: e for e in result.get_asset_check_evaluations()}[
        "no_row_moved_between_splits"
    ]
    assert not stable.passed
    assert stable.metadata["keys_compared"].value == N
