"""Stored tables → `Permutation` views pinned to exact Lance versions.

A view is lancedb's own `Permutation` (a subclass, so it passes ``isinstance`` and fits
PyTorch's Dataset contract) with two differences: plain iteration yields every row (lancedb
drops a last partial batch, so an 80-row split at the default batch of 100 yields nothing), and
it carries its `ViewLineage`: which asset, table versions, split and columns it reads.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import IO, Any, cast
from urllib.parse import urlsplit

import dagster as dg
import numpy as np
import pyarrow as pa
from lancedb.permutation import DEFAULT_BATCH_SIZE, Permutation, Transforms
from lancedb.table import LanceTable, Table
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from perm_assets.batches import OWN_TRANSFORMS, VIEW_FORMATS, ViewFormat, reslice
from perm_assets.cache import CacheEntry, ColumnCache
from perm_assets.errors import SpecError
from perm_assets.folds import FOLDS_KIND, fold_index
from perm_assets.forked import ReadPlan, answer_requests, helper_pipes
from perm_assets.identity import VersionIdentity, verify_identity, verify_pin, version_stamp
from perm_assets.reader import LanceDBStore, SplitRows, take_rows
from perm_assets.resources import LanceDBResource
from perm_assets.tables import (
    BASE_TABLE_KEY,
    BASE_VERSION_KEY,
    KIND_META_KEY,
    PIN_KEY,
    SPLIT_NAMES_KEY,
    TRAIN_RANGES_KEY,
    TRAIN_TABLE_KEY,
    TRAIN_VERSION_KEY,
    is_permutation_schema,
    looks_like_permutation,
)

_CACHED_READ_ROWS = 65_536  # row ids per gather from the column cache in `iter`


class ViewRequest(BaseModel):
    """What a downstream asset asks of an upstream: ``dg.AssetIn(metadata={...})``.

    Example: ``{"split": "train", "columns": ["image", "label"], "format": "arrow"}``.
    """

    # A misspelt key ("colums") must fail: ignored, it would hand over every column silently.
    model_config = ConfigDict(frozen=True, extra="forbid")

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
        default=None,
        description=(
            "Batch format: 'numpy_dict' / 'torch_dict' (a dict of one array or tensor per "
            "column, the fast path), 'arrow', or another of `perm_assets.batches`; None: "
            "'python' (a list of row dicts)."
        ),
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Rows per batch when iterating: exactly this many in every batch but the last, on "
            "every split, fold and shard. None: lancedb's 100."
        ),
    )

    cache: bool = Field(
        default=False,
        description=(
            "Read the selected base columns from the local column cache (LanceDBResource."
            "cache_dir): fetched once, sequentially, at the pinned version, then every batch "
            "is a local gather in the view's order. Same rows, order and values as without."
        ),
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SpecError(explain_request(exc)) from None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, asset: str) -> ViewRequest:
        """Parse input metadata, naming the asset, the offending key or value and what is
        allowed.

        Keys that are not view settings are refused, except namespaced ones (any key with a
        ``/``, e.g. ``dagster/...``), which other tools put on inputs.
        """
        mine = {str(k): v for k, v in metadata.items() if "/" not in str(k)}
        try:
            return cls(**mine)
        except SpecError as exc:
            raise SpecError(f"input from asset '{asset}': {exc}") from None


VIEW_KEYS_HELP = (
    "split (name, index or list), fold (for folds assets), columns (list of names), format (one "
    f"of {', '.join(VIEW_FORMATS)}), batch_size (>= 1), cache (true/false)"
)


def explain_request(exc: ValidationError) -> str:
    """One line per problem of a view request, and the keys and values that are allowed."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(where, list(ViewRequest.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{where}'{hint}")
        else:
            problems.append(f"{where}={err.get('input')!r}: {err['msg']}")
    return f"invalid view request: {'; '.join(problems)}. Allowed keys: {VIEW_KEYS_HELP}"


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
    format: str | None = None
    batch_size: int | None = None
    offset: int | None = None
    limit: int | None = None
    pin: str | None = None
    stamp: int | None = None

    def identity(self) -> VersionIdentity:
        """What this view recorded of its table's version, to verify it on reopening."""
        return VersionIdentity(self.table_version, pin=self.pin, stamp=self.stamp)

    def as_metadata(self, columns: list[str] | None = None) -> dict[str, Any]:
        """Flat ``lineage/*`` entries for a Dagster materialization."""
        out: dict[str, Any] = {f"lineage/{k}": v for k, v in asdict(self).items() if v is not None}
        if columns is not None:
            out["lineage/columns"] = ", ".join(columns)
        return out


