"""Fixture chain on tmp_path: LanceDB resource → IO manager → Dagster instance → materialize."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest

from perm_assets import LanceDBIOManager, LanceDBResource


def make_rows(n: int, *, start: int = 0, classes: int = 10) -> pa.Table:
    """``n`` deterministic rows: ``id`` start.., ``label`` id % classes, ``group`` id // 7,
    ``value`` a float derived from id, ``name`` a string."""
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "label": ids % classes,
            "group": ids // 7,
            "value": (ids * 0.5).astype(np.float64),
            "name": pa.array([f"row{i}" for i in range(start, start + n)]),
        }
    )


def table_asset(name: str, n: int, **kwargs: Any) -> dg.AssetsDefinition:
    """A LanceDB table asset returning ``make_rows(n)``."""

    def _table() -> pa.Table:
        return make_rows(n)

    return dg.asset(name=name, **kwargs)(_table)


@pytest.fixture
def db(tmp_path) -> LanceDBResource:
    return LanceDBResource(uri=str(tmp_path / "lancedb"))


@pytest.fixture
def resources(db: LanceDBResource) -> dict[str, Any]:
    return {"lancedb": db, "io_manager": LanceDBIOManager(db=db)}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


class Runner:
    """``dg.materialize`` with the test's resources and one instance across calls."""

    def __init__(self, resources: dict[str, Any], instance: dg.DagsterInstance) -> None:
        self.resources = resources
        self.instance = instance

    def __call__(
        self,
        assets: Sequence[dg.AssetsDefinition | dg.SourceAsset],
        *,
        selection: Sequence[dg.AssetsDefinition | dg.SourceAsset] | None = None,
        run_config: dict[str, Any] | None = None,
        raise_on_error: bool = True,
        partition_key: str | None = None,
    ) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            assets,
            resources=self.resources,
            instance=self.instance,
            selection=selection,
            run_config=run_config,
            raise_on_error=raise_on_error,
            partition_key=partition_key,
        )

    def metadata(self, key: dg.AssetKey | str) -> dict[str, Any]:
        """Metadata values of the asset's latest materialization."""
        mat = self._latest(key)
        return {k: v.value for k, v in mat.metadata.items()}

    def data_version(self, key: dg.AssetKey | str) -> str:
        tags = self._latest(key).tags or {}
        return tags["dagster/data_version"]

    def _latest(self, key: dg.AssetKey | str) -> dg.AssetMaterialization:
        asset_key = dg.AssetKey.from_user_string(key) if isinstance(key, str) else key
        event = self.instance.get_latest_materialization_event(asset_key)
        assert event is not None and event.asset_materialization is not None
        return event.asset_materialization


@pytest.fixture
def run(resources: dict[str, Any], instance: dg.DagsterInstance) -> Runner:
    return Runner(resources, instance)


def row_ids(data: pa.Table, split: int | None = None) -> list[int]:
    """Row ids of a permutation table, optionally of one split, in stored order."""
    ids = data.column("row_id").to_numpy()
    if split is not None:
        ids = ids[data.column("split_id").to_numpy() == split]
    return ids.tolist()
