"""perm_assets: LanceDB permutation tables (filters, splits, shuffles, folds) as Dagster assets.

Importing this package has no side effects: nothing connects, reads or writes until a run.
"""

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
