"""`LanceDBIOManager`: persists table and permutation outputs, loads pinned views.

Outputs (by value type):
- ``pyarrow.Table`` / ``pyarrow.RecordBatchReader`` (streamed) / ``pandas.DataFrame``: one new
  version of the table named after the asset key (overwrite, or ``metadata={"write_mode":
  "append"}`` on the asset).
- `PermutationData` (from `permutation_asset`) or lancedb's in-memory builder result: one new
  version of the permutation table, its ``split_names``/``base_version`` metadata kept; rows
  an engine writes itself (``PermutationData.fragments``: the Ray engine's workers) are
  committed as that version (`commit_fragments`), never passing through this process.

Inputs (by the downstream parameter's annotation), always at the Lance version that the
upstream's latest materialization recorded:
- `Permutation` (also the default): a `PermutationView`, refined by ``dg.AssetIn(metadata=...)``
  keys ``split``, ``columns``, ``format``, ``batch_size``;
- ``lancedb.table.Table``: the table itself, checked out read-only (for building permutations);
- ``pyarrow.Table`` / ``pandas.DataFrame``: the view's rows read into memory, explicitly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, cast, get_origin

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
from lancedb.permutation import Permutation
from lancedb.table import LanceTable, Table
from pydantic import Field

from perm_assets.balance import (
    LABEL_META,
    count_balance,
    group_of,
    label_of,
    requested_shares,
    split_report,
)
from perm_assets.build import PermutationData, split_rows_of, with_permutation_metadata
from perm_assets.errors import SpecError
from perm_assets.folds import TRAIN_SUFFIX, FoldsData
from perm_assets.identity import verify_identity, version_stamp
from perm_assets.lineage import STAMP_KEY, lineage_of, recorded_identity
from perm_assets.pins import new_pin, pin
from perm_assets.reader import SPLIT_RANGES_KEY
from perm_assets.resources import LanceDBResource, StrictFields
from perm_assets.tables import (
    BASE_TABLE_KEY,
    BASE_VERSION_KEY,
    PIN_KEY,
    SOURCE_TABLE_KEY,
    WriteMode,
    commit_fragments,
    is_permutation_schema,
    read_all,
    table_name,
    write_table,
)
from perm_assets.views import (
    ViewRequest,
    open_split_views,
    open_view,
    read_arrow,
    split_names_of,
)

VERSION_KEY = "lance/version"
KIND_KEY = "perm_assets/kind"
WRITE_MODE_KEY = "write_mode"


class LanceDBIOManager(StrictFields, dg.ConfigurableIOManager):
    """Stores asset outputs as LanceDB tables and hands inputs back as pinned views.

    ``LanceDBIOManager(db=lancedb)`` shares a `LanceDBResource` with the ``lancedb`` key;
    ``LanceDBIOManager(uri="data/lancedb", storage_options={...})`` is the shortcut that builds
    one (as dagster-deltalake's ``root_uri``). Exactly one of ``db`` and ``uri``.
    """

    _SHORTCUTS: ClassVar[frozenset[str]] = frozenset({"uri", "storage_options"})

    db: LanceDBResource = Field(
        description="The LanceDB database the tables live in (share it with the 'lancedb' key)."
    )

    def __init__(
        self,
        *,
        db: LanceDBResource | None = None,
        uri: str | None = None,
        storage_options: dict[str, str] | None = None,
        **rest: Any,
    ) -> None:
        if db is not None and (uri is not None or storage_options is not None):
            raise SpecError(
                "LanceDBIOManager got both db= and uri=/storage_options=; give one: db= to share "
                "a LanceDBResource, or uri= (and storage_options=) to build one here"
            )
        if db is None:
            if uri is None:
                raise SpecError(
                    "LanceDBIOManager needs its database: give db=LanceDBResource(...) or "
                    "uri='data/lancedb' (with storage_options= for an object store)"
                )
            db = LanceDBResource(uri=uri, storage_options=storage_options or {})
        super().__init__(db=db, **rest)

    # ----------------------------------------------------------------------------- outputs
    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        asset = context.asset_key.to_user_string()
        name = table_name(context.asset_key)
        if isinstance(obj, FoldsData):
            self._write_folds(context, name, obj, asset=asset)
            return
        permutation = self._as_permutation(context, obj, asset=asset)
        if permutation is not None:
            self._write_permutation(context, name, permutation, asset=asset)
            return
        if isinstance(obj, pd.DataFrame):
            obj = _from_pandas(obj)
        if not isinstance(obj, pa.Table | pa.RecordBatchReader):
            raise TypeError(
                f"LanceDBIOManager cannot store asset '{asset}': it returned "
                f"{type(obj).__module__}.{type(obj).__qualname__}. Supported: pyarrow.Table, "
                "pyarrow.RecordBatchReader, pandas.DataFrame (a table), or a permutation "
                "(PermutationData from permutation_asset, or lancedb's permutation_builder(...)"
                ".execute()). Return one of these, or give the asset another io_manager_key."
            )
        mode = self._write_mode(context, asset=asset)
        table = write_table(self.db.connect(), name, obj, mode)
        rows = table.count_rows()
        # Counted against the version just before ours, not a count taken before writing:
        # another process may have appended in between.
        before = (
            self.db.open_table(name, version=table.version - 1).count_rows()
            if mode is WriteMode.APPEND and table.version > 1
            else 0
        )
        context.add_output_metadata(
            {
                **self._common_metadata(table),
                "dagster/row_count": rows,
                "dagster/column_schema": _column_schema(table.schema),
                "lance/write_mode": mode.value,
                "lance/rows_written": rows - before,
                KIND_KEY: "table",
            }
        )
        _set_data_version(context, dg.DataVersion(f"{table.name}@{table.version}"))

    def _write_folds(
        self, context: dg.OutputContext, name: str, folds: FoldsData, *, asset: str
    ) -> None:
        """Training table first, then the folds table that pins its version: a reader of any
        folds version finds exactly the training sets built with it."""
        self._require_overwrite(context, asset=asset)
        connection = self.db.connect()
        # The report reads the base first: a bad label= hint fails before anything is written.
        report = self._report(
            context, folds.validation, asset=asset, train_rows=list(folds.train_rows().values())
        )
        pin_name = new_pin(name)
        # The training table names the pin too, so its own views verify the base table's.
        # One split (id 0) of train_num_rows rows: readers size it without counting.
        ranges = json.dumps([[0, folds.train_num_rows]]).encode()
        train_meta = {PIN_KEY.encode(): pin_name.encode(), SPLIT_RANGES_KEY.encode(): ranges}
        if folds.train_fragments is not None:  # written by the engine's workers: commit them
            train = commit_fragments(
                connection,
                name + TRAIN_SUFFIX,
                folds.train_fragments,
                folds.train_schema(train_meta),
                storage_options=self.db.resolved_storage_options(),
            )
        else:
            train_data = folds.train_persistable(train_meta)
            train = write_table(connection, name + TRAIN_SUFFIX, train_data, WriteMode.OVERWRITE)
        data = folds.with_train_table(train.name, train.version)
        self._write_permutation(
            context,
            name,
            replace(folds.validation, data=data),
            asset=asset,
            pin_name=pin_name,
            also_pin=[train],
            report=report,
        )
        metadata: dict[str, Any] = {
            "perm_assets/k": folds.k,
            "perm_assets/train_table": train.name,
            "lance/train_version": train.version,
            "perm_assets/train_table_rows": folds.train_num_rows,
        }
        metadata.update({f"train_rows/{n}": r for n, r in folds.train_rows().items()})
        if folds.small_classes:
            metadata["perm_assets/small_classes"] = dg.MetadataValue.json(folds.small_classes)
        context.add_output_metadata(metadata)

    def _report(
        self,
        context: dg.OutputContext,
        perm: PermutationData,
        *,
        asset: str,
        train_rows: list[int] | None = None,
    ) -> dict[str, Any]:
        """The split table and balance chart (`perm_assets.balance`) of ``perm``."""
        hint = (context.definition_metadata or {}).get(LABEL_META)
        label = label_of(perm.spec, hint if isinstance(hint, str) else None)
        group = group_of(perm.spec)
        balance = None
        if label is not None or group is not None:
            base = self.db.open_table(perm.base_table, version=perm.base_version, asset=asset)
            balance = count_balance(base, perm, label=label, group=group, asset=asset)
        selected = perm.filtered_rows if perm.filtered_rows is not None else perm.num_rows
        return split_report(
            perm.split_names,
            perm.split_rows,
            selected=selected,
            requested=requested_shares(perm.spec, perm.filtered_rows),
            balance=balance,
            label=label,
            train_rows=train_rows,
            unit="fold" if train_rows is not None else "split",
        )

    def _require_overwrite(self, context: dg.OutputContext, *, asset: str) -> None:
        if self._write_mode(context, asset=asset) is not WriteMode.OVERWRITE:
            raise SpecError(
                f"asset '{asset}' is a permutation: each materialization replaces it as a new "
                "version; remove write_mode='append' from its metadata"
            )

    def _write_permutation(
        self,
        context: dg.OutputContext,
        name: str,
        perm: PermutationData,
        *,
        asset: str,
        pin_name: str | None = None,
        also_pin: list[Table] | None = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        """Pin the base version, write the permutation table, pin its new version too."""
        self._require_overwrite(context, asset=asset)
        if report is None:  # before any write: a bad label= hint must not leave a version
            report = self._report(context, perm, asset=asset)
        connection = self.db.connect()
        pin_name = pin_name or new_pin(name)
        # Pinned before the write: from now on no cleanup can remove the version it reads.
        base = connection.open_table(perm.base_table)
        pin(base, pin_name, perm.base_version)
        base.checkout(perm.base_version)  # its schema: the columns a consumer may select
        # A table, or a stream from an out-of-core engine (written batch by batch).
        metadata_added = {PIN_KEY.encode(): pin_name.encode()}
        ranges = _split_ranges(perm)
        if ranges is not None:  # readers take a split's row ids by table offset
            metadata_added[SPLIT_RANGES_KEY.encode()] = json.dumps(ranges).encode()
        if perm.fragments is not None:  # written by the engine's workers: commit them
            table = commit_fragments(
                connection,
                name,
                perm.fragments,
                perm.schema_with(metadata_added),
                storage_options=self.db.resolved_storage_options(),
            )
        else:
            data = perm.persistable(metadata_added)
            table = write_table(connection, name, data, WriteMode.OVERWRITE)
        for written in [table, *(also_pin or [])]:
            pin(written, pin_name, written.version)
        metadata: dict[str, Any] = {
            **self._common_metadata(table),
            "dagster/row_count": perm.num_rows,
            "lance/base_table": perm.base_table,
            "lance/base_version": perm.base_version,
            "dagster/column_schema": _column_schema(base.schema),
            "perm_assets/split_names": ", ".join(perm.split_names),
            "perm_assets/pin": pin_name,
            KIND_KEY: "permutation",
        }
        # Numbers per split too: Dagster plots numeric metadata over materializations.
        metadata.update({f"rows/{n}": r for n, r in perm.rows_by_split().items()})
        metadata.update(report)
        if perm.spec is not None:
            metadata["perm_assets/spec"] = dg.MetadataValue.json(
                perm.spec.model_dump(mode="json", exclude_none=True)
            )
        context.add_output_metadata(metadata)

    def _as_permutation(
        self, context: dg.OutputContext, obj: object, *, asset: str
    ) -> PermutationData | None:
        """Recognise permutation outputs, including lancedb's raw builder result."""
        if isinstance(obj, PermutationData):
            return obj
        if isinstance(obj, LanceTable):
            data = read_all(obj)
        elif isinstance(obj, pa.Table):
            data = cast(pa.Table, obj)
        else:
            return None
        if not is_permutation_schema(data.schema):
            return None
        base = _base_table_of(context, data.schema, asset=asset)
        names = split_names_of(data.schema)
        if not names:  # unnamed splits: as many as the largest id says
            ids = data.column("split_id").to_numpy()
            names = [f"split_{i}" for i in range(int(ids.max()) + 1 if ids.size else 1)]
        try:
            rows = split_rows_of(data, len(names))
        except ValueError as exc:
            raise SpecError(
                f"asset '{asset}' returned a permutation whose {exc}; its split_names "
                f"metadata lists {names}"
            ) from exc
        return PermutationData(
            data=with_permutation_metadata(data, base_table=base, split_names=names, spec=None),
            base_table=base,
            base_version=int((data.schema.metadata or {})[BASE_VERSION_KEY.encode()]),
            split_names=tuple(names),
            split_rows=tuple(int(r) for r in rows),
        )

    def _write_mode(self, context: dg.OutputContext, *, asset: str) -> WriteMode:
        raw = (context.definition_metadata or {}).get(WRITE_MODE_KEY, WriteMode.OVERWRITE.value)
        try:
            return WriteMode(raw)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in WriteMode)
            raise SpecError(
                f"asset '{asset}' has metadata write_mode={raw!r}; allowed: {allowed}"
            ) from None

    def _common_metadata(self, table: Table) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "dagster/table_name": table.name,
            "dagster/uri": _display_uri(self.db.uri, table.name),
            VERSION_KEY: table.version,
        }
        stamp = version_stamp(table)
        if stamp is not None:  # tells this version from a re-created table's of one number
            metadata[STAMP_KEY] = stamp
        return metadata

    # ------------------------------------------------------------------------------ inputs
    def load_input(self, context: dg.InputContext) -> object:
        key = context.asset_key
        asset = key.to_user_string()
        name = _stored_table(context)
        identity = recorded_identity(context.instance, key)
        version = identity.version if identity is not None else None
        wanted = context.dagster_type.typing_type
        if isinstance(wanted, type) and issubclass(wanted, Table):
            table = self.db.open_table(name, version=version, asset=asset)
            if identity is not None:  # a re-created table must not stand in for the recorded one
                verify_identity(table, identity, asset=asset)
            if is_permutation_schema(table.schema):
                raise SpecError(
                    f"asset '{asset}' is a permutation table, not a LanceDB table asset; a "
                    "permutation's source must be a table asset (its rows come from a table)"
                )
            return table
        request = ViewRequest.from_metadata(context.definition_metadata or {}, asset=asset)
        # A fold-partitioned consumer reads the fold named by its partition key.
        partition = context.partition_key if context.has_partition_key else None
        if _is_mapping_type(wanted):
            views = open_split_views(
                self.db,
                asset=asset,
                table=name,
                version=version,
                request=request,
                partition_key=partition,
                expected=identity,
            )
            _record_lineage(context, lineage_of(list(views.values()), keys=list(views)))
            return views
        view = open_view(
            self.db,
            asset=asset,
            table=name,
            version=version,
            request=request,
            partition_key=partition,
            expected=identity,
        )
        _record_lineage(context, lineage_of([view]))
        if wanted is pa.Table:
            return read_arrow(view)
        if wanted is pd.DataFrame:
            return read_arrow(view).to_pandas()
        if wanted in (Any, object) or (
            isinstance(wanted, type) and issubclass(wanted, Permutation)
        ):
            return view
        raise TypeError(
            f"LanceDBIOManager cannot load asset '{asset}' as {wanted!r}. Annotate the input "
            "as lancedb.permutation.Permutation, dict[str, Permutation] (several splits), "
            "lancedb.table.Table, pyarrow.Table or pandas.DataFrame."
        )


