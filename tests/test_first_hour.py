"""What a new user meets in the first hour: exact batch sizes, batch shapes, mistakes caught when
the definitions load, and lineage that stays on the consumer's run."""

from __future__ import annotations

import json
from typing import Any, cast

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import torch
from lancedb.permutation import Permutation

from perm_assets import (
    KFold,
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    Shuffle,
    SpecError,
    ViewRequest,
    check_definitions,
    folds_asset,
    open_view,
    permutation_asset,
)
from perm_assets.training import BatchLoader, shard
from perm_assets.views import read_arrow
from tests.conftest import Runner, make_rows, table_asset

N = 5_003
SOURCE = table_asset("rows", N)
SPLITS = permutation_asset(
    "splits",
    source=SOURCE,
    split=RandomSplit(ratios=[0.7, 0.2, 0.1], seed=3, split_names=["train", "val", "test"]),
    shuffle=Shuffle(seed=4),
)
FOLDS = folds_asset("folds", source=SOURCE, folds=KFold(k=3, seed=5), shuffle=Shuffle(seed=6))


def _ids(batches: list[Any]) -> list[int]:
    return [int(i) for b in batches for i in b["id"]]


@pytest.mark.parametrize("batch_size", [97, 1000, 1024])
def test_every_batch_but_the_last_has_the_size_asked_for(
    run: Runner, db: LanceDBResource, batch_size: int
) -> None:
    """lancedb's own iter gives 205 then 793 rows on a split that does not start on the grid."""
    run([SOURCE, SPLITS, FOLDS])
    views = {
        split: open_view(
            db,
            asset="splits",
            table="splits",
            version=None,
            request=ViewRequest(split=split, columns=["id"], format="numpy_dict"),
        )
        for split in ("train", "val", "test")
    }
    for role in ("train", "validation"):
        for fold in range(3):
            views[f"fold_{fold}/{role}"] = open_view(
                db,
                asset="folds",
                table="folds",
                version=None,
                request=ViewRequest(split=role, fold=fold, columns=["id"], format="numpy_dict"),
            )
    for name, view in views.items():
        expected = read_arrow(view).column("id").to_pylist()  # one read: no re-slicing
        batches = list(view.iter(batch_size))
        sizes = [len(b["id"]) for b in batches]
        assert sizes[:-1] == [batch_size] * (len(sizes) - 1), name
        assert 0 < sizes[-1] <= batch_size, name
        assert _ids(batches) == expected, name
        # Plain iteration uses the view's batch size, also exact.
        sized = list(view.with_batch_size(batch_size))
        assert [len(b["id"]) for b in sized] == sizes, name
        dropped = list(view.iter(batch_size, skip_last_batch=True))
        assert all(len(b["id"]) == batch_size for b in dropped), name
        assert len(dropped) == len(expected) // batch_size, name
        # A rank's shard through the read-ahead loader: exact too.
        for rank in range(2):
            part = shard(view, rank=rank, world_size=2, seed=1, epoch=0)
            loaded = list(BatchLoader(part, batch_size, io_bytes=batch_size * 9 + 5))
            shard_sizes = [len(b["id"]) for b in loaded]
            assert shard_sizes[:-1] == [batch_size] * (len(shard_sizes) - 1), (name, rank)
            assert sum(shard_sizes) == len(part), (name, rank)


def test_batch_size_from_input_metadata_holds_on_every_split(run: Runner) -> None:
    seen: dict[str, list[int]] = {}

    @dg.asset(
        ins={
            "splits": dg.AssetIn(
                key=SPLITS.key,
                metadata={"split": ["train", "val", "test"], "batch_size": 1024, "format": "arrow"},
            )
        }
    )
    def trainer(splits: dict[str, Permutation]) -> None:
        for name, view in splits.items():
            seen[name] = [cast(pa.RecordBatch, batch).num_rows for batch in view]

    run([SOURCE, SPLITS, trainer])
    for name, sizes in seen.items():
        assert sizes[:-1] == [1024] * (len(sizes) - 1), name
    assert sum(sum(s) for s in seen.values()) == N


