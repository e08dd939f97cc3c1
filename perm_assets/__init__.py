"""perm_assets: LanceDB permutation tables (filters, splits, shuffles, folds) as Dagster assets.

Importing this package has no side effects: nothing connects, reads or writes until a run.
Its names load on first use (PEP 562), so ``import perm_assets.reader`` (a forked DataLoader
worker's read helper, `perm_assets.forked`) does not pay for dagster's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from perm_assets.build import PermutationData, build_permutation
    from perm_assets.components import FoldsComponent, PermutationComponent
    from perm_assets.errors import SpecError, TableNotFoundError
    from perm_assets.factories import (
        fold_partitions,
        folds_asset,
        permutation_asset,
        permutation_data_version,
    )
    from perm_assets.folds import FoldsData
    from perm_assets.io_manager import LanceDBIOManager
    from perm_assets.resources import LanceDBResource
    from perm_assets.specs import (
        CalculatedSplit,
        FoldsSpec,
        GroupKFold,
        GroupSplit,
        HashSplit,
        KFold,
        PermutationSpec,
        RandomSplit,
        SequentialSplit,
        Shuffle,
        StratifiedKFold,
        StratifiedSplit,
        TimeSeriesFolds,
        TimeSplit,
    )
    from perm_assets.tables import WriteMode, table_name
    from perm_assets.views import PermutationView, ViewLineage, ViewRequest, open_view
    from perm_assets.wiring import check_definitions

_EXPORTS: dict[str, str] = {
    "CalculatedSplit": "perm_assets.specs",
    "FoldsComponent": "perm_assets.components",
    "FoldsData": "perm_assets.folds",
    "FoldsSpec": "perm_assets.specs",
    "GroupKFold": "perm_assets.specs",
    "GroupSplit": "perm_assets.specs",
    "HashSplit": "perm_assets.specs",
    "KFold": "perm_assets.specs",
    "LanceDBIOManager": "perm_assets.io_manager",
    "LanceDBResource": "perm_assets.resources",
    "PermutationComponent": "perm_assets.components",
    "PermutationData": "perm_assets.build",
    "PermutationSpec": "perm_assets.specs",
    "PermutationView": "perm_assets.views",
    "RandomSplit": "perm_assets.specs",
    "SequentialSplit": "perm_assets.specs",
    "Shuffle": "perm_assets.specs",
    "SpecError": "perm_assets.errors",
    "StratifiedKFold": "perm_assets.specs",
    "StratifiedSplit": "perm_assets.specs",
    "TableNotFoundError": "perm_assets.errors",
    "TimeSeriesFolds": "perm_assets.specs",
    "TimeSplit": "perm_assets.specs",
    "ViewLineage": "perm_assets.views",
    "ViewRequest": "perm_assets.views",
    "WriteMode": "perm_assets.tables",
    "build_permutation": "perm_assets.build",
    "check_definitions": "perm_assets.wiring",
    "fold_partitions": "perm_assets.factories",
    "folds_asset": "perm_assets.factories",
    "open_view": "perm_assets.views",
    "permutation_asset": "perm_assets.factories",
    "permutation_data_version": "perm_assets.factories",
    "table_name": "perm_assets.tables",
}
"""Each public name and the module that defines it."""

__all__ = [
    "CalculatedSplit",
    "FoldsComponent",
    "FoldsData",
    "FoldsSpec",
    "GroupKFold",
    "GroupSplit",
    "HashSplit",
    "KFold",
    "LanceDBIOManager",
    "LanceDBResource",
    "PermutationComponent",
    "PermutationData",
    "PermutationSpec",
    "PermutationView",
    "RandomSplit",
    "SequentialSplit",
    "Shuffle",
    "SpecError",
    "StratifiedKFold",
    "StratifiedSplit",
    "TableNotFoundError",
    "TimeSeriesFolds",
    "TimeSplit",
    "ViewLineage",
    "ViewRequest",
    "WriteMode",
    "build_permutation",
    "check_definitions",
    "fold_partitions",
    "folds_asset",
    "open_view",
    "permutation_asset",
    "permutation_data_version",
    "table_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'perm_assets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
