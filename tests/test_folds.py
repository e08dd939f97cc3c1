"""Leakage-safe splits and cross-validation folds as assets, checked on persisted tables.

Guarantees are asserted on what LanceDB holds after real materializations (row ids read back
and joined to the base table's columns), and compared with scikit-learn where it defines the
same guarantee.
"""

import multiprocessing
import pickle
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
from lancedb.permutation import Permutation
from sklearn.model_selection import StratifiedKFold as SkStratifiedKFold
from sklearn.model_selection import TimeSeriesSplit

from perm_assets import LanceDBResource, SpecError, permutation_asset
from perm_assets.factories import fold_partitions, folds_asset
from perm_assets.lineage import reproduce_input
from perm_assets.specs import (
    GroupKFold,
    GroupSplit,
    KFold,
    Shuffle,
    StratifiedKFold,
    StratifiedSplit,
    TimeSeriesFolds,
    TimeSplit,
)
from perm_assets.views import PermutationView, ViewRequest, open_view, read_arrow
from tests.conftest import Runner, make_rows


def _source(n: int, *, classes: int = 10, name: str = "rows") -> dg.AssetsDefinition:
    """``make_rows(n)`` with a skewed ``label`` (class c has ~c+1 shares) and a ``time``."""

    def rows() -> pa.Table:
        data = make_rows(n, classes=classes)
        ids = np.arange(n)
        skewed = np.floor(np.sqrt((ids * 7919) % (classes * classes))).astype(np.int64)
        # A coarse time with ties: 4 rows share each timestamp.
        return data.append_column("skewed", pa.array(skewed)).append_column(
            "time", pa.array(ids // 4)
        )

    return dg.asset(name=name)(rows)


def _split_of(db: LanceDBResource, table: str, names: list[str], column: str) -> dict[str, list]:
    """``column`` of each split, in read order, through the project's own views."""
    return {
        name: read_arrow(
            open_view(
                db,
                asset=table,
                table=table,
                version=None,
                request=ViewRequest(split=name, columns=[column]),
            )
        )
        .column(column)
        .to_pylist()
        for name in names
    }


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


# --------------------------------------------------------------------------- split kinds
@pytest.mark.parametrize(("n", "seed"), [(997, 0), (1000, 1), (2503, 7)])
def test_stratified_split_keeps_every_class_within_one_row(
    run: Runner, db: LanceDBResource, n: int, seed: int
) -> None:
    source = _source(n)
    perm = permutation_asset(
        "perm",
        source=source,
        split=StratifiedSplit(
            label="skewed", ratios=[0.7, 0.2, 0.1], seed=seed, split_names=["a", "b", "c"]
        ),
        shuffle=Shuffle(seed=seed),
    )
    result = run([source, perm])
    ids = _split_of(db, "perm", ["a", "b", "c"], "id")
    assert sorted(i for v in ids.values() for i in v) == list(range(n))
    labels = np.asarray(
        np.floor(np.sqrt((np.arange(n) * 7919) % 100)), dtype=np.int64
    )  # as _source makes them
    for split, ratio in zip("abc", [0.7, 0.2, 0.1], strict=True):
        got = np.bincount(labels[ids[split]], minlength=10)
        share = np.bincount(labels, minlength=10) * ratio
        assert np.all(np.abs(got - share) < 1), (split, got, share)
        assert abs(len(ids[split]) - n * ratio) < 1
    checks = _checks(result)
    assert checks["class_proportions_within_one_row"].passed
    assert checks["splits_disjoint_and_complete"].passed
    assert checks["split_sizes_match_spec"].passed


def test_group_split_never_puts_a_group_in_two_splits(run: Runner, db: LanceDBResource) -> None:
    source = _source(2000)
    perm = permutation_asset(
        "perm",
        source=source,
        filter="label != 0",
        split=GroupSplit(group="group", ratios=[0.8, 0.2], seed=3, split_names=["tr", "te"]),
    )
    result = run([source, perm])
    groups = _split_of(db, "perm", ["tr", "te"], "group")
    assert not set(groups["tr"]) & set(groups["te"])
    assert len(groups["tr"]) + len(groups["te"]) == 1800
    # Groups hold 7 rows (6 after the filter at most): sizes are within a group of the share.
    assert abs(len(groups["tr"]) - 0.8 * 1800) <= 7
    assert _checks(result)["no_group_in_two_splits"].passed


def test_time_split_puts_every_earlier_row_first_and_never_splits_a_tie(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(1001)
    perm = permutation_asset(
        "perm",
        source=source,
        split=TimeSplit(column="time", ratios=[0.7, 0.3], split_names=["past", "future"]),
    )
    result = run([source, perm])
    times = _split_of(db, "perm", ["past", "future"], "time")
    assert max(times["past"]) < min(times["future"])
    assert len(times["past"]) + len(times["future"]) == 1001
    assert _checks(result)["earlier_splits_precede_later"].passed


# ------------------------------------------------------------------------------- folds
def _fold_consumer(folds: dg.AssetsDefinition, role: str, got: dict[str, Any]):
    @dg.asset(
        name=f"{role}_reader",
        partitions_def=fold_partitions(folds),
        ins={"data": dg.AssetIn(key=folds.key, metadata={"split": role, "columns": ["id"]})},
    )
    def reader(context: dg.AssetExecutionContext, data: Permutation) -> None:
        assert isinstance(data, PermutationView)
        got[context.partition_key] = (read_arrow(data).column("id").to_pylist(), data.lineage)

    return reader


def _read_every_fold(
    run: Runner, source: dg.AssetsDefinition, folds: dg.AssetsDefinition, k: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Materialize ``folds`` (every check must pass), then read each fold's training and
    validation ids: ``{"fold_i": (ids, lineage)}`` for each."""
    train: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    readers = [
        _fold_consumer(folds, "train", train),
        _fold_consumer(folds, "validation", validation),
    ]
    result = run([source, folds])
    assert all(e.passed for e in result.get_asset_check_evaluations())
    for i in range(k):
        run([source, folds, *readers], selection=readers, partition_key=f"fold_{i}")
    return train, validation


@pytest.mark.parametrize("shuffle", [True, False])
def test_kfold_training_views_are_the_complement_of_each_validation_fold(
    run: Runner, shuffle: bool
) -> None:
    n, k = 1003, 5
    source = _source(n)
    folds = folds_asset("folds", source=source, folds=KFold(k=k, seed=2, shuffle=shuffle))
    train: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    train_reader = _fold_consumer(folds, "train", train)
    validation_reader = _fold_consumer(folds, "validation", validation)
    result = run([source, folds])
    assert all(e.passed for e in result.get_asset_check_evaluations())
    for i in range(k):
        run(
            [source, folds, train_reader, validation_reader],
            selection=[train_reader, validation_reader],
            partition_key=f"fold_{i}",
        )
    sizes = sorted(len(validation[f"fold_{i}"][0]) for i in range(k))
    assert sizes == [200, 200, 201, 201, 201]
    seen: list[int] = []
    for i in range(k):
        val_ids, val_lineage = validation[f"fold_{i}"]
        train_ids, train_lineage = train[f"fold_{i}"]
        assert sorted(train_ids + val_ids) == list(range(n))
        assert not set(train_ids) & set(val_ids)
        seen += val_ids
        assert val_lineage.split == f"fold_{i}/validation"
        assert train_lineage.split == f"fold_{i}/train"
        assert train_lineage.table == "folds__train"
    assert sorted(seen) == list(range(n))
    if not shuffle:  # contiguous folds in table order, the first n % k one row larger
        assert validation["fold_0"][0] == list(range(201))


def test_stratified_kfold_matches_scikit_learns_guarantee(run: Runner, db: LanceDBResource) -> None:
    n, k = 1500, 5
    source = _source(n)
    folds = folds_asset("folds", source=source, folds=StratifiedKFold(k=k, label="skewed", seed=4))
    result = run([source, folds])
    ids = _split_of(db, "folds", [f"fold_{i}" for i in range(k)], "id")
    labels = np.floor(np.sqrt((np.arange(n) * 7919) % 100)).astype(np.int64)
    totals = np.bincount(labels, minlength=10)
    ours = np.stack([np.bincount(labels[ids[f"fold_{i}"]], minlength=10) for i in range(k)])
    sk_folds = SkStratifiedKFold(k, shuffle=True, random_state=0).split(np.zeros(n), labels)
    theirs = np.stack([np.bincount(labels[test], minlength=10) for _, test in sk_folds])
    # scikit-learn's documented guarantee, met by both: each class within 1 of n_c / k.
    for counts in (ours, theirs):
        assert np.all(np.abs(counts - totals / k) < 1)
    assert ours.sum() == n
    assert _checks(result)["class_proportions_within_one_row"].passed


def test_group_kfold_validates_every_group_in_exactly_one_fold(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(700)
    folds = folds_asset("folds", source=source, folds=GroupKFold(k=4, group="group", seed=1))
    result = run([source, folds])
    groups = _split_of(db, "folds", [f"fold_{i}" for i in range(4)], "group")
    owner: dict[int, int] = {}
    for i in range(4):
        for g in groups[f"fold_{i}"]:
            assert owner.setdefault(g, i) == i
    assert sorted(owner) == list(range(100))
    assert _checks(result)["no_group_in_two_splits"].passed


def test_time_series_folds_equal_scikit_learns_on_distinct_times(run: Runner) -> None:
    n, k, gap = 300, 4, 3
    source = _source(n)
    folds = folds_asset("folds", source=source, folds=TimeSeriesFolds(k=k, column="id", gap=gap))
    train, validation = _read_every_fold(run, source, folds, k)
    expected = list(TimeSeriesSplit(k, gap=gap).split(np.zeros(n)))
    previous: set[int] = set()
    for i, (train_idx, test_idx) in enumerate(expected):
        assert train[f"fold_{i}"][0] == train_idx.tolist()  # id == row position, time order
        assert validation[f"fold_{i}"][0] == test_idx.tolist()
        assert previous <= set(train_idx.tolist())
        previous = set(train_idx.tolist())


def test_shuffled_time_series_folds_keep_scikit_learns_sets_with_gap_and_window(
    run: Runner,
) -> None:
    n, k, gap, window = 300, 4, 3, 90
    source = _source(n)
    folds = folds_asset(
        "folds",
        source=source,
        folds=TimeSeriesFolds(k=k, column="id", gap=gap, max_train_size=window),
        shuffle=Shuffle(seed=5),
    )
    train, validation = _read_every_fold(run, source, folds, k)
    expected = TimeSeriesSplit(k, gap=gap, max_train_size=window).split(np.zeros(n))
    for i, (train_idx, test_idx) in enumerate(expected):
        ids = train[f"fold_{i}"][0]
        # The same rows as scikit-learn's, never a later one, in a uniformly shuffled order:
        # a time-blocked order would put the whole first quarter before the last quarter.
        assert sorted(ids) == train_idx.tolist()
        quarter = len(ids) // 4
        assert max(ids[:quarter]) > min(ids[-quarter:])
        assert sorted(validation[f"fold_{i}"][0]) == test_idx.tolist()


@pytest.mark.filterwarnings("ignore:lancedb fork support is experimental:RuntimeWarning")
def test_a_fold_training_view_stays_in_its_range_under_skip_take_pickle_and_lineage(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(1003)
    folds = folds_asset("folds", source=source, folds=KFold(k=5, seed=3))
    got: dict[str, Any] = {}
    reader = _fold_consumer(folds, "train", got)
    run([source, folds])
    result = run([source, folds, reader], selection=[reader], partition_key="fold_2")
    ids, lineage = got["fold_2"]
    validation = _split_of(db, "folds", ["fold_2"], "id")["fold_2"]
    assert sorted(ids + validation) == list(range(1003)) and len(ids) == 1003 - len(validation)
    # The training table holds folds 1..4 then 0..3: fold 2 trains on folds 3, 4, 0 and 1.
    sizes = run.metadata("folds")
    assert (lineage.offset, lineage.limit) == (
        sizes["rows/fold_1"] + sizes["rows/fold_2"],
        len(ids),
    )

    view = open_view(
        db,
        asset="folds",
        table="folds",
        version=None,
        request=ViewRequest(split="train", fold="fold_2", columns=["id"]),
    )

    def read(v: Permutation) -> list[int]:
        return read_arrow(v).column("id").to_pylist()

    # Relative to the fold's rows: lancedb's own with_skip would restart at the table's row 0.
    assert read(view.with_skip(10).with_take(50)) == ids[10:60]
    assert read(view.with_take(10**6)) == ids
    assert read(view.with_skip(len(ids) - 3)) == ids[-3:]
    assert read(pickle.loads(pickle.dumps(view.with_skip(7)))) == ids[7:]
    # A negative skip would reach back into the rows before the range: fold 2's own.
    with pytest.raises(ValueError, match=r"skip=-5 must be >= 0"):
        view.with_skip(-5)
    with pytest.raises(ValueError, match=r"take=-1 must be >= 0"):
        view.with_take(-1)
    # A view without lineage (built by hand) skips and takes too.
    plain = PermutationView.from_tables(db.open_table("rows"), None, None).with_format("arrow")
    assert read(plain.with_skip(1000).with_take(2)) == [1000, 1001]
    again = reproduce_input(db, run.instance, run_id=result.run_id, input_name="data")
    assert read(again) == ids
    # A forked worker (its helper reopens the training table by location) reads the same range.
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_read_in_child, args=(view.with_skip(10).with_take(50), out))
    child.start()
    passes, taken, rows = out.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert (passes, taken, rows) == (ids[10:60], [ids[13], ids[10], ids[59]], 50)


def _read_in_child(view: PermutationView, out: Any) -> None:
    """In a forked child: a pass, a take by position and the length of ``view``."""
    passes = read_arrow(view, batch_rows=7).column("id").to_pylist()
    taken = view.take_arrow([3, 0, 49]).column("id").to_pylist()
    out.put((passes, taken, len(view)))


def test_a_misplaced_training_range_fails_the_leakage_check_and_blocks_training(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: every fold's training range starts one row late, into its own fold.
    from perm_assets import folds as folds_module

    rotated = folds_module._rotated

    def off_by_one(validation: pa.Table, rows: np.ndarray) -> Any:
        train, ranges = rotated(validation, rows)
        return train, [(offset + 1, length) for offset, length in ranges[:-1]] + ranges[-1:]

    monkeypatch.setattr(folds_module, "_rotated", off_by_one)
    source = _source(500)
    folds = folds_asset("folds", source=source, folds=StratifiedKFold(k=5, label="label", seed=1))
    trained: list[bool] = []

    @dg.asset(
        partitions_def=fold_partitions(folds),
        ins={"data": dg.AssetIn(key=folds.key, metadata={"split": "train"})},
    )
    def model(data: Permutation) -> None:
        del data
        trained.append(True)

    result = run([source, folds, model], raise_on_error=False, partition_key="fold_0")
    checks = _checks(result)
    leak = checks["train_and_validation_disjoint"]
    assert not leak.passed
    # Fold 0..3 each take in one row of their own fold and lose one row of the next.
    assert leak.metadata["train_rows_in_own_validation_fold"].value == [1, 1, 1, 1, 0]
    assert leak.metadata["rows_missing_per_fold"].value == [1, 1, 1, 1, 0]
    assert checks["splits_disjoint_and_complete"].passed
    assert trained == [] and not result.success


@pytest.mark.parametrize("fault", ["into_the_gap", "past_the_table"])
def test_a_time_series_training_range_with_other_rows_fails_the_leakage_check(
    run: Runner, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # Fault injection: ranges that take in the gap rows, or run past the training table's end.
    from perm_assets import folds as folds_module

    time_series = folds_module._time_series

    def faulty(*args: Any, **kwargs: Any) -> Any:
        validation, train, ranges = time_series(*args, **kwargs)
        if fault == "into_the_gap":
            return validation, train, [(offset, rows + 3) for offset, rows in ranges]
        return validation, train, [*ranges[:-1], (ranges[-1][0], ranges[-1][1] + 1000)]

    monkeypatch.setattr(folds_module, "_time_series", faulty)
    source = _source(300)
    folds = folds_asset("folds", source=source, folds=TimeSeriesFolds(k=4, column="id", gap=3))
    result = run([source, folds], raise_on_error=False)
    check = _checks(result)["train_and_validation_disjoint"]
    assert not check.passed
    figures = {k: v.value for k, v in check.metadata.items()}
    if fault == "into_the_gap":  # folds 0..2 take gap rows; fold 3's range runs past the end
        wrong = (
            figures["folds_with_other_training_rows"],
            figures["ranges_outside_training_table"],
        )
        assert wrong == (3, 1)
    else:
        assert figures["ranges_outside_training_table"] == 1


def test_a_row_in_two_folds_fails_the_cover_check_and_is_not_stratified_blindly(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the folds table lists one row twice and drops another.
    from perm_assets import folds as folds_module

    table_of = folds_module.permutation_table

    def duplicated(row_ids: np.ndarray, split_ids: np.ndarray, *, base_version: int) -> pa.Table:
        row_ids = row_ids.copy()
        row_ids[1] = row_ids[0]
        return table_of(row_ids, split_ids, base_version=base_version)

    monkeypatch.setattr(folds_module, "permutation_table", duplicated)
    source = _source(400)
    folds = folds_asset("folds", source=source, folds=StratifiedKFold(k=4, label="label", seed=2))
    result = run([source, folds], raise_on_error=False)
    checks = _checks(result)
    cover = checks["splits_disjoint_and_complete"]
    assert not cover.passed
    figures = {k: cover.metadata[k].value for k in ("duplicate_rows", "missing_rows", "extra_rows")}
    assert figures == {"duplicate_rows": 1, "missing_rows": 1, "extra_rows": 0}
    stratified = checks["class_proportions_within_one_row"]
    assert not stratified.passed and stratified.metadata["evaluated"].value is False


def test_a_folds_view_without_a_fold_says_how_to_pick_one(run: Runner) -> None:
    source = _source(100)
    folds = folds_asset("folds", source=source, folds=KFold(k=3, seed=0))

    @dg.asset(ins={"data": dg.AssetIn(key=folds.key, metadata={"split": "train"})})
    def unpartitioned(data: Permutation) -> None:
        del data

    run([source, folds])
    with pytest.raises(SpecError, match=r"asks for split 'train' but not which fold.*fold_0"):
        run([source, folds, unpartitioned], selection=[unpartitioned])

    @dg.asset(ins={"data": dg.AssetIn(key=folds.key, metadata={"split": "validation", "fold": 7})})
    def wrong_fold(data: Permutation) -> None:
        del data

    with pytest.raises(SpecError, match=r"fold 7 is not in folds asset 'folds'"):
        run([source, folds, wrong_fold], selection=[wrong_fold])


def test_a_failing_leakage_check_blocks_downstream_training(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: an assignment that ignores groups must be caught by the check.
    from perm_assets import assign

    def leaky(groups: Any, ratios: Any, seed: int) -> np.ndarray:
        return (np.arange(len(groups)) % len(ratios)).astype(np.uint64)

    monkeypatch.setattr(assign, "group_split", leaky)
    source = _source(200)
    perm = permutation_asset(
        "perm",
        source=source,
        split=GroupSplit(group="group", ratios=[0.5, 0.5], seed=0, split_names=["a", "b"]),
    )
    trained: list[bool] = []

    @dg.asset(ins={"data": dg.AssetIn(key=perm.key, metadata={"split": "a"})})
    def model(data: Permutation) -> None:
        del data
        trained.append(True)

    result = run([source, perm, model], raise_on_error=False)
    check = _checks(result)["no_group_in_two_splits"]
    assert not check.passed
    # 200 rows in groups of 7 (ids // 7): 29 groups, each with 2+ rows alternating splits.
    assert check.metadata["groups_in_several_splits"].value == 29
    assert trained == []
    assert not result.success


# ---------------------------------------------------------------------------- bad input
def test_k_below_two_fails_at_definition() -> None:
    with pytest.raises(SpecError, match=r"folds\.k 1: Input should be greater than or equal to 2"):
        folds_asset("folds", source="rows", folds={"kind": "kfold", "k": 1})


def test_more_folds_than_rows_or_groups_fails_and_keeps_the_previous_version(
    run: Runner, db: LanceDBResource
) -> None:
    source = _source(20)
    good = folds_asset("folds", source=source, folds=KFold(k=4, seed=0))
    run([source, good])
    version = db.open_table("folds").version
    too_many = folds_asset("folds", source=source, filter="id < 3", folds=KFold(k=4, seed=0))
    with pytest.raises(SpecError, match=r"asset 'folds'.*k=4.*3 rows"):
        run([source, too_many], selection=[too_many])
    groups = folds_asset("folds", source=source, folds=GroupKFold(k=4, group="group", seed=0))
    with pytest.raises(SpecError, match=r"asset 'folds'.*k=4 folds but only 3 distinct groups"):
        run([source, groups], selection=[groups])
    assert db.open_table("folds").version == version


def test_missing_label_column_lists_the_columns(run: Runner) -> None:
    source = _source(50)
    folds = folds_asset("folds", source=source, folds=StratifiedKFold(k=3, label="class", seed=0))
    with pytest.raises(
        SpecError, match=r"column\(s\) \['class'\] are not in table 'rows' \(columns: id, label"
    ):
        run([source, folds])


def test_null_labels_are_counted_with_the_filter_that_drops_them(run: Runner) -> None:
    @dg.asset(name="rows")
    def rows() -> pa.Table:
        labels = pa.array([None if i % 10 == 0 else i % 3 for i in range(100)], pa.int64())
        return make_rows(100).append_column("maybe", labels)

    perm = permutation_asset(
        "perm", source=rows, split=StratifiedSplit(label="maybe", ratios=[0.5, 0.5], seed=0)
    )
    with pytest.raises(
        SpecError,
        match=r"column 'maybe' .* has 10 null value\(s\) out of 100.*\"maybe IS NOT NULL\"",
    ):
        run([rows, perm])


def test_small_classes_warn_or_fail_as_configured(run: Runner) -> None:
    source = _source(60)
    # 'skewed' class 0 has few rows: sqrt((i*7919) % 100) < 1 only when the product is 0 mod 100.
    warn = folds_asset("folds", source=source, folds=StratifiedKFold(k=5, label="skewed", seed=0))
    run([source, warn])
    small = run.metadata("folds")["perm_assets/small_classes"]
    assert small and all(rows < 5 for rows in small.values())
    fail = folds_asset(
        "folds",
        source=source,
        folds=StratifiedKFold(k=5, label="skewed", seed=0, on_small_class="error"),
    )
    with pytest.raises(SpecError, match=r"asset 'folds'.*fewer"):
        run([source, fail], selection=[fail])


# ------------------------------------------------------------------------- compatibility
def test_an_older_folds_table_with_one_training_split_per_fold_still_reads(
    run: Runner, db: LanceDBResource
) -> None:
    # Folds tables written before the rotated layout had no ranges: split i of the training
    # table held fold i's training rows. Rewrite the latest version in that layout.
    from perm_assets.tables import TRAIN_RANGES_KEY, TRAIN_VERSION_KEY, WriteMode, write_table

    source = _source(103)
    folds = folds_asset("folds", source=source, folds=KFold(k=3, seed=1))
    run([source, folds])
    stored = db.open_table("folds").to_arrow()
    ids, fold_of = stored.column("row_id").to_numpy(), stored.column("split_id").to_numpy()
    train_ids = np.concatenate([ids[fold_of != i] for i in range(3)])
    train_splits = np.repeat(
        np.arange(3, dtype=np.uint64), [(fold_of != i).sum() for i in range(3)]
    )
    old_train = pa.table(
        {"row_id": pa.array(train_ids), "split_id": pa.array(train_splits)},
        schema=stored.schema,
    ).replace_schema_metadata(  # as the folds table's: split names fold_0 ... fold_2
        {k: v for k, v in (stored.schema.metadata or {}).items() if b"train" not in k}
    )
    train = write_table(db.connect(), "folds__train", old_train, WriteMode.OVERWRITE)
    # That layout's writer tagged the training version with the folds table's pin, as now.
    pin_name = (stored.schema.metadata or {})[b"perm_assets.pin"].decode()
    train.tags.update(pin_name, train.version)
    metadata = dict(stored.schema.metadata or {})
    del metadata[TRAIN_RANGES_KEY.encode()]
    metadata[TRAIN_VERSION_KEY.encode()] = str(train.version).encode()
    write_table(
        db.connect(), "folds", stored.replace_schema_metadata(metadata), WriteMode.OVERWRITE
    )

    for i in range(3):
        view = open_view(
            db,
            asset="folds",
            table="folds",
            version=None,
            request=ViewRequest(split="train", fold=i, columns=["id"]),
        )
        got = read_arrow(view).column("id").to_pylist()
        # One fragment of 103 rows: row id == row position == id.
        assert got == ids[fold_of != i].tolist()
        assert (view.offset, view.limit, view.lineage.split_index) == (None, None, i)