def _from_pandas(frame: pd.DataFrame) -> pa.Table:
    """A DataFrame as Arrow, without its index and without pandas' own schema metadata.

    The ``pandas`` key only serves ``to_pandas`` round trips, and any schema-level metadata
    makes lancedb 0.40's permutation builder panic (see `perm_assets.build`); other metadata a
    user put on a ``pyarrow.Table`` is kept.
    """
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    return table.replace_schema_metadata(metadata or None)


def _set_data_version(context: dg.OutputContext, version: dg.DataVersion) -> None:
    """Make ``<table>@<lance version>`` the materialization's data version.

    Dagster has no public way to set a data version from an IO manager; the step context
    holds the value it records right after ``handle_output`` returns, unless the asset body
    already gave one (an ``Output(data_version=...)`` wins). Outside a run (a context built by
    ``dg.build_output_context``) there is no step to record it on.
    """
    try:
        step = context.step_context
    except dg.DagsterInvariantViolationError:
        return
    if not step.has_data_version(context.asset_key):
        step.set_data_version(context.asset_key, version)


def _is_mapping_type(annotation: object) -> bool:
    origin = get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _stored_table(context: dg.InputContext) -> str:
    """The upstream's LanceDB table: named by an observed source's metadata, else by its key."""
    upstream = context.upstream_output
    named = (upstream.definition_metadata or {}).get(SOURCE_TABLE_KEY) if upstream else None
    return str(named) if named else table_name(context.asset_key)


