"""Stored tables → `Permutation` views pinned to exact Lance versions.

A view is lancedb's own `Permutation` (a subclass, so it passes ``isinstance`` and fits
PyTorch's Dataset contract) with two differences: plain iteration yields every row (lancedb
drops a last partial batch, so an 80-row split at the default batch of 100 yields nothing), and
it carries its `ViewLineage`: which asset, table versions, split and columns it reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast, get_args

import pyarrow as pa
from lancedb.permutation import Permutation
from lancedb.table import Table
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from perm_assets.errors import SpecError
from perm_assets.folds import FOLDS_KIND, fold_index
from perm_assets.resources import LanceDBResource
from perm_assets.tables import (
    BASE_TABLE_KEY,
    BASE_VERSION_KEY,
    KIND_META_KEY,
    SPLIT_NAMES_KEY,
    TRAIN_TABLE_KEY,
    TRAIN_VERSION_KEY,
    is_permutation_schema,
)

ViewFormat = Literal[
    "numpy", "python", "python_col", "pandas", "arrow", "torch", "torch_row", "torch_col", "polars"
]
"""Batch formats of `Permutation.with_format`."""

VIEW_FORMATS: tuple[str, ...] = get_args(ViewFormat)


class ViewRequest(BaseModel):
    """What a downstream asset asks of an upstream: ``dg.AssetIn(metadata={...})``.

    Example: ``{"split": "train", "columns": ["image", "label"], "format": "arrow"}``.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    split: str | int | list[str | int] | None = Field(
        default=None,
        description=(
            "Split name or index; required when the permutation has several splits. A list "
            "(e.g. ['train', 'test']) loads a dict of views by split name."
        ),
    )
    fold: str | int | None = Field(
        default=None,
        description=(
            "For a folds asset with split 'train' or 'validation': which fold ('fold_2' or 2). "
            "None: the downstream asset's partition key (partition it with fold_partitions)."
        ),
    )
    columns: list[str] | None = Field(
        default=None, min_length=1, description="Columns to read; None reads all of them."
    )
    format: ViewFormat | None = Field(
        default=None, description="Batch format (`Permutation.with_format`); None: 'python'."
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Rows per batch when iterating; None: lancedb's 100."
    )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, asset: str) -> ViewRequest:
        """Parse input metadata, naming the asset and the allowed values on error."""
        try:
            return cls.model_validate(dict(metadata))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}={err.get('input')!r}: {err['msg']}"
                for err in exc.errors()
            )
            raise SpecError(
                f"input from asset '{asset}': invalid view request ({problems}). Allowed: "
                "split (name or index), fold (for folds assets), columns (list of names), "
                f"format (one of {', '.join(VIEW_FORMATS)}), batch_size (>= 1)"
            ) from exc


@dataclass(frozen=True)
class ViewLineage:
    """Exactly what a view reads: enough to open the same rows again later.

    ``table``/``table_version`` is the permutation table (or, for an identity view of a table
    asset, the table itself); ``base_table``/``base_version`` is where the row data comes from.
    """

    asset: str
    uri: str
    table: str
    table_version: int
    base_table: str
    base_version: int
    split: str | None
    split_index: int

    def as_metadata(self, columns: list[str] | None = None) -> dict[str, Any]:
        """Flat ``lineage/*`` entries for a Dagster materialization."""
        out: dict[str, Any] = {f"lineage/{k}": v for k, v in asdict(self).items() if v is not None}
        if columns is not None:
            out["lineage/columns"] = ", ".join(columns)
        return out


class PermutationView(Permutation):
    """A `Permutation` of an asset's stored rows, pinned to the versions in `lineage`."""

    lineage: ViewLineage

    def __copy__(self) -> PermutationView:
        # lancedb's with_* methods call copy.copy, which would otherwise go through
        # __getstate__ (reading the whole permutation table into Arrow) and lose `lineage`.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __iter__(self) -> Iterator[Any]:
        # lancedb's __iter__ skips a short last batch; a training view must not lose rows.
        return self.iter(self.batch_size, skip_last_batch=False)

    @property
    def selected_columns(self) -> list[str]:
        """The columns this view reads, in order."""
        return list(self.selection)

    def lineage_metadata(self) -> dict[str, Any]:
        """Lineage plus selected columns and row count, for the consumer's materialization."""
        return {
            **self.lineage.as_metadata(self.selected_columns),
            "lineage/rows": self.num_rows,
        }