def test_dict_formats_give_one_named_array_or_tensor_per_column(
    run: Runner, db: LanceDBResource
) -> None:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(300 * 4, dtype=np.float32)), 4)
    table = make_rows(300).append_column("vec", vectors)

    @dg.asset(name="wide")
    def wide() -> pa.Table:
        return table

    perm = permutation_asset("wide_perm", source=wide, shuffle=Shuffle(seed=1))
    run([wide, perm])
    columns = ["id", "value", "vec"]

    def view(fmt: str) -> Permutation:
        request = ViewRequest(columns=columns, format=fmt)  # type: ignore[arg-type]
        return open_view(db, asset="wide_perm", table="wide_perm", version=None, request=request)

    arrow = read_arrow(view("arrow"))
    arrays = next(iter(view("numpy_dict").iter(64)))
    assert set(arrays) == set(columns)
    assert arrays["id"].shape == (64,) and arrays["vec"].shape == (64, 4)
    np.testing.assert_array_equal(arrays["id"], arrow.column("id").to_numpy()[:64])
    np.testing.assert_array_equal(
        arrays["vec"], np.stack(arrow.column("vec").to_pylist()[:64]).astype(np.float32)
    )
    # The second batch is a slice at an offset: values must come from the right rows.
    tensors = list(view("torch_dict").iter(64))
    second = tensors[1]
    assert second["vec"].shape == (64, 4) and second["vec"].dtype == torch.float32
    assert second["id"].tolist() == arrow.column("id").to_pylist()[64:128]
    assert second["vec"].tolist() == arrow.column("vec").to_pylist()[64:128]
    # A string column has no tensor form: the error names it and the formats that fit.
    named = open_view(
        db,
        asset="wide_perm",
        table="wide_perm",
        version=None,
        request=ViewRequest(columns=["name"], format="torch_dict"),
    )
    with pytest.raises(TypeError, match=r"column 'name' has Arrow type string.*numpy_dict"):
        next(iter(named))


def _consumer(metadata: dict[str, Any], upstream: dg.AssetsDefinition = SPLITS) -> Any:
    @dg.asset(name="consumer", ins={"data": dg.AssetIn(key=upstream.key, metadata=metadata)})
    def consumer(data: Permutation) -> None:
        del data

    return consumer


def _defs(*assets: Any, resources: dict[str, Any] | None = None) -> dg.Definitions:
    db = LanceDBResource(uri="unused")
    bound = {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}
    return dg.Definitions(assets=list(assets), resources=bound if resources is None else resources)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (
            {"split": "validation"},
            r"asset 'consumer', input 'data': split 'validation' is not in asset 'splits' "
            r"\(splits: 'train', 'val', 'test'\)",
        ),
        ({"split": 3}, r"split index 3 is out of range for asset 'splits' \(splits 0\.\.2"),
        ({"split": ["train", "tset"]}, r"split 'tset' is not in asset 'splits'"),
        ({"split": "train", "colums": ["id"]}, r"unknown key 'colums' \(did you mean 'columns'"),
        ({"split": "train", "format": "tensor"}, r"format='tensor'"),
        (
            {"split": "train", "fold": 1},
            r"fold 1 was asked of asset 'splits', which is not a folds",
        ),
    ],
)
def test_check_definitions_catches_bad_requests_when_definitions_load(
    metadata: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        check_definitions(_defs(SOURCE, SPLITS, _consumer(metadata)))


def test_check_definitions_accepts_fold_roles_and_names() -> None:
    for metadata in ({"split": "train"}, {"split": ["train", "validation"]}, {"split": "fold_2"}):
        check_definitions(_defs(SOURCE, FOLDS, _consumer(metadata, FOLDS)))
    with pytest.raises(SpecError, match=r"fold 'fold_3' is not in asset 'folds'"):
        check_definitions(
            _defs(SOURCE, FOLDS, _consumer({"split": "train", "fold": "fold_3"}, FOLDS))
        )


def test_check_definitions_names_the_io_manager_a_permutation_needs() -> None:
    db = LanceDBResource(uri="unused")
    with pytest.raises(SpecError) as caught:
        check_definitions(_defs(SOURCE, SPLITS, resources={"lancedb": db}))
    message = str(caught.value)
    assert (
        "asset 'splits' (read by permutation asset 'splits') is stored by IO manager key "
        in message
    )
    assert "bound to nothing (Dagster's default fs_io_manager)" in message
    assert "asset 'rows' (read by permutation asset 'splits')" in message
    assert "LanceDBIOManager(db=...)" in message
    with pytest.raises(SpecError, match=r"needs a LanceDBResource under resource key 'lancedb'"):
        check_definitions(_defs(SOURCE, SPLITS, resources={"io_manager": LanceDBIOManager(db=db)}))


def test_the_demo_definitions_pass_the_check() -> None:
    from definitions import defs

    assert check_definitions(defs) is defs


def test_without_the_lancedb_io_manager_the_run_names_it(db: LanceDBResource) -> None:
    """Dagster's default IO manager pickles the source; the type check says what to bind."""
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [SOURCE, SPLITS], resources={"lancedb": db}, instance=instance, raise_on_error=False
        )
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    text = " ".join(str(e.event_specific_data) for e in failures)
    assert "LanceDBIOManager" in text, text


def test_lineage_is_recorded_on_the_consumer_not_as_an_upstream_observation(run: Runner) -> None:
    result = run([SOURCE, SPLITS, _consumer({"split": "train", "columns": ["id"]})])
    loaded = [e for e in result.all_events if e.event_type_value == "LOADED_INPUT"]
    metadata = {
        k: v.value
        for e in loaded
        for k, v in getattr(e.event_specific_data, "metadata", {}).items()
    }
    assert metadata["lineage/asset"] == "splits" and metadata["lineage/split"] == "train"
    observations = run.instance.fetch_observations(SPLITS.key, limit=10).records
    assert observations == []