def _record_lineage(context: dg.InputContext, metadata: dict[str, Any]) -> None:
    """Record the view on the consumer's LOADED_INPUT event (see `reproduce_input`).

    Lineage belongs to the consumer's run. Dagster's ``add_input_metadata`` also writes it as an
    observation *of the upstream asset*, whose Events tab then opens on a downstream read; so
    the entries go onto the LOADED_INPUT event alone, through the attribute that
    ``add_input_metadata`` fills (Dagster 1.13 has no public way to do only that). Should the
    attribute go away, the observation is written, labelled as a downstream read.
    """
    if not context.has_asset_key:
        return
    pending = getattr(context, "_user_generated_metadata", None)
    if isinstance(pending, dict):
        values = {k: _metadata_value(v) for k, v in metadata.items()}
        context._user_generated_metadata = {**pending, **values}  # type: ignore[attr-defined]
        return
    context.add_input_metadata(
        metadata,
        description="lineage of a downstream step's read, not this asset's own event",
    )


def _metadata_value(value: object) -> dg.MetadataValue:
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    return dg.MetadataValue.text(str(value))


def _base_table_of(context: dg.OutputContext, schema: pa.Schema, *, asset: str) -> str:
    """Base table of a raw permutation: recorded in its schema, or the asset's single dep."""
    recorded = (schema.metadata or {}).get(BASE_TABLE_KEY.encode())
    if recorded is not None:
        return recorded.decode()
    deps = [dep.asset_key for dep in context.asset_spec.deps]
    if len(deps) == 1:
        return table_name(deps[0])
    raise SpecError(
        f"asset '{asset}' returned a permutation table but its base table cannot be told from "
        f"its {len(deps)} upstream assets {[d.to_user_string() for d in deps]}; build it with "
        "permutation_asset, or give the asset exactly one upstream table asset"
    )


def _column_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in schema])


def _display_uri(uri: str, name: str) -> str:
    root = uri if "://" in uri else os.path.abspath(uri)
    return f"{root.rstrip('/')}/{name}.lance"


def _split_ranges(perm: PermutationData) -> list[list[int]] | None:
    """``[[first row, rows], ...]`` when the rows are stored split after split: always for an
    out-of-core engine's stream (it emits split by split; readers verify the split ids they
    take), checked here for an in-memory table (lancedb's builder output is not guaranteed)."""
    if perm.stream is None:
        # Chunk by chunk on zero-copy views: no concatenated copy of the column (800 MB at
        # 100M rows, which to_numpy on a many-chunk column would make).
        previous = None
        for chunk in perm.data.column("split_id").chunks:
            ids = chunk.to_numpy(zero_copy_only=chunk.null_count == 0)
            if ids.size == 0:
                continue
            if previous is not None and ids[0] < previous:
                return None
            if ids.size > 1 and not bool(np.all(ids[1:] >= ids[:-1])):
                return None
            previous = ids[-1]
    starts = np.cumsum([0, *perm.split_rows[:-1]])
    return [[int(start), int(rows)] for start, rows in zip(starts, perm.split_rows, strict=True)]