def split_names_of(schema: pa.Schema) -> list[str]:
    """Split names recorded in a permutation table's schema (empty when unnamed)."""
    raw = (schema.metadata or {}).get(SPLIT_NAMES_KEY.encode())
    return list(json.loads(raw)) if raw else []


def resolve_split(split: str | int | None, names: list[str], num_splits: int, *, asset: str) -> int:
    """Index of the requested split, or a SpecError listing the splits there are."""
    listed = ", ".join(f"'{n}'" for n in names) or f"indices 0..{num_splits - 1}"
    if split is None:
        if num_splits == 1:
            return 0
        raise SpecError(
            f"asset '{asset}' has {num_splits} splits ({listed}); ask for one with "
            "dg.AssetIn(metadata={'split': ...})"
        )
    if isinstance(split, str):
        if split in names:
            return names.index(split)
        raise SpecError(f"split '{split}' is not in asset '{asset}' (splits: {listed})")
    if 0 <= split < num_splits:
        return split
    raise SpecError(f"split index {split} is out of range for asset '{asset}' (splits: {listed})")


def open_view(
    db: LanceDBResource,
    *,
    asset: str,
    table: str,
    version: int | None,
    request: ViewRequest | None = None,
    partition_key: str | None = None,
) -> PermutationView:
    """The view ``request`` asks for over ``table`` at Lance ``version`` (None: latest).

    A permutation table gives a view of one of its splits over its base table at the pinned
    base version; any other table gives its identity view (all rows in stored order). For a
    folds table, split ``'train'``/``'validation'`` reads fold ``request.fold``, else the fold
    named by ``partition_key`` (the consumer's partition).
    """
    request = request or ViewRequest()
    if isinstance(request.split, list):
        raise SpecError(
            f"input from asset '{asset}': split={request.split!r} asks for several splits; "
            "annotate the parameter as dict[str, Permutation] to receive one view per split"
        )
    stored = db.open_table(table, version=version)
    fold = request.fold if request.fold is not None else partition_key
    view = _open_split(db, stored, request.split, asset=asset, fold=fold)
    return refine(view, request, asset=asset)


def open_split_views(
    db: LanceDBResource,
    *,
    asset: str,
    table: str,
    version: int | None,
    request: ViewRequest,
    partition_key: str | None = None,
) -> dict[str, PermutationView]:
    """One view per split in ``request.split`` (a list; None: every split), keyed by name.

    Dagster maps each input to a distinct upstream asset, so a consumer that needs ``train``
    and ``test`` of one permutation asset takes both through one input.
    """
    stored = db.open_table(table, version=version)
    wanted = request.split
    if wanted is None:
        names = split_names_of(stored.schema) if is_permutation_schema(stored.schema) else []
        wanted = list(names) or [0]
    elif not isinstance(wanted, list):
        wanted = [wanted]
    fold = request.fold if request.fold is not None else partition_key
    views = {}
    for split in wanted:
        view = refine(_open_split(db, stored, split, asset=asset, fold=fold), request, asset=asset)
        # Keyed as asked ("train", "validation"), else by the split's recorded name.
        key = split if isinstance(split, str) else view.lineage.split or str(split)
        views[key] = view
    return views


def _open_split(
    db: LanceDBResource,
    stored: Table,
    split: str | int | None,
    *,
    asset: str,
    fold: str | int | None = None,
) -> PermutationView:
    if is_permutation_schema(stored.schema):
        role = None
        if split in FOLD_SPLITS and _kind_of(stored.schema) == FOLDS_KIND:
            role = str(split)
            stored, split = _fold_table(db, stored, role, fold, asset=asset)
        view, lineage = _permutation_view(db, asset=asset, stored=stored, split=split)
        if role is not None:  # e.g. "fold_2/train": fold 2's training rows
            lineage = replace(lineage, split=f"{lineage.split}/{role}")
    else:
        if split not in (None, 0):
            raise SpecError(
                f"split {split!r} was asked of asset '{asset}', which is a table, not a "
                "permutation: it has one implicit split; drop 'split' or read a permutation asset"
            )
        view = PermutationView.from_tables(stored, None, None)
        lineage = ViewLineage(
            asset=asset,
            uri=db.uri,
            table=stored.name,
            table_version=stored.version,
            base_table=stored.name,
            base_version=stored.version,
            split=None,
            split_index=0,
        )
    view = _as_view(view)
    view.lineage = lineage
    return view