def test_a_launchpad_resplit_is_recorded_and_the_description_says_it_is_per_run(
    run: Runner,
) -> None:
    assert "next run without config uses these defaults again" in (
        SPLITS.descriptions_by_key[SPLITS.key] or ""
    )
    run([SOURCE, SPLITS])
    assert run.metadata("splits")["perm_assets/run_config_overrides"] == "none: the code's defaults"
    run([SOURCE, SPLITS], run_config={"ops": {"splits": {"config": {"seed": 9}}}})
    overrides = run.metadata("splits")["perm_assets/run_config_overrides"]
    assert overrides == {"split.seed": {"default": 3, "run": 9}}
    assert json.loads(SPLITS.metadata_by_key[SPLITS.key]["perm_assets/split_names"]) == [
        "train",
        "val",
        "test",
    ]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: RandomSplit(ratios=[0.8, 0.15]),
            r"^RandomSplit: ratios \[0\.8, 0\.15\] sum to 0\.95",
        ),
        (lambda: RandomSplit(ratios=[0.5, 0.5], clump_size=0), r"^RandomSplit: clump_size 0: "),
        (lambda: KFold(k=1), r"^KFold: k 1: Input should be greater than or equal to 2$"),
        (lambda: Shuffle(sed=1), r"^Shuffle: sed: unknown field$"),  # type: ignore[call-arg]
    ],
)
def test_spec_mistakes_are_one_line_naming_the_spec_and_field(build: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        build()
    assert "\n" not in str(caught.value) and "pydantic" not in str(caught.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: LanceDBResource(uri="x", builder_memory_limit=8192),  # pyright: ignore[reportCallIssue]
            r"LanceDBResource: unknown field\(s\) 'builder_memory_limit' \(did you mean "
            r"'builder_memory_limit_mb'\?\); its fields are auto_local_above_rows, "
            r"builder_memory_limit_mb, ",
        ),
        (
            lambda: LanceDBResource(uri="x", storage_option={"region": "eu"}),  # pyright: ignore[reportCallIssue]
            r"'storage_option' \(did you mean 'storage_options'\?\)",
        ),
        (
            lambda: LanceDBResource(uri="x", read_consistency=[1]),  # pyright: ignore[reportCallIssue]
            r"'read_consistency' \(did you mean 'read_consistency_seconds'\?\)",
        ),
        (
            lambda: LanceDBIOManager(db=LanceDBResource(uri="x"), root_uri="y"),
            r"LanceDBIOManager: unknown field\(s\) 'root_uri'; its fields are db, "
            r"storage_options, uri",
        ),
        (
            lambda: LanceDBIOManager(),
            r"needs its database: give db=LanceDBResource\(\.\.\.\) or uri=",
        ),
        (
            lambda: LanceDBIOManager(db=LanceDBResource(uri="x"), uri="x"),
            r"got both db= and uri=/storage_options=; give one",
        ),
    ],
)
def test_resources_refuse_unknown_or_conflicting_settings(build: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build()


def test_io_manager_from_a_uri_stores_and_serves_like_one_from_a_resource(tmp_path) -> None:
    uri = str(tmp_path / "lancedb")
    db = LanceDBResource(uri=uri)
    seen: list[int] = []

    @dg.asset(
        ins={"train": dg.AssetIn(key=SPLITS.key, metadata={"split": "train", "format": "arrow"})}
    )
    def trainer(train: Permutation) -> None:
        seen.extend(read_arrow(train).column("id").to_pylist())

    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize(
            [SOURCE, SPLITS, trainer],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(uri=uri)},
            instance=instance,
        )
    assert len(seen) == round(N * 0.7) and len(set(seen)) == len(seen)
    assert db.open_table("splits").count_rows() == N


def test_a_fold_asked_of_a_plain_permutation_is_refused_at_run_time(run: Runner) -> None:
    run([SOURCE, SPLITS])
    consumer = _consumer({"split": "train", "fold": 2})
    with pytest.raises(SpecError, match=r"fold=2 was asked, but 'splits' is not a folds asset"):
        run([SOURCE, SPLITS, consumer], selection=[consumer])


def test_check_definitions_accepts_resources_configured_at_launch() -> None:
    resources = {
        "lancedb": LanceDBResource.configure_at_launch(),
        "io_manager": LanceDBIOManager.configure_at_launch(),
    }
    check_definitions(_defs(SOURCE, SPLITS, resources=resources))
    with pytest.raises(SpecError, match=r"bound to FilesystemIOManager"):
        check_definitions(
            _defs(SOURCE, SPLITS, resources={**resources, "io_manager": dg.FilesystemIOManager()})
        )


def test_a_permutation_records_the_columns_a_consumer_may_select(run: Runner) -> None:
    run([SOURCE, SPLITS, FOLDS])
    for key in (SPLITS.key, FOLDS.key):
        schema = run.metadata(key)["dagster/column_schema"]
        assert [c.name for c in schema.columns] == make_rows(1).column_names, key