class PermutationView(Permutation):
    """A `Permutation` of an asset's stored rows, pinned to the versions in `lineage`."""

    lineage: ViewLineage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unbuilt = kwargs.get("_reader") is _UNBUILT
        super().__init__(*args, **kwargs)
        if unbuilt:  # lancedb's _ensure_open builds the reader on first use (see from_tables)
            self.reader = cast(Any, None)
            self._pid = None
        # The process whose lancedb runtime holds this view's table handles (_build_reader).
        self._home_pid = os.getpid()
        # The split's row ids, read by this project (lancedb's take_offsets builds an offset
        # map of the whole split first: 39 s at 72M rows). Copies share it: read once.
        stored = self.permutation_table
        self._split_rows = SplitRows(
            LanceDBStore(self.base_table),
            None if stored is None else LanceDBStore(stored),
            self.split,
        )
        # Where pylance finds the tables, for a forked worker's read helper (`_read_plan`).
        self._locations = (
            _location(self.base_table),
            None if stored is None else _location(stored),
        )

    @classmethod
    def from_tables(
        cls,
        base_table: Table,
        permutation_table: Table | None = None,
        split: str | int | None = None,
    ) -> PermutationView:
        """lancedb's ``from_tables``, without building lancedb's reader yet.

        lancedb builds its ``PermutationReader`` at once, and that counts the split's rows over
        the whole permutation table: 0.75-1.1 s at 100M rows, ~10x that at 1B, before any
        first batch. This project's reads by position and its passes (`take_row_ids`,
        `perm_assets.training`) never use that reader, and `num_rows` / `schema` come from
        the table's recorded split ranges and the base schema; lancedb's reader is built on
        the first call that needs it (an uncached ``iter``, or a forked worker's helper).
        A split given by name is resolved by lancedb, which builds the reader.
        """
        if isinstance(split, str):
            return cast(PermutationView, super().from_tables(base_table, permutation_table, split))
        if split is not None and permutation_table is None:
            raise ValueError(f"split {split} of a view needs a permutation table")
        selection = {name: name for name in base_table.schema.names}
        return cls(
            base_table,
            permutation_table,
            split or 0,
            selection,
            DEFAULT_BATCH_SIZE,
            Transforms.arrow2python,
            _reader=_UNBUILT,
        )

    @property
    def num_rows(self) -> int:
        """Rows of the view: from the table's recorded split ranges (or row ids already read)
        without lancedb's reader; otherwise lancedb counts them."""
        rows = self.split_rows()
        known = None if rows is None else rows.known_size(self.offset, self.limit)
        return known if known is not None else super().num_rows

    @property
    def schema(self) -> pa.Schema:
        """The selected columns' schema, as lancedb's reader reports it (tests compare),
        from the base table's schema: no reader needed."""
        if self.forked():  # the helper answers; the parent's table handles are not usable
            return super().schema
        base = self.base_table.schema
        return pa.schema(
            [
                pa.field(name, pa.uint64()) if src == "_rowid" else base.field(src).with_name(name)
                for name, src in self.selection.items()
            ],
            metadata=base.metadata,
        )

    def forked(self) -> bool:
        """Whether this process is a fork of the one that opened the view (lancedb 0.40 is
        not fork-safe there: reads go through a helper interpreter, see _ForkedReader)."""
        return self.__dict__.get("_home_pid", os.getpid()) != os.getpid()

    def split_rows(self) -> SplitRows | None:
        """The row ids this view reads by position, or None in a forked child."""
        rows: SplitRows | None = self.__dict__.get("_split_rows")
        return None if self.forked() else rows

    def take_offsets(self, offsets: list[int] | np.ndarray) -> Any:
        """Rows at positions ``offsets`` of the view, in that order and the view's format.

        Reads the split's row ids once (`SplitRows`) and the base rows by id at the pinned
        version, instead of lancedb's take_offsets and its offset map of the whole split.

        Raises:
            IndexError: an offset outside ``[0, len(view))``.
        """
        transform = cast(Callable[[pa.RecordBatch], Any], self.transform_fn)
        return transform(self.take_arrow(offsets))

    def take_arrow(self, offsets: list[int] | np.ndarray) -> pa.RecordBatch:
        """`take_offsets` as an Arrow batch, whatever the view's format."""
        rows = self.split_rows()
        if rows is None and (held := self._held_cached_ids()) is not None:
            return self.take_row_ids(held[_in_range(np.asarray(offsets), held.size)])
        if rows is None:  # a forked child: the helper interpreter answers
            self._ensure_open()  # on this view, so the copy shares its helper (see iter)
            arrow = copy.copy(self)
            arrow.transform_fn = Transforms.arrow2arrow
            return cast(pa.RecordBatch, Permutation.take_offsets(arrow, list(offsets)))
        return self.take_row_ids(rows.at(self.offset, self.limit, np.asarray(offsets)))

    def take_row_ids(self, row_ids: np.ndarray) -> pa.RecordBatch:
        """Base rows ``row_ids`` (from `split_rows`) at the pinned version, in that order:
        from the column cache when the view uses one (`use_cache`), else from the table."""
        lineage: ViewLineage | None = self.__dict__.get("lineage")
        what = f"view of asset '{lineage.asset}'" if lineage is not None else "view"
        if self.__dict__.get("_cache") is not None:
            return self._cache_entry(what).take(row_ids, self.selection)
        return take_rows(LanceDBStore(self.base_table), row_ids, self.selection, what=what)

    def use_cache(self, folder: str, max_bytes: int) -> PermutationView:
        """This view reading its selected columns from the column cache under ``folder``
        (`perm_assets.cache`); the entry is fetched on first read, once per node."""
        view = copy.copy(self)
        view._cache = (folder, max_bytes)
        view._cache_entries = {}
        return view

    @property
    def cached(self) -> bool:
        """Whether reads come from the local column cache."""
        return self.__dict__.get("_cache") is not None

    def warm(self) -> PermutationView:
        """Read the split's row ids and open the view's cache entry (fetching it if needed)
        now, in this process; returns the view.

        Call it on a cached view before handing it to a ``fork`` DataLoader: each forked worker
        then gathers its batches from the inherited row ids and memory-mapped entry, without
        lancedb (not fork-safe) and without a helper interpreter. Uncached views, spawned
        workers and this process gain nothing they would not do on first use anyway."""
        rows = self.split_rows()
        if rows is not None:
            rows.all()
            if self.cached:
                self._cache_entry(self._what())
        return self

    def _held_cached_ids(self) -> np.ndarray | None:
        """In a forked child, the view's row ids if the parent had read them and opened the
        cache entry for these columns (`warm`): plain arrays and memory maps, safe to use
        after a fork. None otherwise (lancedb's reads go through the helper interpreter)."""
        if not self.cached:
            return None
        rows: SplitRows | None = self.__dict__.get("_split_rows")
        held = None if rows is None else rows.held()
        if held is None or self._cache_columns() not in self.__dict__["_cache_entries"]:
            return None
        start = self.offset or 0
        return held[start : None if self.limit is None else start + self.limit]

    def _cache_columns(self) -> tuple[str, ...]:
        return tuple(sorted(c for c in self.selection.values() if c != "_rowid"))

    def _what(self) -> str:
        lineage: ViewLineage | None = self.__dict__.get("lineage")
        return f"view of asset '{lineage.asset}'" if lineage is not None else "view"

    def _cache_entry(self, what: str) -> CacheEntry:
        # Copies share the dict: one entry per column set, opened once per process.
        entries: dict[tuple[str, ...], CacheEntry] = self.__dict__["_cache_entries"]
        columns = self._cache_columns()
        entry = entries.get(columns)
        if entry is None:
            folder, max_bytes = self.__dict__["_cache"]
            lineage: ViewLineage | None = self.__dict__.get("lineage")
            entry = ColumnCache(folder, max_bytes).open(
                self.base_table,
                list(columns),
                pin=lineage.pin if lineage is not None else None,
                what=what,
            )
            entries[columns] = entry
        return entry

    async def _build_reader(self) -> Any:
        # lancedb 0.40 is not fork-safe: in a forked child (DataLoader's default on Linux)
        # reads hung or crashed in about one worker in ten here, and opening tables in one in
        # two. A forked child reads through a fresh interpreter instead (_ForkedReader).
        if self.__dict__.get("_home_pid", os.getpid()) != os.getpid():
            return _ForkedReader(self._read_plan() or self.__getstate__())
        return await super()._build_reader()

    def _read_plan(self) -> ReadPlan | None:
        """What the lean read helper (`perm_assets.forked`) of a forked worker needs, from
        Python attributes only; None when only the full helper can reopen the view (no
        lineage, a connection factory, or a table pylance does not open by location)."""
        lineage: ViewLineage | None = self.__dict__.get("lineage")
        base_path, stored_path = self.__dict__.get("_locations", (None, None))
        stored = self.permutation_table
        if (
            lineage is None
            or self.connection_factory is not None
            or base_path is None
            or (stored is not None and stored_path is None)
        ):
            return None
        return ReadPlan(
            asset=lineage.asset,
            base_path=base_path,
            base_name=lineage.base_table,
            base_version=lineage.base_version,
            stored_path=stored_path,
            stored_name=lineage.table,
            stored_version=lineage.table_version,
            split=int(self.split or 0),
            pin=lineage.pin,
            stamp=lineage.stamp,
            offset=self.offset,
            limit=self.limit,
            selection=dict(self.selection),
            storage_options=dict(_storage_options_of(self.base_table)),
        )

    def __copy__(self) -> PermutationView:
        # lancedb's with_* methods call copy.copy, which would otherwise go through
        # __getstate__ (reading the whole permutation table into Arrow) and lose `lineage`.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __getstate__(self) -> dict[str, Any]:
        """Where to reopen the view (under 1 KB), never its rows or secret values.

        lancedb 0.40 pickles the whole permutation table (~160 MB at 10M rows) and the
        connection's storage options in plain text. This state holds the `ViewLineage` (URI,
        table names, pinned Lance versions, split index), selection, transform, batch size,
        skip/take, and a `WorkerConnection`: public options verbatim, every other option as the
        *name* of the environment variable holding it. A factory set with
        `with_connection_factory` is pickled instead of the `WorkerConnection`.

        Raises:
            pickle.PicklingError: the view has no lineage, or an option not known to be public
                has a value that no environment variable holds (pass it as ``dg.EnvVar``).
        """
        lineage: ViewLineage | None = self.__dict__.get("lineage")
        if lineage is None:
            raise pickle.PicklingError(
                "this PermutationView has no lineage, so another process cannot reopen it; "
                "get views from open_view or LanceDBIOManager"
            )
        factory = self.connection_factory
        connection = None
        if factory is None:
            options = _storage_options_of(self.base_table)
            connection = WorkerConnection.capture(lineage.uri, options, asset=lineage.asset)
        return {
            "lineage": lineage,
            "selection": dict(self.selection),
            "transform_fn": self.transform_fn,
            "batch_size": self.batch_size,
            "offset": self.offset,
            "limit": self.limit,
            "connection_factory": factory,
            "connection": connection,
            "cache": self.__dict__.get("_cache"),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Reopen the tables at the pinned versions in ``state`` (see `__getstate__`).

        Raises:
            pickle.UnpicklingError: an environment variable named by the state is unset here.
        """
        lineage: ViewLineage = state["lineage"]
        factory: Callable[[str], Table] | None = state["connection_factory"]
        if factory is None:
            db = cast(WorkerConnection, state["connection"]).resource()
            # open_view re-checks the base table's pin, as it did in the parent.
            view = open_view(
                db,
                asset=lineage.asset,
                table=lineage.table,
                version=lineage.table_version,
                request=ViewRequest(split=lineage.split_index),
                expected=lineage.identity(),
            )
        else:
            view = _reopen_with_factory(factory, lineage)
        self.__dict__.update(view.__dict__)
        self.lineage = lineage
        self.selection = state["selection"]
        self.transform_fn = state["transform_fn"]
        self.batch_size = state["batch_size"]
        self.offset = state["offset"]
        self.limit = state["limit"]
        self.connection_factory = factory
        if state.get("cache") is not None:  # the worker gathers from the same local entry
            self._cache = tuple(state["cache"])
            self._cache_entries = {}
        if self.offset is not None or self.limit is not None:
            # lancedb's _ensure_open rebuilds the reader, with skip and take, on first use.
            self._pid = None

    def restricted(self, offset: int | None, limit: int | None) -> PermutationView:
        """This view limited to rows ``offset`` .. ``offset + limit`` of its split (absolute,
        as recorded in `ViewLineage`), e.g. one fold's range of a folds training table."""
        if (offset is not None and offset < 0) or (limit is not None and limit < 0):
            raise ValueError(f"offset={offset} and limit={limit} must be >= 0 rows")
        new = copy.copy(self)
        new.offset, new.limit = offset, limit
        # lancedb's _ensure_open builds the reader, with skip and take, on first use: one
        # reader (in a forked worker, one helper process) per view actually read.
        new._pid = None
        lineage: ViewLineage | None = self.__dict__.get("lineage")
        if lineage is not None:
            new.lineage = replace(lineage, offset=offset, limit=limit)
        return new

    def with_skip(self, skip: int) -> PermutationView:
        """Skip the first ``skip`` rows of this view.

        lancedb's ``with_skip`` replaces the offset; here it is relative to the view, so a
        fold's training view (a range of its table) never widens to other rows.
        """
        if skip < 0:
            raise ValueError(f"skip={skip} must be >= 0 rows")
        offset = (self.offset or 0) + skip
        limit = None if self.limit is None else max(self.limit - skip, 0)
        return self.restricted(offset, limit)

    def with_take(self, limit: int) -> PermutationView:
        """At most ``limit`` rows of this view (after any skip), never more than it has."""
        if limit < 0:
            raise ValueError(f"take={limit} must be >= 0 rows")
        return self.restricted(self.offset, limit if self.limit is None else min(limit, self.limit))

    def __iter__(self) -> Iterator[Any]:
        # lancedb's __iter__ skips a short last batch; a training view must not lose rows.
        return self.iter(self.batch_size, skip_last_batch=False)

    def iter(self, batch_size: int, skip_last_batch: bool = False) -> Iterator[Any]:
        """Every row in view order, in batches of exactly ``batch_size`` rows but the last.

        lancedb's own ``iter`` yields misaligned batches on a split that does not start at a
        multiple of ``batch_size`` (205 then 793 rows at 1,024); training code relies on the
        size it asked for (batch norm, equal DDP batches), so the reads are re-sliced here.

        Args:
            batch_size: rows per batch (>= 1).
            skip_last_batch: leave out a last batch shorter than ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 rows")
        transform = cast(Callable[[pa.RecordBatch], Any], self.transform_fn)
        rows = self.split_rows()
        if self.cached and rows is not None:  # gathers from the local cache, in view order
            chunks = rows.stream(
                self.offset, self.limit, itertools.repeat(max(batch_size, _CACHED_READ_ROWS))
            )
            cached = (self.take_row_ids(ids) for ids in chunks)
            for batch in reslice(cached, batch_size, drop_last=skip_last_batch):
                yield transform(batch)
            return
        # Open (or reuse) the reader on this view first: the copy then shares it, instead of
        # building one per pass (in a forked worker, a helper interpreter per epoch).
        self._ensure_open()
        arrow = copy.copy(self)
        arrow.transform_fn = Transforms.arrow2arrow
        reads = cast(Iterator[pa.RecordBatch], Permutation.iter(arrow, batch_size, False))
        try:
            for batch in reslice(reads, batch_size, drop_last=skip_last_batch):
                yield transform(batch)
        finally:
            reads.close()  # type: ignore[attr-defined]  # a generator: ends lancedb's stream

    def with_format(self, format: ViewFormat) -> PermutationView:  # type: ignore[override]
        """Batches in ``format``: lancedb's formats plus ``numpy_dict`` and ``torch_dict``
        (one array or tensor per named column); see `perm_assets.batches` for every shape."""
        if format not in VIEW_FORMATS:
            raise ValueError(f"format {format!r} is not one of {', '.join(VIEW_FORMATS)}")
        own = OWN_TRANSFORMS.get(format)
        if own is not None:
            return _as_view(self.with_transform(cast(Any, own)))
        return _as_view(super().with_format(format))  # type: ignore[arg-type]

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


PUBLIC_STORAGE_OPTIONS = frozenset(
    {
        "region",
        "aws_region",
        "aws_default_region",
        "endpoint",
        "aws_endpoint",
        "aws_endpoint_url",
        "endpoint_url",
        "allow_http",
        "aws_allow_http",
        "allow_invalid_certificates",
        "virtual_hosted_style_request",
        "aws_virtual_hosted_style_request",
        "s3_express",
        "aws_s3_express",
        "unsigned_payload",
        "conditional_put",
        "aws_conditional_put",
        "timeout",
        "connect_timeout",
        "proxy_url",
        "azure_storage_account_name",
        "account_name",
    }
)
"""Storage options that are configuration, not credentials: pickled verbatim for workers."""


@dataclass(frozen=True)
class WorkerConnection:
    """How another process reconnects to a view's database, without any secret value.

    ``options`` holds public options (`PUBLIC_STORAGE_OPTIONS`) verbatim; ``env`` maps every
    other option to the environment variable the worker reads it from, e.g.
    ``(("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),)``. DataLoader workers inherit
    the parent's environment, where ``dg.EnvVar`` options were resolved.
    """

    uri: str
    options: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]

    @classmethod
    def capture(
        cls,
        uri: str,
        storage_options: Mapping[str, str],
        *,
        asset: str,
        environ: Mapping[str, str] | None = None,
    ) -> WorkerConnection:
        """Record ``storage_options`` as public values and environment variable names.

        Raises:
            pickle.PicklingError: a non-public option's value is in no environment variable.
        """
        environ = os.environ if environ is None else environ
        public: list[tuple[str, str]] = []
        from_env: list[tuple[str, str]] = []
        for key, value in sorted(storage_options.items()):
            if isinstance(value, dg.EnvVar):  # an unresolved resource (outside a Dagster run)
                from_env.append((key, value.env_var_name))
                continue
            if (key.lower() in PUBLIC_STORAGE_OPTIONS and not _has_userinfo(value)) or value == "":
                public.append((key, value))
                continue
            name = _env_name_holding(key, value, environ)
            if name is None:  # the message names the option, never its value
                raise pickle.PicklingError(
                    f"cannot send a view of asset '{asset}' to another process: storage "
                    f"option '{key}' was given as a literal value that no environment variable "
                    "holds, and pickling it would write a credential in plain text. Pass it as "
                    "dg.EnvVar('NAME') (workers read NAME from their own environment) or use "
                    "view.with_connection_factory(...)"
                )
            from_env.append((key, name))
        # A relative local path must not depend on the worker's working directory.
        root = uri if "://" in uri else os.path.abspath(uri)
        return cls(uri=root, options=tuple(public), env=tuple(from_env))

    def resource(self) -> LanceDBResource:
        """The database, with option values read from this process's environment.

        Raises:
            pickle.UnpicklingError: a named environment variable is not set here.
        """
        missing = sorted({name for _, name in self.env if name not in os.environ})
        if missing:
            raise pickle.UnpicklingError(
                f"reopening a view of '{self.uri}' in process {os.getpid()} needs environment "
                f"variable(s) {', '.join(missing)} for its storage options; set them in the "
                "worker's environment"
            )
        options = dict(self.options) | {key: os.environ[name] for key, name in self.env}
        # Pinned versions never change, so re-checking for newer commits is wasted I/O.
        return LanceDBResource(uri=self.uri, storage_options=options, read_consistency_seconds=None)


def _has_userinfo(value: str) -> bool:
    """Whether a URL-valued option carries credentials (``http://user:secret@proxy:3128``)."""
    return "@" in urlsplit(value).netloc if "://" in value else False


def _env_name_holding(key: str, value: str, environ: Mapping[str, str]) -> str | None:
    """The environment variable holding ``value``: ``KEY`` upper-cased first, else any."""
    conventional = key.upper()
    if environ.get(conventional) == value:
        return conventional
    return next((name for name in sorted(environ) if environ[name] == value), None)


_UNBUILT: Any = object()
"""``_reader`` of a `PermutationView` built without lancedb's reader (`from_tables`)."""


def _location(table: Table) -> str | None:
    """Where pylance opens ``table`` (a local or object-store path), or None for a LanceDB
    Cloud or namespace table. Pure Python: safe on lancedb's event-loop thread."""
    if not isinstance(table, LanceTable):
        return None
    if getattr(table, "_location", None) is not None or getattr(table, "_namespace_path", None):
        return None  # a namespace decides where the table is, and its credentials
    if urlsplit(str(getattr(table._conn, "uri", ""))).scheme in ("db", "namespace", "s3+ddb"):
        return None  # s3+ddb: commits go through a DynamoDB store pylance would not see
    return table._dataset_path


def _storage_options_of(table: Table) -> Mapping[str, str]:
    # lancedb keeps the options on the table's connection and has no public accessor.
    connection = getattr(table, "_conn", None)
    return getattr(connection, "storage_options", None) or {}


class _ForkedReader:
    """lancedb's ``PermutationReader`` interface, answered by a helper interpreter.

    The helper reopens the view's pinned tables in a process whose runtime was never forked and
    answers one request at a time over its stdin and stdout (Arrow batches pickle as Arrow IPC
    buffers); it exits when this process closes the pipe or exits. Given a `ReadPlan` it is
    the lean helper (`perm_assets.forked`: pylance only, ~0.7 s to start); given the view's
    pickled state, the full one (`_serve_forked_reads`: unpickles the view, importing dagster
    and lancedb, ~3-4 s), for views the lean one cannot open.
    """

    def __init__(self, request: ReadPlan | dict[str, Any]) -> None:
        if isinstance(request, ReadPlan):
            program = "import perm_assets.forked as f; f.serve()"
        else:
            # Batches come back as Arrow; this process applies the view's own transform.
            request = {**request, "transform_fn": Transforms.arrow2arrow}
            program = "import perm_assets.views as v; v._serve_forked_reads()"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        # One request at a time: num_rows calls count_rows from the caller's thread, the rest
        # arrive on lancedb's event-loop thread.
        self._lock = threading.Lock()
        self._send(request)

    def _send(self, message: object) -> None:
        stdin = cast(IO[bytes], self._process.stdin)
        pickle.dump(message, stdin, protocol=pickle.HIGHEST_PROTOCOL)
        stdin.flush()

    def _call(self, *request: Any) -> Any:
        try:
            with self._lock:
                self._send(request)
                kind, value = pickle.load(cast(IO[bytes], self._process.stdout))
        except EOFError:
            raise RuntimeError(
                f"the read helper (pid {self._process.pid}) of forked process {os.getpid()} "
                f"exited with code {self._process.wait()}; its error is on stderr"
            ) from None
        if kind == "error":
            raise value
        return value

    async def take_offsets(
        self, offsets: list[int], *, selection: dict[str, str] | None = None
    ) -> pa.RecordBatch:
        return self._call("take", list(offsets), selection)

    async def output_schema(self, selection: dict[str, str] | None = None) -> pa.Schema:
        return self._call("schema", selection)

    def count_rows(self) -> int:
        return self._call("count")

    async def read(self, selection: dict[str, str], *, batch_size: int) -> _ForkedBatches:
        return _ForkedBatches(self, self._call("read", batch_size, selection))


class _ForkedBatches:
    """The batches of one `_ForkedReader.read`, pulled one request at a time by the pass id
    the helper gave it: several passes over one view may be open at once."""

    def __init__(self, reader: _ForkedReader, stream: int) -> None:
        self._reader = reader
        self._stream = stream

    def __aiter__(self) -> _ForkedBatches:
        return self

    async def __anext__(self) -> pa.RecordBatch:
        batch = self._reader._call("next", self._stream)
        if batch is None:
            raise StopAsyncIteration
        return batch


def _serve_forked_reads() -> None:
    """Main loop of a full `_ForkedReader` helper: a view's pickled state, then requests, on
    stdin (the lean helper's protocol, `perm_assets.forked.answer_requests`)."""
    requests, replies = helper_pipes()
    view = object.__new__(PermutationView)
    view.__setstate__(pickle.load(requests))  # reopens the pinned tables, here

    def selected(selection: dict[str, str] | None) -> PermutationView:
        return _as_view(view._with_selection(selection or view.selection))

    def answer(kind: str, args: list[Any]) -> Any:
        if kind == "count":
            return view.num_rows
        if kind == "take":
            return selected(args[1]).take_offsets(args[0])
        if kind == "schema":
            return selected(args[0]).schema
        raise ValueError(f"unknown request {kind!r}")

    answer_requests(
        requests,
        replies,
        answer,
        lambda size, selection: selected(selection).iter(size, skip_last_batch=False),
    )


def _reopen_with_factory(factory: Callable[[str], Table], lineage: ViewLineage) -> PermutationView:
    """A view's tables reopened by a user's `with_connection_factory` factory, pinned."""
    base = factory(lineage.base_table)
    base.checkout(lineage.base_version)
    if lineage.table == lineage.base_table:  # an identity view of a table asset
        verify_identity(base, lineage.identity(), asset=lineage.asset)
        return _as_view(PermutationView.from_tables(base, None, None))
    stored = factory(lineage.table)
    stored.checkout(lineage.table_version)
    verify_identity(stored, lineage.identity(), asset=lineage.asset)
    verify_pin(base, lineage.pin, lineage.base_version, asset=lineage.asset)
    return _as_view(PermutationView.from_tables(base, stored, lineage.split_index))


def _in_range(positions: np.ndarray, size: int) -> np.ndarray:
    """``positions`` as int64, IndexError for any outside ``[0, size)``."""
    positions = positions.astype(np.int64, copy=False)
    if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= size):
        bad = positions[(positions < 0) | (positions >= size)][0]
        raise IndexError(f"offset {bad} is out of range for a view of {size:,} rows")
    return positions


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
    expected: VersionIdentity | None = None,
) -> PermutationView:
    """The view ``request`` asks for over ``table`` at Lance ``version`` (None: latest).

    A permutation table gives a view of one of its splits over its base table at the pinned
    base version; any other table gives its identity view (all rows in stored order). For a
    folds table, split ``'train'``/``'validation'`` reads fold ``request.fold``, else the fold
    named by ``partition_key`` (the consumer's partition). With ``expected`` (what a
    materialization or view recorded of that version) the table is verified to be that one,
    else LineageError; the base and training tables are always verified against their pin.
    """
    request = request or ViewRequest()
    if isinstance(request.split, list):
        raise SpecError(
            f"input from asset '{asset}': split={request.split!r} asks for several splits; "
            "annotate the parameter as dict[str, Permutation] to receive one view per split"
        )
    stored = _open_verified(db, table, version, expected, asset=asset)
    _refuse_fold_of_non_folds(stored, request, asset=asset)
    fold = request.fold if request.fold is not None else partition_key
    view = _open_split(db, stored, request.split, asset=asset, fold=fold)
    return _cached(refine(view, request, asset=asset), request, db)


def open_split_views(
    db: LanceDBResource,
    *,
    asset: str,
    table: str,
    version: int | None,
    request: ViewRequest,
    partition_key: str | None = None,
    expected: VersionIdentity | None = None,
) -> dict[str, PermutationView]:
    """One view per split in ``request.split`` (a list; None: every split), keyed by name.

    Dagster maps each input to a distinct upstream asset, so a consumer that needs ``train``
    and ``test`` of one permutation asset takes both through one input.
    """
    stored = _open_verified(db, table, version, expected, asset=asset)
    _refuse_fold_of_non_folds(stored, request, asset=asset)
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
        view = _cached(view, request, db)
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
        role, fold_name, rows = None, "", None
        if split in FOLD_SPLITS and _kind_of(stored.schema) == FOLDS_KIND:
            role = str(split)
            fold_name, stored, split, rows = _fold_table(db, stored, role, fold, asset=asset)
        view, lineage = _permutation_view(db, asset=asset, stored=stored, split=split)
        if role is not None:  # e.g. "fold_2/train": fold 2's training rows
            lineage = replace(lineage, split=f"{fold_name}/{role}")
        view = _as_view(view)
        view.lineage = lineage
        if rows is not None:
            view = view.restricted(*rows)
        return view
    if looks_like_permutation(stored.schema):
        raise SpecError(
            f"table '{stored.name}' of asset '{asset}' has permutation columns and metadata but "
            f"is not a valid permutation table (row_id and split_id must be uint64; it has "
            f"{', '.join(f'{f.name}: {f.type}' for f in stored.schema)}); it is never read as "
            f"data. Re-materialize asset '{asset}'."
        )
    if split not in (None, 0):
        raise SpecError(
            f"split {split!r} was asked of asset '{asset}', which is a table, not a "
            "permutation: it has one implicit split; drop 'split' or read a permutation asset"
        )
    view = _as_view(PermutationView.from_tables(stored, None, None))
    view.lineage = ViewLineage(
        asset=asset,
        uri=db.uri,
        table=stored.name,
        table_version=stored.version,
        base_table=stored.name,
        base_version=stored.version,
        split=None,
        split_index=0,
        stamp=version_stamp(stored),
    )
    return view


def _open_verified(
    db: LanceDBResource,
    table: str,
    version: int | None,
    expected: VersionIdentity | None,
    *,
    asset: str,
) -> Table:
    stored = db.open_table(table, version=version, asset=asset)
    if expected is not None:
        verify_identity(stored, expected, asset=asset)
    return stored


def _refuse_fold_of_non_folds(stored: Table, request: ViewRequest, *, asset: str) -> None:
    """A ``fold`` asked of a plain permutation or table would be ignored: refuse it."""
    if request.fold is not None and _kind_of(stored.schema) != FOLDS_KIND:
        raise SpecError(
            f"input from asset '{asset}': fold={request.fold!r} was asked, but '{asset}' is not "
            "a folds asset; drop 'fold' or read a folds_asset"
        )


FOLD_SPLITS = ("train", "validation")
"""What a fold-partitioned consumer asks of a folds asset: fold i's training or validation rows."""


def _kind_of(schema: pa.Schema) -> str | None:
    raw = (schema.metadata or {}).get(KIND_META_KEY.encode())
    return raw.decode() if raw is not None else None


def _fold_table(
    db: LanceDBResource, stored: Table, split: str, fold: str | int | None, *, asset: str
) -> tuple[str, Table, int, tuple[int, int] | None]:
    """Where fold ``fold``'s ``split`` rows of a folds table are: the fold's name, the table,
    its split index and, for training rows, their ``(offset, rows)`` range in that split."""
    names = split_names_of(stored.schema)
    if fold is None:
        raise SpecError(
            f"input from folds asset '{asset}' asks for split '{split}' but not which fold: "
            "partition the consuming asset with fold_partitions(...) or add "
            "metadata={'fold': 'fold_0'} (folds: " + ", ".join(names) + ")"
        )
    index = fold_index(fold, len(names), asset=asset)
    if split == "validation":
        return names[index], stored, index, None
    metadata = stored.schema.metadata or {}
    train_name = metadata[TRAIN_TABLE_KEY.encode()].decode()
    train_version = int(metadata[TRAIN_VERSION_KEY.encode()])
    train = db.open_table(train_name, version=train_version, asset=asset)
    # The training table is tagged with the folds table's pin: a re-created one has lost it.
    pin = metadata.get(PIN_KEY.encode())
    verify_pin(train, pin.decode() if pin else None, train_version, asset=asset)
    ranges = metadata.get(TRAIN_RANGES_KEY.encode())
    if ranges is None:  # an older folds table: split i of the training table is fold i's
        return names[index], train, index, None
    offset, rows = json.loads(ranges)[index]
    return names[index], train, 0, (int(offset), int(rows))


def _cached(view: PermutationView, request: ViewRequest, db: LanceDBResource) -> PermutationView:
    """The view reading from the resource's column cache when the request asks for it."""
    return view.use_cache(*db.column_cache()) if request.cache else view


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
        view.lineage = replace(view.lineage, format=request.format)
    if request.batch_size is not None:
        view = _as_view(view.with_batch_size(request.batch_size))
        view.lineage = replace(view.lineage, batch_size=request.batch_size)
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
    base = db.open_table(base_name, version=base_version, asset=asset)
    # A dropped and re-created base table reuses version numbers: the pin tells them apart.
    pin = metadata.get(PIN_KEY.encode())
    verify_pin(base, pin.decode() if pin else None, base_version, asset=asset)
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
        pin=pin.decode() if pin else None,
        stamp=version_stamp(stored),
    )
    return view, lineage


def _as_view(view: Permutation) -> PermutationView:
    # Permutation's with_* methods copy the instance, so the subclass and lineage survive.
    assert isinstance(view, PermutationView)
    return view
