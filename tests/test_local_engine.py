"""The out-of-core local engine (`perm_assets.engines.local`) through real materializations.

Small tables (<= 200k rows) with a small ``local_bucket_rows`` so that every build goes through
many spill buckets; guarantees are asserted on what LanceDB holds, read back through the
project's views.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest

from perm_assets import (
    LanceDBIOManager,
    LanceDBResource,
    RandomSplit,
    SequentialSplit,
    Shuffle,
    SpecError,
    StratifiedSplit,
    permutation_asset,
)
from perm_assets.assign import apportion
from perm_assets.engines.local import ALGORITHM, SPILL_PREFIX, Spill, reclaim
from perm_assets.factories import folds_asset
from perm_assets.specs import (
    CalculatedSplit,
    GroupKFold,
    GroupSplit,
    HashSplit,
    KFold,
    StratifiedKFold,
    TimeSplit,
)
from perm_assets.tables import read_all
from perm_assets.views import ViewRequest, open_view, read_arrow
from tests.processes import child_env, wait_for

N = 50_000
CLASSES = 37


def _rows(n: int, *, null_labels: bool = False) -> pa.Table:
    """``id`` 0..n-1 (the row address of a one-fragment table), a skewed ``label`` (37
    classes, the largest ~9x the smallest), ``x`` float32, ``user`` (997 strings) and ``g``
    (1,001 integer groups of about 50 rows, scattered over the table)."""
    ids = np.arange(n, dtype=np.int64)
    label = np.floor(np.sqrt((ids * 7919) % (CLASSES * CLASSES))).astype(np.int32)
    labels = pa.array(label, mask=(ids % 1000 == 7) if null_labels else None)
    return pa.table(
        {
            "id": ids,
            "label": labels,
            "x": (ids * 0.5).astype(np.float32),
            "user": pa.array(np.char.add("u", ((ids * 31) % 997).astype(str))),
            "g": (ids * 13) % 1001,
        }
    )


def _base(n: int = N, *, null_labels: bool = False) -> dg.AssetsDefinition:
    @dg.asset(name="base")
    def base() -> pa.Table:
        return _rows(n, null_labels=null_labels)

    return base


def _db(tmp_path: Path, name: str = "lancedb", **settings: Any) -> LanceDBResource:
    settings = {"engine": "local", "spill_dir": str(tmp_path / "spill"), **settings}
    settings.setdefault("local_bucket_rows", 4096)
    return LanceDBResource(uri=str(tmp_path / name), **settings)


def _materialize(
    db: LanceDBResource, assets: list[Any], **kwargs: Any
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets, resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)}, **kwargs
    )


def _ids(db: LanceDBResource, table: str, split: str, *, fold: str | None = None) -> np.ndarray:
    """``id`` of a split's rows in read order, through the project's views."""
    view = open_view(
        db,
        asset=table,
        table=table,
        version=None,
        request=ViewRequest(split=split, fold=fold, columns=["id"]),
    )
    return read_arrow(view).column("id").to_numpy()


def _engine(result: dg.ExecuteInProcessResult, key: str) -> str:
    materialization = result.asset_materializations_for_node(key)[0]
    return str(materialization.metadata["perm_assets/engine"].value)


def _labels() -> np.ndarray:
    return np.asarray(_rows(N).column("label"))


CASES: dict[str, dict[str, Any]] = {
    "random_named_filtered_shuffled": {
        "filter": "label < 30",
        "split": RandomSplit(ratios=[0.8, 0.1, 0.1], seed=7, split_names=["train", "val", "test"]),
        "shuffle": Shuffle(seed=1),
    },
    "random_counts": {"split": RandomSplit(counts=[1000, 333], seed=3)},
    "random_fixed": {"split": RandomSplit(fixed=3, seed=5), "shuffle": Shuffle(seed=9)},
    "sequential": {"split": SequentialSplit(ratios=[0.7, 0.3])},
    "no_split_shuffled": {"filter": "id % 3 = 0", "shuffle": Shuffle(seed=4)},
    "stratified": {
        "filter": "label != 3",
        "split": StratifiedSplit(ratios=[0.6, 0.3, 0.1], label="label", seed=11),
        "shuffle": Shuffle(seed=2),
    },
    "hash": {
        "split": HashSplit(columns=["user", "id"], weights=[3, 1]),
        "shuffle": Shuffle(seed=6),
    },
    "hash_discarding": {
        "filter": "label < 30",
        "split": HashSplit(columns=["g"], weights=[2, 1], discard_weight=1),
    },
    "calculated": {
        "split": CalculatedSplit(expression="id % 3", splits=3),
        "shuffle": Shuffle(seed=3),
    },
    "group": {"filter": "id % 3 = 0", "split": GroupSplit(group="g", ratios=[0.7, 0.3], seed=5)},
    "group_of_strings": {
        "split": GroupSplit(group="user", ratios=[0.5, 0.5], seed=8),
        "shuffle": Shuffle(seed=4),
    },
    "group_stratified": {
        "split": GroupSplit(group="g", label="label", ratios=[0.6, 0.2, 0.2], seed=5),
        "shuffle": Shuffle(seed=1),
    },
    "time_with_ties": {
        "filter": "label != 3",
        "split": TimeSplit(column="label", ratios=[0.7, 0.3]),
    },
    "time": {"split": TimeSplit(column="x", ratios=[0.5, 0.25, 0.25]), "shuffle": Shuffle(seed=9)},
}
FILTERS = {
    None: lambda rows: np.ones(rows.num_rows, dtype=bool),
    "label < 30": lambda rows: np.asarray(rows.column("label")) < 30,
    "label != 3": lambda rows: np.asarray(rows.column("label")) != 3,
    "id % 3 = 0": lambda rows: np.asarray(rows.column("id")) % 3 == 0,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_supported_split_kind_is_a_valid_permutation(tmp_path: Path, case: str) -> None:
    kwargs = CASES[case]
    base = _base()
    perm = permutation_asset("perm", source=base, **kwargs)
    db = _db(tmp_path)
    result = _materialize(db, [base, perm])
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    assert _engine(result, "perm") == ALGORITHM

    spec = perm.specs_by_key[perm.key].metadata["perm_assets/split_names"]
    names = json.loads(spec)
    ids = {name: _ids(db, "perm", name) for name in names}
    table = _rows(N)
    expected = np.flatnonzero(FILTERS[kwargs.get("filter")](table))
    n = expected.size
    everything = np.concatenate(list(ids.values()))
    assert np.unique(everything).size == everything.size  # disjoint, no row twice
    split = kwargs.get("split")
    if isinstance(split, RandomSplit) and split.counts is not None:
        assert [ids[name].size for name in names] == split.counts  # exact counts
        assert np.isin(everything, expected).all()
    elif isinstance(split, HashSplit) and split.discard_weight:
        assert np.isin(everything, expected).all()
        assert 0.6 * n < everything.size < 0.9 * n  # about 3/4 kept
    else:
        assert np.array_equal(np.sort(everything), expected)  # complete
    if isinstance(split, CalculatedSplit):
        assert all(np.all(ids[name] % 3 == i) for i, name in enumerate(names))
    if isinstance(split, GroupSplit):  # every group in one split only
        groups = [np.unique(np.asarray(table.column(split.group))[ids[name]]) for name in names]
        every = np.concatenate(groups)
        assert np.unique(every).size == every.size
    if isinstance(split, GroupSplit) and split.label is None:
        # Sizes within the largest group of the target (assign.group_split's bound).
        largest = np.bincount(
            np.unique(np.asarray(table.column(split.group)), return_inverse=True)[1][expected]
        ).max()
        for name, ratio in zip(names, split.ratios, strict=True):
            assert abs(ids[name].size - ratio * n) <= 2 * (largest // 2) + 1, name
    if isinstance(split, TimeSplit):  # every time of a split before every time of the next
        times = np.asarray(table.column(split.column))
        for earlier, later in itertools.pairwise(names):
            assert times[ids[earlier]].max() < times[ids[later]].min(), (earlier, later)
    if isinstance(split, RandomSplit | SequentialSplit):
        ratios, _ = split.builder_sizes()
    elif isinstance(split, StratifiedSplit) or (
        isinstance(split, TimeSplit) and split.column == "x"  # distinct times: exact shares
    ):
        ratios = split.ratios
    else:
        ratios = None
    if ratios is not None:
        for name, ratio in zip(names, ratios, strict=True):
            assert abs(ids[name].size - ratio * n) < 1 + 1e-9, (name, ids[name].size, ratio * n)
    if isinstance(split, StratifiedSplit):
        labels = np.asarray(table.column("label"))
        for name, ratio in zip(names, split.ratios, strict=True):
            per_class = np.bincount(labels[ids[name]], minlength=CLASSES)
            share = np.bincount(labels[expected], minlength=CLASSES) * ratio
            assert np.all(np.abs(per_class - share) < 1 + 1e-9), name
    if isinstance(split, SequentialSplit):  # table order, the first 70% first
        assert np.array_equal(ids["split_0"], np.arange(int(apportion(N, [0.7, 0.3])[0])))
    if kwargs.get("shuffle") is None:
        assert all(np.all(np.diff(v) > 0) for v in ids.values())  # table order
    else:
        assert not all(np.all(np.diff(v) > 0) for v in ids.values())  # shuffled


@pytest.mark.parametrize(
    "folds",
    [
        KFold(k=5, seed=3),
        KFold(k=5, shuffle=False),
        StratifiedKFold(k=5, label="label", seed=1),
    ],
    ids=["kfold", "kfold_in_table_order", "stratified_kfold"],
)
def test_folds_are_valid_and_each_training_set_is_the_complement(tmp_path: Path, folds) -> None:
    base = _base()
    asset = folds_asset("folds", source=base, folds=folds, shuffle=Shuffle(seed=2))
    db = _db(tmp_path)
    result = _materialize(db, [base, asset])
    checks = result.get_asset_check_evaluations()
    assert {c.check_name for c in checks} >= {
        "splits_disjoint_and_complete",
        "train_and_validation_disjoint",
        "split_sizes_match_spec",
    }
    assert all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    assert _engine(result, "folds") == ALGORITHM
    labels = _labels()
    seen = []
    for i in range(5):
        validation = _ids(db, "folds", f"fold_{i}")
        train = _ids(db, "folds", "train", fold=f"fold_{i}")
        assert validation.size in (N // 5, N // 5 + 1)
        assert np.array_equal(np.sort(np.concatenate([train, validation])), np.arange(N))
        seen.append(validation)
        if isinstance(folds, StratifiedKFold):
            per_class = np.bincount(labels[validation], minlength=CLASSES)
            share = np.bincount(labels, minlength=CLASSES) / 5
            assert np.all(np.abs(per_class - share) < 1)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N))
    if isinstance(folds, KFold) and not folds.shuffle:  # contiguous folds in table order
        assert np.array_equal(np.sort(seen[0]), np.arange(N // 5))


def _stored(db: LanceDBResource, table: str) -> pa.Table:
    return read_all(db.open_table(table)).select(["row_id", "split_id"])


def _split_of_rows(db: LanceDBResource, table: str) -> tuple[np.ndarray, np.ndarray]:
    """``(row ids, split ids)`` sorted by row id: which split each row is in, not the order."""
    stored = _stored(db, table)
    rows = stored.column("row_id").to_numpy()
    order = np.argsort(rows)
    return rows[order], stored.column("split_id").to_numpy()[order]


ROW_KINDS = ["hash", "hash_discarding", "calculated", "group", "group_of_strings"]
ROW_KINDS += ["group_stratified", "time_with_ties", "time"]
FOLD_KINDS = {
    "group_kfold": GroupKFold(k=5, group="g", seed=2),
    "group_kfold_by_size": GroupKFold(k=4, group="g", shuffle=False),
    "stratified_kfold_in_table_order": StratifiedKFold(k=5, label="label", shuffle=False),
}


def test_kinds_decided_per_row_group_or_time_match_the_in_memory_path_whatever_the_buckets(
    tmp_path: Path,
) -> None:
    # Hash splits promise a row its split across versions and engines; the group, time and
    # unshuffled fold kinds are the in-memory assignment computed from counts, so every row
    # lands where the in-memory path puts it (for integer keys; string groups are ranked in
    # key order here, first appearance there). The read order is the engine's own, the same
    # whatever the bucket and batch sizes. One materialization per engine setting, all kinds.
    base = _base(20_000)
    assets = [permutation_asset(case, source=base, **CASES[case]) for case in ROW_KINDS]
    assets += [
        folds_asset(case, source=base, folds=folds, shuffle=Shuffle(seed=2))
        for case, folds in FOLD_KINDS.items()
    ]
    memory = _db(tmp_path, "memory", engine="lancedb")
    small = _db(tmp_path, "small", local_bucket_rows=1000, local_scan_batch_rows=777)
    large = _db(tmp_path, "large", local_bucket_rows=1 << 22, local_scan_batch_rows=1 << 20)
    for db in (memory, small, large):
        result = _materialize(db, [base, *assets])
        checks = result.get_asset_check_evaluations()
        assert all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    for case in [*ROW_KINDS, *FOLD_KINDS]:
        assert _stored(small, case).equals(_stored(large, case)), case
        local_rows, local_splits = _split_of_rows(small, case)
        memory_rows, memory_splits = _split_of_rows(memory, case)
        assert np.array_equal(local_rows, memory_rows), case
        if case == "group_of_strings":  # the same group sizes, ranked otherwise
            assert not np.array_equal(local_splits, memory_splits)
        else:
            assert np.array_equal(local_splits, memory_splits), case


def test_the_same_spec_gives_the_same_table_whatever_the_bucket_and_batch_sizes(
    tmp_path: Path,
) -> None:
    base = _base()
    spec = CASES["stratified"]
    perm = permutation_asset("perm", source=base, **spec)
    folds = folds_asset(
        "folds",
        source=base,
        folds=StratifiedKFold(k=5, label="label", seed=4),
        shuffle=Shuffle(seed=8),
    )
    small = _db(tmp_path, "small", local_bucket_rows=1000, local_scan_batch_rows=777)
    large = _db(tmp_path, "large", local_bucket_rows=1 << 22, local_scan_batch_rows=1 << 20)
    for db in (small, large):
        assert _materialize(db, [base, perm, folds]).success
    for table in ("perm", "folds", "folds__train"):
        assert _stored(small, table).equals(_stored(large, table)), table
    # ... and a different seed gives other rows (the comparison can fail).
    other = permutation_asset("perm", source=base, **{**spec, "shuffle": Shuffle(seed=3)})
    assert _materialize(large, [base, other]).success
    assert not _stored(small, "perm").equals(_stored(large, "perm"))


def test_spill_files_are_removed_after_a_build_and_after_a_failure(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    base = _base(null_labels=True)
    db = _db(tmp_path)
    ok = permutation_asset("ok", source=base, split=RandomSplit(ratios=[0.5, 0.5], seed=1))
    assert _materialize(db, [base, ok]).success
    assert spill.is_dir() and list(spill.iterdir()) == []
    # Null labels are found mid-scan, after bucket files were written.
    bad = permutation_asset(
        "bad", source=base, split=StratifiedSplit(ratios=[0.5, 0.5], label="label", seed=1)
    )
    with pytest.raises(SpecError, match=r'null values.*"label IS NOT NULL"'):
        _materialize(db, [base, bad])
    assert list(spill.iterdir()) == []
    assert not db.table_exists("bad")


BAD_INPUT = {
    # Each is found after spill files were written (4,096-row scan batches).
    "calculated_out_of_range": (
        {"split": CalculatedSplit(expression="id / 10000", splits=4)},
        r"asset 'bad': calculated split expression 'id / 10000' gives split index 4 \(row 40000 "
        r"of table 'base'.*only splits 0..3 \(\['split_0', 'split_1', 'split_2', 'split_3'\]\) "
        r"are declared",
    ),
    "calculated_not_sql": (
        {"split": CalculatedSplit(expression="nosuch % 2", splits=2)},
        r"asset 'bad': calculated split expression 'nosuch % 2' failed on table 'base' "
        r"\(columns: id, label, x, user, g\)",
    ),
    "group_with_nulls": (
        {"split": GroupSplit(group="g", label="label", ratios=[0.5, 0.5], seed=1)},
        r"asset 'bad': column 'label' of table 'base' has null values.*\"label IS NOT NULL\"",
    ),
    "time_of_strings": (
        {"split": TimeSplit(column="user", ratios=[0.5, 0.5])},
        r"asset 'bad', table 'base': column 'user' has type string, which has no time order",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_found_mid_build_is_named_and_leaves_no_spill_files(
    tmp_path: Path, case: str
) -> None:
    kwargs, message = BAD_INPUT[case]
    base = _base(null_labels=case == "group_with_nulls")
    bad = permutation_asset("bad", source=base, **kwargs)
    db = _db(tmp_path, local_scan_batch_rows=4096)
    with pytest.raises(SpecError, match=message):
        _materialize(db, [base, bad])
    assert list((tmp_path / "spill").iterdir()) == []
    assert not db.table_exists("bad")


def test_group_folds_with_fewer_groups_than_k_are_refused_naming_both(tmp_path: Path) -> None:
    base = _base()
    folds = folds_asset(
        "bad", source=base, filter="label < 3", folds=GroupKFold(k=5, group="label", seed=1)
    )
    db = _db(tmp_path)
    with pytest.raises(
        SpecError, match=r"asset 'bad', table 'base': k=5 folds but only 3 distinct"
    ):
        _materialize(db, [base, folds])
    assert list((tmp_path / "spill").iterdir()) == []


_CHILD = """
import sys
import dagster as dg
from perm_assets import LanceDBIOManager, LanceDBResource, RandomSplit, Shuffle, permutation_asset
from perm_assets.specs import GroupSplit

