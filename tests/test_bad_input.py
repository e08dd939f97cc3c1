"""Bad input found at materialization time: a clear error, and the previous version untouched.

(Mistakes visible at definition time are covered in ``test_specs.py``.)
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest

from perm_assets import (
    CalculatedSplit,
    LanceDBResource,
    RandomSplit,
    SpecError,
    permutation_asset,
)
from tests.conftest import Runner, table_asset

SOURCE = table_asset("rows", 100)


def _materialize_good_then(
    run: Runner, db: LanceDBResource, bad_config: dict[str, Any], message: str
) -> None:
    """Materialize a good version, fail a run with ``bad_config``, check the good one stays."""
    perm = permutation_asset(
        "perm", source=SOURCE, filter="label < 5", split=RandomSplit(ratios=[0.5, 0.5], seed=1)
    )
    run([SOURCE, perm])
    version = db.open_table("perm").version
    before = db.open_table("perm").to_arrow()

    with pytest.raises(SpecError, match=message) as info:
        run([SOURCE, perm], selection=[perm], run_config={"ops": {"perm": {"config": bad_config}}})
    assert "asset 'perm'" in str(info.value)

    after = db.open_table("perm")
    assert after.version == version
    assert after.to_arrow().equals(before)
    assert run.metadata("perm")["lance/version"] == version


def test_filter_on_an_unknown_column_lists_the_columns(run: Runner, db: LanceDBResource) -> None:
    _materialize_good_then(
        run,
        db,
        {"filter": "colour = 'red'"},
        r"filter \"colour = 'red'\" is not valid on table 'rows' \(columns: id, label, group, "
        r"value, name\)",
    )


def test_filter_with_a_syntax_error_fails_before_any_write(
    run: Runner, db: LanceDBResource
) -> None:
    _materialize_good_then(run, db, {"filter": "label >"}, r"filter 'label >' is not valid")


def test_filter_that_selects_nothing_fails_the_materialization(
    run: Runner, db: LanceDBResource
) -> None:
    _materialize_good_then(
        run,
        db,
        {"filter": "label > 1000"},
        r"filter 'label > 1000' selects no rows of table 'rows' \(version 1, 100 rows\)",
    )


def test_filter_with_a_second_statement_from_the_launchpad_is_rejected(
    run: Runner, db: LanceDBResource
) -> None:
    _materialize_good_then(run, db, {"filter": "label < 5; DROP TABLE rows"}, r"contains ';'")


def test_ratios_from_the_launchpad_are_validated_like_the_factory(
    run: Runner, db: LanceDBResource
) -> None:
    _materialize_good_then(run, db, {"ratios": [0.5, -0.5]}, r"every ratio must be a number")
    _materialize_good_then(run, db, {"ratios": [0.4, 0.4]}, r"below 1.*allow_discard")


def test_a_split_that_would_be_empty_fails(run: Runner, db: LanceDBResource) -> None:
    tiny = permutation_asset(
        "tiny",
        source=SOURCE,
        filter="id < 3",
        split=RandomSplit(ratios=[0.9, 0.05, 0.05], seed=1),
    )
    with pytest.raises(SpecError, match=r"asset 'tiny': .*5% of 3 rows which rounds to 0 rows"):
        run([SOURCE, tiny])
    # lancedb does not check a calculated split; an empty split would fail only when read.
    unused = permutation_asset(
        "unused",
        source=SOURCE,
        split=CalculatedSplit(expression="id % 2", split_names=["even", "odd", "never"]),
    )
    with pytest.raises(
        SpecError,
        match=r"asset 'unused': split\(s\) \['never'\] would be empty \(rows per split: "
        r"\{'even': 50, 'odd': 50, 'never': 0\}\)",
    ):
        run([SOURCE, unused], selection=[unused])
    assert not db.table_exists("tiny") and not db.table_exists("unused")


def test_calculated_split_outside_the_declared_range_fails(
    run: Runner, db: LanceDBResource
) -> None:
    # lancedb accepts split ids beyond split_names silently; such rows would be unreachable.
    perm = permutation_asset(
        "perm", source=SOURCE, split=CalculatedSplit(expression="id % 3", split_names=["a", "b"])
    )
    with pytest.raises(
        SpecError, match=r"split id 2 is outside 0\.\.1, but only 2 splits \(\['a', 'b'\]\)"
    ):
        run([SOURCE, perm])
    assert not db.table_exists("perm")


def test_a_permutation_used_as_source_by_key_is_rejected_at_run_time(run: Runner) -> None:
    first = permutation_asset("first", source=SOURCE)
    # By key, the factory cannot see that 'first' is a permutation; loading it as a Table can.
    second = permutation_asset("second", source="first")
    with pytest.raises(SpecError, match=r"asset 'first' is a permutation table, not a LanceDB"):
        run([SOURCE, first, second])


def test_a_source_that_is_no_lancedb_table_fails_clearly(run: Runner) -> None:
    @dg.asset(name="elsewhere", io_manager_key="mem")
    def elsewhere() -> list[int]:
        return [1, 2, 3]

    with pytest.raises(SpecError, match=r"source 'elsewhere' is stored by IO manager 'mem'"):
        permutation_asset("perm", source=elsewhere)
