"""A randomized soak: 36 cycles of writes, re-splits, maintenance and re-created tables, with a
consumer reading after every cycle and a past run reproduced. Every read must return exactly
the rows of the versions it claims, or fail with a clear error; never other rows.

The shadow model knows the content of every (table incarnation, Lance version) of the base
table: ``id`` is unique within a version and ``value`` changes on every update, so a row read
from any other version, or from a re-created table, is caught by its (id, value) pair.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
from lancedb.permutation import Permutation

from perm_assets import (
    LanceDBResource,
    RandomSplit,
    Shuffle,
    SpecError,
    TableNotFoundError,
    permutation_asset,
)
from perm_assets.errors import LineageError
from perm_assets.lineage import reproduce_input
from perm_assets.pins import retain
from perm_assets.views import read_arrow
from tests.conftest import Runner

SEED = 20261129
CYCLES = 36
CLEAR = (LineageError, TableNotFoundError, SpecError)
"""What a refused read may raise; its message must name the asset."""


def _content(ids: np.ndarray, generation: int) -> pa.Table:
    return pa.table({"id": ids.astype(np.int64), "value": (ids * 10 + generation).astype(np.int64)})


SOURCE: dict[str, pa.Table] = {"data": _content(np.arange(100), 0)}


@dg.asset(name="rows")
def rows() -> pa.Table:
    return SOURCE["data"]


SPLITS = permutation_asset(
    "splits",
    source=rows,
    split=RandomSplit(ratios=[0.6, 0.2, 0.2], seed=1, split_names=["train", "val", "test"]),
    shuffle=Shuffle(seed=2),
)
READS: list[tuple[str, list[tuple[int, int]]]] = []


@dg.asset(
    name="reader",
    ins={"train": dg.AssetIn(key=SPLITS.key, metadata={"split": "train", "format": "arrow"})},
)
def reader(context, train: Permutation) -> None:
    data = read_arrow(train)
    pairs = list(zip(data.column("id").to_pylist(), data.column("value").to_pylist(), strict=True))
    READS.append((context.run.run_id, pairs))


@dataclass
class Shadow:
    """What the base table holds at every (incarnation, version), and what each permutation
    version was built on."""

    incarnation: int = 0
    perm_incarnation: int = 0
    generation: int = 0
    rows: dict[tuple[int, int], frozenset[tuple[int, int]]] = field(default_factory=dict)
    built_on: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    split_rows: dict[tuple[int, int], int] = field(default_factory=dict)
    next_id: int = 100

    def record(self, db: LanceDBResource) -> None:
        """The base table's latest version, as it is now."""
        table = db.open_table("rows")
        data = table.to_arrow()
        pairs = zip(data.column("id").to_pylist(), data.column("value").to_pylist(), strict=True)
        self.rows[(self.incarnation, table.version)] = frozenset(pairs)