uri, spill, kind = sys.argv[1], sys.argv[2], sys.argv[3]
db = LanceDBResource(uri=uri, engine="local", spill_dir=spill, local_bucket_rows=500)
split = (
    RandomSplit(ratios=[0.8, 0.2], seed=2)
    if kind == "random"
    else GroupSplit(group="g", ratios=[0.8, 0.2], seed=2)
)
perm = permutation_asset("perm", source="base", split=split, shuffle=Shuffle(seed=5))
dg.materialize(
    [perm, dg.AssetSpec("base")],
    resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
    selection=[perm],
)
"""


@pytest.mark.parametrize("kind", ["random", "group"])
def test_a_build_killed_mid_way_leaves_the_previous_version_and_the_next_run_reclaims_its_spill(
    tmp_path: Path, kind: str
) -> None:
    n = 200_000
    base = _base(n)
    db = _db(tmp_path)
    first = permutation_asset(
        "perm", source=base, split=RandomSplit(ratios=[0.8, 0.2], seed=1), shuffle=Shuffle(seed=1)
    )
    assert _materialize(db, [base, first]).success
    before = db.open_table("perm")
    version, rows = before.version, _stored(db, "perm")

    spill = tmp_path / "spill"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    log = tmp_path / "child.log"

    def spilling() -> bool:  # the child is in its assignment stage: read-order files exist
        return any(d.is_dir() and any(d.glob("c*")) for d in spill.glob(SPILL_PREFIX + "*"))

    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, str(script), db.uri, str(spill), kind],
            cwd=tmp_path,
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(spilling, timeout=60, what="child spilling", process=child, log=log)
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
    left = list(spill.glob(SPILL_PREFIX + "*"))
    assert len(left) == 1 and any(left[0].iterdir())  # a SIGKILL leaves its spill behind

    after = db.open_table("perm")
    assert after.version == version
    assert _stored(db, "perm").equals(rows)
    assert _ids(db, "perm", "split_0").size == int(0.8 * n)  # and views still read it

    # The next build succeeds and removes the dead build's folder (and its own).
    second = permutation_asset(
        "perm", source=base, split=RandomSplit(ratios=[0.8, 0.2], seed=2), shuffle=Shuffle(seed=5)
    )
    assert _materialize(db, [base, second], selection=[second]).success
    assert list(spill.iterdir()) == []
    assert db.open_table("perm").version == version + 1


def test_a_live_builds_spill_folder_is_not_reclaimed(tmp_path: Path) -> None:
    with Spill(str(tmp_path)) as running:
        assert running.path is not None
        with Spill(str(tmp_path)):  # a second build on the same machine meanwhile
            assert running.path.exists()
    assert list(tmp_path.iterdir()) == []


_RECLAIM = "import sys; from pathlib import Path; from perm_assets.engines.local import reclaim; "
_RECLAIM += "print(reclaim(Path(sys.argv[1])))"


def _reclaim_in_another_pid_namespace(root: Path) -> subprocess.CompletedProcess[str]:
    """`reclaim(root)` run by a process in a new PID namespace (same host name, other pids);
    needs root or user namespaces, as CI has."""
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _RECLAIM]
    return subprocess.run(
        [*command, str(root)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_live_builds_spill_folder_survives_a_build_in_another_pid_namespace(
    tmp_path: Path,
) -> None:
    """A container or sandbox sharing the spill folder (same host name, its own pids) used to
    take the live build for dead, its pid being invisible there, and remove its bucket files
    mid-build (a 100M-row build then wrote other rows; its blocking check failed)."""
    with Spill(str(tmp_path)) as running:
        assert running.path is not None
        running.append("bucket", np.arange(10, dtype=np.uint64))
        other = _reclaim_in_another_pid_namespace(tmp_path)
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == ["0"], other.stdout
        assert np.array_equal(running.read("bucket", np.uint64), np.arange(10, dtype=np.uint64))
    # Once the build has ended, a build in that namespace does reclaim what a SIGKILL left.
    left = tmp_path / (SPILL_PREFIX + "killed")
    left.mkdir()
    (left / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": 1}))
    again = _reclaim_in_another_pid_namespace(tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["1"] and list(tmp_path.iterdir()) == []


def test_reclaim_goes_by_the_lock_on_one_kernel_and_keeps_young_half_written_folders(
    tmp_path: Path,
) -> None:
    def left(name: str, owner: str, *, age: float = 0.0) -> Path:
        folder = tmp_path / (SPILL_PREFIX + name)
        folder.mkdir()
        (folder / "owner.json").write_text(owner)
        if age:
            then = time.time() - age
            os.utime(folder, (then, then))
        return folder

    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # A killed build in a container of this machine: another host name, the same kernel.
    container = left("container", json.dumps({"host": "c0ffee", "boot": boot, "pid": 7}))
    # Another machine sharing the folder: its lock may not reach here, so it is left alone.
    elsewhere = left("elsewhere", json.dumps({"host": "c0ffee", "boot": "other", "pid": 7}))
    # Killed between locking and writing its owner file: removed only once old.
    young = left("young", "")
    old = left("old", "", age=2 * 3600)
    assert reclaim(tmp_path) == 2
    assert not container.exists() and not old.exists()
    assert elsewhere.exists() and young.exists()


_FORKING_BUILD = """
import os, sys, time
from perm_assets.engines.local import Spill
with Spill(sys.argv[1]):
    child = os.fork()  # a DataLoader worker, say, forked mid-build
    if child == 0:
        # Announced by the child itself: its at-fork hook has run (the parent's print came
        # before the child was scheduled under load, and the test raced the hook).
        print(os.getpid(), flush=True)
        time.sleep(120)
        os._exit(0)
    time.sleep(120)