FOLD_SPLITS = ("train", "validation")
"""What a fold-partitioned consumer asks of a folds asset: fold i's training or validation rows."""


def _kind_of(schema: pa.Schema) -> str | None:
    raw = (schema.metadata or {}).get(KIND_META_KEY.encode())
    return raw.decode() if raw is not None else None


def _fold_table(
    db: LanceDBResource, stored: Table, split: str, fold: str | int | None, *, asset: str
) -> tuple[Table, int]:
    """The table and split index holding fold ``fold``'s ``split`` rows of a folds table."""
    names = split_names_of(stored.schema)
    if fold is None:
        raise SpecError(
            f"input from folds asset '{asset}' asks for split '{split}' but not which fold: "
            "partition the consuming asset with fold_partitions(...) or add "
            "metadata={'fold': 'fold_0'} (folds: " + ", ".join(names) + ")"
        )
    index = fold_index(fold, len(names), asset=asset)
    if split == "validation":
        return stored, index
    metadata = stored.schema.metadata or {}
    train_name = metadata[TRAIN_TABLE_KEY.encode()].decode()
    train_version = int(metadata[TRAIN_VERSION_KEY.encode()])
    return db.open_table(train_name, version=train_version), index


def refine(view: PermutationView, request: ViewRequest, *, asset: str) -> PermutationView:
    """Apply columns, format and batch size, naming the asset on a bad column."""
    if request.columns is not None:
        available = view.selected_columns
        missing = [c for c in request.columns if c not in available]
        if missing:
            raise SpecError(
                f"columns {missing} are not in asset '{asset}' (columns: {', '.join(available)})"
            )
        view = _as_view(view.select_columns(list(request.columns)))
    if request.format is not None:
        view = _as_view(view.with_format(request.format))
    if request.batch_size is not None:
        view = _as_view(view.with_batch_size(request.batch_size))
    return view


def iter_arrow(view: Permutation, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Every row of ``view`` in view order as Arrow batches of ``batch_rows`` (last shorter)."""
    batches = view.with_format("arrow").iter(batch_rows, skip_last_batch=False)
    return cast(Iterator[pa.RecordBatch], batches)


def read_arrow(view: Permutation, *, batch_rows: int = 65_536) -> pa.Table:
    """All rows of ``view`` in view order as one Arrow table (for explicit, small reads)."""
    return pa.Table.from_batches(list(iter_arrow(view, batch_rows)), schema=view.schema)


def _permutation_view(
    db: LanceDBResource, *, asset: str, stored: Table, split: str | int | None
) -> tuple[Permutation, ViewLineage]:
    metadata = stored.schema.metadata or {}
    base_name_raw = metadata.get(BASE_TABLE_KEY.encode())
    if base_name_raw is None:
        raise SpecError(
            f"permutation table '{stored.name}' of asset '{asset}' does not record its base "
            f"table ({BASE_TABLE_KEY}); persist it through LanceDBIOManager"
        )
    base_name = base_name_raw.decode()
    base_version = int(metadata[BASE_VERSION_KEY.encode()])
    names = split_names_of(stored.schema)
    num_splits = len(names) or 1
    index = resolve_split(split, names, num_splits, asset=asset)
    base = db.open_table(base_name, version=base_version)
    view = PermutationView.from_tables(base, stored, index)
    lineage = ViewLineage(
        asset=asset,
        uri=db.uri,
        table=stored.name,
        table_version=stored.version,
        base_table=base_name,
        base_version=base_version,
        split=names[index] if names else None,
        split_index=index,
    )
    return view, lineage


def _as_view(view: Permutation) -> PermutationView:
    # Permutation's with_* methods copy the instance, so the subclass and lineage survive.
    assert isinstance(view, PermutationView)
    return view