class Soak:
    def __init__(self, run: Runner, db: LanceDBResource) -> None:
        self.run, self.db = run, db
        self.rng = random.Random(SEED)
        self.shadow = Shadow()
        self.problems: list[str] = []
        self.refused: dict[str, int] = {}
        self.log: list[str] = []
        self.reads: list[tuple[str, list[tuple[int, int]]]] = []
        self.cycle = 0

    # -------------------------------------------------------------------------------- ops
    def materialize_source(self) -> None:
        self.shadow.generation += 1
        n = self.rng.randint(60, 140)
        ids = np.arange(self.shadow.next_id, self.shadow.next_id + n)
        self.shadow.next_id += n
        SOURCE["data"] = _content(ids, self.shadow.generation)
        self._dagster([rows, SPLITS, reader], [rows])
        self.shadow.record(self.db)

    def append(self) -> None:
        n = self.rng.randint(5, 30)
        ids = np.arange(self.shadow.next_id, self.shadow.next_id + n)
        self.shadow.next_id += n
        self.db.connect().open_table("rows").add(_content(ids, self.shadow.generation))
        self.shadow.record(self.db)

    def update(self) -> None:
        self.shadow.generation += 1
        table = self.db.connect().open_table("rows")
        modulus = self.rng.randint(2, 5)
        table.update(
            where=f"id % {modulus} = 0", values_sql={"value": f"id * 10 + {self.shadow.generation}"}
        )
        self.shadow.record(self.db)

    def delete(self) -> None:
        table = self.db.connect().open_table("rows")
        if table.count_rows() > 40:
            table.delete(f"id % {self.rng.randint(3, 7)} = 1")
        self.shadow.record(self.db)

    def resplit(self) -> None:
        config = {"ops": {"splits": {"config": {"seed": self.rng.randint(0, 10**6)}}}}
        if self._dagster([rows, SPLITS, reader], [SPLITS], run_config=config):
            meta = self.run.metadata("splits")
            key = (self.shadow.perm_incarnation, int(meta["lance/version"]))
            base = (self.shadow.incarnation, int(meta["lance/base_version"]))
            self.shadow.built_on[key] = base
            self.shadow.split_rows[key] = int(meta["rows/train"])

    def compact(self) -> None:
        table = self.db.connect().open_table("rows")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table.optimize()
        self.shadow.record(self.db)

    def cleanup(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in ("rows", "splits"):
                if self.db.table_exists(name):
                    try:
                        self.db.connect().open_table(name).optimize(cleanup_older_than=timedelta(0))
                    except RuntimeError as exc:  # Lance refuses around tagged versions
                        if "tagged version" not in str(exc):
                            raise
        if self.db.table_exists("rows"):
            self.shadow.record(self.db)

    def retain(self) -> None:
        retain(
            self.db,
            keep=self.rng.randint(1, 2),
            cleanup_older_than=timedelta(0),
            instance=self.run.instance,
        )
        self.shadow.record(self.db)

    def recreate_base(self) -> None:
        """Drop and re-create the base table: same ids, other values, versions from 1."""
        old = self.db.open_table("rows").to_arrow()
        self.shadow.generation += 1
        self.shadow.incarnation += 1
        connection = self.db.connect()
        connection.drop_table("rows")
        connection.create_table(
            "rows", _content(old.column("id").to_numpy(), self.shadow.generation)
        )
        self.shadow.record(self.db)

    def recreate_permutation(self) -> None:
        """Drop and re-create the permutation table with its rows reversed, metadata kept."""
        if not self.db.table_exists("splits"):
            return
        old = self.db.open_table("splits").to_arrow()
        connection = self.db.connect()
        connection.drop_table("splits")
        connection.create_table("splits", old.take(np.arange(old.num_rows)[::-1]))
        self.shadow.perm_incarnation += 1

    OPS = (
        "materialize_source",
        "append",
        "update",
        "delete",
        "resplit",
        "compact",
        "cleanup",
        "retain",
        "recreate_base",
        "recreate_permutation",
    )

    # ----------------------------------------------------------------------------- checks
    def consume(self) -> None:
        READS.clear()
        if not self._dagster([rows, SPLITS, reader], [reader]):
            return
        run_id, pairs = READS[-1]
        meta = self._lineage(run_id)
        key = (self.shadow.perm_incarnation, int(meta["table_version"]))
        base = self.shadow.built_on.get(key)
        if base is None:
            self._problem(f"read {key}, a permutation version the soak never built")
            return
        expected = self.shadow.rows.get(base, frozenset())
        wrong = [p for p in pairs if p not in expected]
        ids = [i for i, _ in pairs]
        if wrong or len(set(ids)) != len(ids) or len(pairs) != self.shadow.split_rows[key]:
            self._problem(
                f"consumer read {len(pairs)} rows of permutation {key} over base {base}: "
                f"{len(wrong)} not in that version (e.g. {wrong[:3]}), "
                f"{len(ids) - len(set(ids))} duplicates, {self.shadow.split_rows[key]} expected"
            )
        self.reads.append((run_id, pairs))

    def reproduce(self) -> None:
        if not self.reads:
            return
        run_id, pairs = self.rng.choice(self.reads)
        try:
            view = reproduce_input(self.db, self.run.instance, run_id=run_id, input_name="train")
            data = read_arrow(view)
        except CLEAR as exc:
            self._refusal("reproduce", exc)
            return
        except Exception as exc:
            self._problem(f"reproduce {run_id[:8]}: unclear {type(exc).__name__}: {exc}")
            return
        got = list(
            zip(data.column("id").to_pylist(), data.column("value").to_pylist(), strict=True)
        )
        if got != pairs:
            self._problem(
                f"reproduce {run_id[:8]}: {len(got)} rows differ from the {len(pairs)} read"
            )

    # ---------------------------------------------------------------------------- plumbing
    def _dagster(self, assets: list[Any], selection: list[Any], **kwargs: Any) -> bool:
        try:
            self.run(assets, selection=selection, **kwargs)
        except CLEAR as exc:
            self._refusal(selection[0].key.to_user_string(), exc)
            return False
        except Exception as exc:
            self._problem(
                f"run of {selection[0].key.to_user_string()}: unclear {type(exc).__name__}: {exc}"
            )
            return False
        return True

    def _refusal(self, what: str, exc: Exception) -> None:
        if "asset '" not in str(exc):
            self._problem(f"{what}: {type(exc).__name__} without the asset's name: {exc}")
            return
        self.refused[type(exc).__name__] = self.refused.get(type(exc).__name__, 0) + 1
        self.log.append(f"  refused ({what}): {type(exc).__name__}: {str(exc)[:160]}")

    def _problem(self, text: str) -> None:
        self.problems.append(f"cycle {self.cycle}: {text}")

    def _lineage(self, run_id: str) -> dict[str, Any]:
        entries = self.run.instance.all_logs(run_id, of_type=dg.DagsterEventType.LOADED_INPUT)
        for entry in entries:
            event = entry.dagster_event
            metadata = getattr(event.event_specific_data, "metadata", {}) if event else {}
            if "lineage/table_version" in metadata:
                return {k.removeprefix("lineage/"): v.value for k, v in metadata.items()}
        raise AssertionError(f"run {run_id} recorded no lineage")


@pytest.mark.slow
def test_soak_never_returns_other_rows(run: Runner, db: LanceDBResource) -> None:
    SOURCE["data"] = _content(np.arange(100), 0)
    soak = Soak(run, db)
    run([rows])
    soak.shadow.record(db)
    soak.resplit()
    weights = [4, 3, 2, 2, 4, 1, 1, 1, 1, 1]
    done: dict[str, int] = {}
    for cycle in range(CYCLES):
        soak.cycle = cycle
        for op in soak.rng.choices(Soak.OPS, weights=weights, k=3):
            soak.log.append(f"cycle {cycle}: {op}")
            getattr(soak, op)()
            done[op] = done.get(op, 0) + 1
        soak.consume()
        soak.reproduce()
        if cycle % 6 == 5:  # the pipeline recovers: source and split materialized again
            soak.materialize_source()
            soak.resplit()
    summary = f"ops {done}, reads {len(soak.reads)}, refused {soak.refused}"
    print(summary)  # noqa: T201 (shown with -s: what the soak exercised)
    report = "\n".join([summary, *soak.problems, "op log:", *soak.log[-60:]])
    assert soak.problems == [], report
    assert set(done) == set(Soak.OPS), done  # every operation was exercised
    assert len(soak.reads) >= CYCLES // 3, (len(soak.reads), soak.refused)  # reads did happen
    assert soak.refused, "no re-created table was ever refused: the soak tested nothing there"