"""


def test_a_killed_builds_folder_is_reclaimed_while_a_child_it_forked_lives_on(
    tmp_path: Path,
) -> None:
    spill = tmp_path / "spill"
    build = subprocess.Popen(
        [sys.executable, "-c", _FORKING_BUILD, str(spill)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert build.stdout is not None
    child = int(build.stdout.readline())
    try:
        assert reclaim(spill) == 0  # the build runs: its lock is held
        os.kill(build.pid, signal.SIGKILL)
        build.wait(timeout=10)
        os.kill(child, 0)  # the forked child is still alive...
        assert reclaim(spill) == 1  # ...and did not keep the dead build's lock
        assert list(spill.iterdir()) == []
    finally:
        for pid in (build.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        build.wait(timeout=10)
        build.stdout.close()


def test_a_spill_folder_removed_under_a_build_fails_it_instead_of_reading_empty_buckets(
    tmp_path: Path,
) -> None:
    with Spill(str(tmp_path)) as spill, pytest.raises(RuntimeError, match="was removed during"):
        assert spill.path is not None
        spill.append("bucket", np.arange(10, dtype=np.uint64))
        shutil.rmtree(spill.path)
        spill.read("bucket", np.uint64)


def test_a_spill_folder_without_room_is_named_with_the_space_needed(tmp_path: Path) -> None:
    with Spill(str(tmp_path)) as spill, pytest.raises(SpecError) as caught:
        spill.require_space(1 << 60)
    assert str(tmp_path) in str(caught.value) and "needs about" in str(caught.value)


def test_an_unknown_engine_is_refused_at_construction_listing_the_engines() -> None:
    with pytest.raises(SpecError, match=r"engine 'spark'.*'auto', 'lancedb', 'local' or 'ray'"):
        LanceDBResource(engine="spark")  # pyright: ignore[reportArgumentType]


def test_a_kind_the_local_engine_lacks_is_refused_naming_the_engines_that_build_it(
    tmp_path: Path,
) -> None:
    base = _base(1000)
    perm = permutation_asset("perm", source=base, shuffle=Shuffle(seed=1, clump_size=10))
    with pytest.raises(
        SpecError, match=r"engine 'local' does not build Shuffle\(clump_size=\.\.\.\).*'lancedb'"
    ):
        _materialize(_db(tmp_path), [base, perm])


def test_auto_picks_the_local_engine_above_its_threshold_and_lancedb_for_what_local_lacks(
    tmp_path: Path,
) -> None:
    base = _base(1000)
    random = permutation_asset("random", source=base, split=RandomSplit(ratios=[0.5, 0.5], seed=1))
    clumped = permutation_asset("clumped", source=base, shuffle=Shuffle(seed=1, clump_size=10))
    above = _db(tmp_path, "above", engine="auto", auto_local_above_rows=999)
    with dg.DagsterInstance.ephemeral() as instance:
        result = _materialize(above, [base, random, clumped], instance=instance)
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert _engine(result, "random") == ALGORITHM
    assert _engine(result, "clumped") == "lancedb"
    assert any("local engine does not build Shuffle(clump_size=...)" in m for m in logs)
    below = _db(tmp_path, "below", engine="auto", auto_local_above_rows=1000)
    assert _engine(_materialize(below, [base, random]), "random") == "lancedb"


def test_the_data_version_names_the_engine_so_a_switch_marks_downstream_stale(
    tmp_path: Path,
) -> None:
    base = _base(1000)
    perm = permutation_asset("perm", source=base, **CASES["random_fixed"])
    versions = []
    for i, engine in enumerate(("lancedb", "local", "local")):
        db = _db(tmp_path, engine=engine)
        with dg.DagsterInstance.ephemeral() as instance:
            # The base table is written once: the same version under every build.
            selection = None if i == 0 else [perm]
            result = _materialize(db, [base, perm], instance=instance, selection=selection)
            event = instance.get_latest_materialization_event(perm.key)
            assert event is not None and event.asset_materialization is not None
            versions.append((event.asset_materialization.tags or {})["dagster/data_version"])
        assert _engine(result, "perm") == ("lancedb" if engine == "lancedb" else ALGORITHM)
    assert versions[0] != versions[1]  # other rows for the same spec: downstream is stale
    assert versions[1] == versions[2]  # the same rows again: downstream stays fresh


def test_a_label_with_many_classes_gives_the_same_table_whichever_way_buckets_are_sorted(
    tmp_path: Path,
) -> None:
    # 50k classes of one row: one 50k-class bucket takes the argsort path, 1,000-row buckets
    # the per-class sorts; the rows must not depend on it.
    base = _base()
    perm = permutation_asset(
        "perm",
        source=base,
        split=StratifiedSplit(ratios=[0.5, 0.5], label="id", seed=3),
        shuffle=Shuffle(seed=1),
    )
    one = _db(tmp_path, "one", local_bucket_rows=1 << 20)
    many = _db(tmp_path, "many", local_bucket_rows=1000)
    for db in (one, many):
        result = _materialize(db, [base, perm])
        assert all(c.passed for c in result.get_asset_check_evaluations())
    assert _stored(one, "perm").equals(_stored(many, "perm"))
