"""Bad specs fail at definition time, naming the asset, the value and what is allowed."""

from __future__ import annotations

import math

import dagster as dg
import pytest

from perm_assets import (
    CalculatedSplit,
    HashSplit,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    Shuffle,
    SpecError,
    permutation_asset,
)
from tests.conftest import table_asset

SOURCE = table_asset("rows", 10)


def _define(**kwargs) -> dg.AssetsDefinition:
    return permutation_asset("bad_perm", source=SOURCE, **kwargs)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"kind": "random", "ratios": [0.7, 0.4]}, r"ratios \[0\.7, 0\.4\] sum to 1\.1, above 1"),
        ({"kind": "random", "ratios": [1.2, -0.2]}, r"every ratio must be a number in \(0, 1\]"),
        ({"kind": "random", "ratios": [math.nan, 0.5]}, r"\[nan\].*number in \(0, 1\]"),
        ({"kind": "random", "ratios": [0.5, 0.3]}, r"sum to 0\.8, below 1.*allow_discard"),
        ({"kind": "random", "ratios": []}, r"ratios is empty"),
        ({"kind": "random", "fixed": 1}, r"fixed=1 makes fewer than 2 splits"),
        ({"kind": "random", "fixed": 0}, r"fixed=0 makes fewer than 2 splits"),
        ({"kind": "random"}, r"exactly one of ratios, counts or fixed"),
        ({"kind": "random", "ratios": [0.5, 0.5], "fixed": 2}, r"exactly one of"),
        ({"kind": "random", "counts": [5, 0]}, r"counts \[5, 0\] must be"),
        (
            {"kind": "random", "ratios": [0.5, 0.5], "split_names": ["train"]},
            r"split_names \['train'\] has 1 names but the split makes 2 splits",
        ),
        (
            {"kind": "random", "ratios": [0.5, 0.5], "split_names": ["a", "a"]},
            r"repeats \['a'\]; names must be unique",
        ),
        ({"kind": "random", "ratios": [0.5, 0.5], "clump_size": 0}, r"clump_size"),
        ({"kind": "random", "ratios": [0.5, 0.5], "seed": -1}, r"seed"),
        ({"kind": "sequential", "ratios": [0.9, 0.2]}, r"above 1"),
        ({"kind": "hash", "columns": ["id"], "weights": [1, 0]}, r"weights \[1, 0\]"),
        ({"kind": "hash", "columns": [], "weights": [1, 1]}, r"columns"),
        ({"kind": "calculated", "expression": "id % 3"}, r"needs `splits`"),
        (
            {"kind": "calculated", "expression": "id % 3; select 1", "splits": 3},
            r"contains ';'",
        ),
        ({"kind": "bogus", "ratios": [0.5, 0.5]}, r"kind"),
        ({"kind": "stratified", "ratios": [0.5, 0.5]}, r"split\.label: Field required"),
    ],
)
def test_bad_split_fails_at_definition(split: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        _define(split=split)
    assert "permutation asset 'bad_perm'" in str(info.value)


@pytest.mark.parametrize(
    ("filter", "message"),
    [
        ("label > 3; DROP TABLE rows", r"contains ';'"),
        ("label > 3;", r"contains ';'"),
        ("   ", r"filter is empty"),
    ],
)
def test_bad_filter_fails_at_definition(filter: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _define(filter=filter)


def test_semicolon_inside_a_string_literal_is_allowed() -> None:
    spec = PermutationSpec(filter="name = 'a;b'")
    assert spec.filter == "name = 'a;b'"


def test_shuffle_clump_size_below_one_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"shuffle\.clump_size"):
        _define(shuffle={"clump_size": 0})


def test_discard_is_accepted_when_explicit() -> None:
    split = RandomSplit(ratios=[0.5, 0.3], allow_discard=True)
    assert split.num_splits == 2
    assert split.names() == ["split_0", "split_1"]


def test_fixed_is_sent_as_equal_ratios() -> None:
    # lancedb's own fixed=k drops n mod k rows; equal ratios keep them all.
    assert SequentialSplit(fixed=4).builder_sizes() == ([0.25, 0.25, 0.25, 0.25], None)
    assert RandomSplit(counts=[3, 2]).builder_sizes() == (None, [3, 2])


def test_calculated_split_counts_from_names() -> None:
    split = CalculatedSplit(expression="id % 2", split_names=["even", "odd"])
    assert split.num_splits == 2
    with pytest.raises(ValueError, match="has 3 names but the split makes 2"):
        CalculatedSplit(expression="id % 2", splits=2, split_names=["a", "b", "c"])


def test_resolve_seeds_fills_only_unset_seeds() -> None:
    spec = PermutationSpec(split=RandomSplit(ratios=[0.5, 0.5], seed=3), shuffle=Shuffle())
    resolved = spec.resolve_seeds()
    assert isinstance(resolved.split, RandomSplit)
    assert resolved.split.seed == 3
    assert resolved.shuffle is not None and resolved.shuffle.seed is not None
    assert resolved.resolve_seeds() == resolved


def test_hash_split_defaults() -> None:
    split = HashSplit(columns=["id"], weights=[8, 2])
    assert split.discard_weight == 0
    assert split.names() == ["split_0", "split_1"]


def test_source_must_be_a_table_asset_not_a_permutation() -> None:
    perm = permutation_asset("first", source=SOURCE)
    with pytest.raises(SpecError, match=r"source 'first' is a permutation"):
        permutation_asset("second", source=perm)


def test_source_stored_by_another_io_manager_is_rejected() -> None:
    other = table_asset("elsewhere", 5, io_manager_key="fs_io")
    with pytest.raises(SpecError, match=r"stored by IO manager 'fs_io'"):
        permutation_asset("perm", source=other)


def test_source_of_the_wrong_type_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"source 42 is not an asset"):
        permutation_asset("perm", source=42)  # type: ignore[arg-type]
