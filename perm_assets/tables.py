"""How assets map to LanceDB tables, and how tables are written safely.

A table asset ``["ml", "digits"]`` lives in table ``ml__digits``. A permutation table carries its
own description in its Arrow schema metadata, so a persisted version can be read back without
Dagster: ``split_names`` and ``base_version`` (lancedb's keys) plus ``perm_assets.base_table``
and ``perm_assets.spec``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import dagster as dg
import pandas as pd
import pyarrow as pa
from lancedb.db import DBConnection
from lancedb.query import LanceQueryBuilder
from lancedb.table import Table

from perm_assets.errors import SpecError

if TYPE_CHECKING:  # pylance comes with the ray extra: imported only when fragments are committed
    from lance.fragment import FragmentMetadata

SPLIT_NAMES_KEY = "split_names"
BASE_VERSION_KEY = "base_version"
BASE_TABLE_KEY = "perm_assets.base_table"
SPEC_KEY = "perm_assets.spec"
# Folds tables: what kind of permutation, and where their training sets are persisted.
KIND_META_KEY = "perm_assets.kind"
TRAIN_TABLE_KEY = "perm_assets.train_table"
TRAIN_VERSION_KEY = "perm_assets.train_version"
# JSON [[offset, rows], ...]: fold i trains on rows offset .. offset + rows of the training table.
TRAIN_RANGES_KEY = "perm_assets.train_ranges"
# Asset metadata naming the LanceDB table of an observed source (default: from the key).
SOURCE_TABLE_KEY = "perm_assets/table"
# The Lance tag that pins the base version (see perm_assets.pins).
PIN_KEY = "perm_assets.pin"

_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Lance commits are optimistic: a writer that lost a race gets "Retryable commit conflict".
_CONFLICT_MARKERS = ("commit conflict", "retryable")
_MAX_ATTEMPTS = 8


class WriteMode(StrEnum):
    """How a table output lands: each is one atomic Lance commit, i.e. one new version."""

    OVERWRITE = "overwrite"
    APPEND = "append"


def table_name(key: dg.AssetKey) -> str:
    """LanceDB table name of an asset: its key path joined by ``__``."""
    name = "__".join(key.path)
    if not _NAME_OK.match(name):
        raise ValueError(
            f"asset {key.to_user_string()!r} maps to LanceDB table name {name!r}, which has "
            "characters LanceDB does not allow; use letters, digits, '_', '-' and '.' in keys"
        )
    return name


def is_permutation_schema(schema: pa.Schema) -> bool:
    """Whether ``schema`` is a permutation table's (``row_id``/``split_id`` uint64 + base pin)."""
    names = schema.names
    return (
        "row_id" in names
        and "split_id" in names
        and pa.types.is_uint64(schema.field("row_id").type)
        and pa.types.is_uint64(schema.field("split_id").type)
        and BASE_VERSION_KEY.encode() in (schema.metadata or {})
    )


TableData = pa.Table | pa.RecordBatchReader | pd.DataFrame


def where(sql: str | None) -> str | None:
    """A filter or expression as handed to lancedb: in parentheses, the ``)`` on its own line.

    lancedb 0.40 parses the first expression of a filter and ignores the rest: ``id < 10
    LIMIT 1`` or ``id < 10 garbage`` select the rows of ``id < 10``. Inside parentheses the rest
    is a parse error instead. The line break ends a trailing ``--`` comment before the ``)``
    (comments are refused when the spec is built; this is the second line of defence).
    """
    return None if sql is None else f"({sql}\n)"


def looks_like_permutation(schema: pa.Schema) -> bool:
    """Columns or metadata of a permutation table, whether or not `is_permutation_schema`
    accepts it (e.g. an int64 ``split_id``): such a table must never be read as data."""
    metadata = schema.metadata or {}
    marked = BASE_VERSION_KEY.encode() in metadata or BASE_TABLE_KEY.encode() in metadata
    return marked and "row_id" in schema.names


READ_BATCH_ROWS = 1 << 20
"""Rows per batch when a table or scan is read into Arrow.

lancedb 0.40's ``to_arrow()`` reads in small batches: a 9M-row permutation table took 1.5 s
that way and 0.2 s in 1M-row batches; one int64 column of 10M rows, 1.9 s against 0.1 s.
"""


def read_all(source: Table | LanceQueryBuilder) -> pa.Table:
    """All rows of a table or query, in stored order, with the table's schema metadata."""
    query = source.search() if isinstance(source, Table) else source
    return query.to_batches(batch_size=READ_BATCH_ROWS).read_all()


def write_table(db: DBConnection, name: str, data: TableData, mode: WriteMode) -> Table:
    """Write ``data`` as one new version of table ``name`` and return the table at it.

    A ``RecordBatchReader`` streams batch by batch into the commit; a failure part way leaves the
    previous version as the latest. In-memory data is retried on a commit conflict with jittered
    backoff (another process wrote the same table meanwhile); a consumed stream cannot be.

    The returned table is checked out (read-only) at the version this write committed. A handle
    left at "latest" on a connection with a read-consistency interval (the resource's default)
    reports and reads whatever another process committed since, and the caller would record,
    pin and count that version as its own.
    """
    log = logging.getLogger(__name__)
    attempts = 1 if isinstance(data, pa.RecordBatchReader) else _MAX_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            try:
                # A fresh handle each attempt: one that lost a commit race never sees the winner
                # when the connection does not re-check (read_consistency_interval=None).
                table = db.open_table(name)
            except ValueError:  # no table yet: this write creates it
                if mode is WriteMode.APPEND:
                    # Two first appends creating the table at once can both commit a version 1
                    # and lose one's rows (lancedb 0.40). An empty create races harmlessly; the
                    # append below is then a normal, conflict-retried commit.
                    table = db.create_table(name, schema=_schema_of(data), exist_ok=True)
                    written = table.add(data, mode=mode.value)
                    table.checkout(written.version)
                    return table
                try:
                    table = db.create_table(name, data)
                except ValueError as exc:
                    if "already exists" not in str(exc) or attempt == attempts:
                        raise
                    # Another writer created it since our open: the next attempt writes onto it.
                    log.warning("table %s: created by another writer meanwhile, retrying", name)
                    continue
                # create_table reports no version, so it is read at once. A concurrent creator
                # committing in between would be named instead: lancedb 0.40 offers no exact
                # value here (add() does, below).
                table.checkout(table.version)
                return table
            written = table.add(data, mode=mode.value)  # the version this commit made
            table.checkout(written.version)
            return table
        except (RuntimeError, OSError) as exc:
            if "incompatible transaction" in str(exc).lower():
                # An append (or overwrite) lost to another process's overwrite: Lance refuses
                # to put these rows onto a table that was replaced meanwhile. Retrying would
                # append them to rows this writer never saw, so say what happened instead.
                raise ConcurrentWriteError(
                    f"table '{name}': another process replaced the table (an overwrite) while "
                    f"this run wrote to it with mode '{mode.value}'; nothing of this write was "
                    "committed and the other write is intact. Re-run to write onto the new "
                    f"table. Lance: {str(exc).splitlines()[0]}"
                ) from exc
            if attempt == attempts or not _is_conflict(exc):
                raise
            log.warning(
                "table %s: commit conflict on attempt %d of %d, retrying: %s",
                name,
                attempt,
                attempts,
                str(exc).splitlines()[0],
            )
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")  # the loop returns or raises


@dataclass(frozen=True)
class FragmentWrite:
    """Rows an engine writes itself, as Lance data files (e.g. on its Ray workers, never through
    this process), for `commit_fragments` to make visible as one new table version.

    Attributes:
        write: writes the rows into the table at the location it is given (a Lance dataset
            URI, which may not exist yet) and returns their fragments in table order. What it
            writes is invisible until committed.
    """

    write: Callable[[str], list[FragmentMetadata]]


def commit_fragments(
    db: DBConnection,
    name: str,
    fragments: FragmentWrite,
    schema: pa.Schema,
    *,
    storage_options: Mapping[str, str] | None = None,
) -> Table:
    """`write_table`'s overwrite for rows an engine writes itself: ``fragments`` are written
    into table ``name`` (created by this commit when it does not exist), then committed in one
    Lance commit with ``schema`` (its metadata included), and the table is returned checked out
    at the version this commit made.

    lancedb has no API to commit data files written elsewhere, so this goes through pylance
    (``LanceDataset.commit`` of an ``Overwrite``, as lance-ray's own datasink commits).
    ``storage_options``: the connection's (this process commits; credentials included).

    Nothing is visible before the commit: when the write fails part way, or the commit does,
    the previous version stays the latest (a table that did not exist still does not open).
    Data files written but never committed belong to no version and are left to Lance:
    ``cleanup_old_versions`` deletes a failed transaction's files once they are 7 days old
    (younger ones may be another writer's, still in progress), so a failed write costs disk
    until then, never rows; deleting them here could not reach a killed task's files. A
    commit that lost a race to another writer is retried (the files are not written again):
    an overwrite does not depend on the version it replaces.
    """
    import lance

    if str(cast(Any, db).uri).startswith("s3+ddb://"):
        # Before any file is written: pylance's commit would bypass lancedb's DynamoDB commit
        # store, so concurrent writers through lancedb could both commit a version.
        raise SpecError(
            f"table '{name}': an engine that writes fragments on its workers (engine='ray') "
            f"commits them through pylance, which does not use the DynamoDB commit store of "
            f"the s3+ddb:// database {cast(Any, db).uri!r}; use engine='local' (or 'lancedb') "
            "there, or an s3:// database"
        )
    log = logging.getLogger(__name__)
    options = dict(storage_options) if storage_options else None
    uri: str | None = None
    written: list[FragmentMetadata] | None = None
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            # A fresh handle each attempt: the latest version, also one committed meanwhile.
            current: Table | None = db.open_table(name)
        except ValueError:  # no table yet: this commit creates it
            current = None
        read_version = None if current is None else current.version
        if uri is None:
            uri = _location(db, name, current)
        if written is None:
            written = fragments.write(uri)
        try:
            committed = lance.LanceDataset.commit(
                uri,
                lance.LanceOperation.Overwrite(schema, written),
                read_version=read_version,
                storage_options=options,
            )
        except (RuntimeError, OSError, ValueError) as exc:
            if attempt == _MAX_ATTEMPTS or not (_is_conflict(exc) or _exists(exc)):
                raise
            log.warning(
                "table %s: commit conflict on attempt %d of %d, retrying: %s",
                name,
                attempt,
                _MAX_ATTEMPTS,
                str(exc).splitlines()[0],
            )
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
            continue
        table = db.open_table(name)
        table.checkout(committed.version)
        return table
    raise AssertionError("unreachable")  # the loop returns or raises


def _location(db: DBConnection, name: str, table: Table | None) -> str:
    """Where table ``name`` is (or will be) stored: lancedb's ``<database>/<name>.lance``."""
    if table is not None:
        return str(cast(Any, table).uri)
    return f"{str(cast(Any, db).uri).rstrip('/')}/{name}.lance"


def _exists(exc: BaseException) -> bool:
    """Another writer created the table between our look and our commit."""
    return "already exists" in str(exc).lower()


class ConcurrentWriteError(RuntimeError):
    """A write lost to another process's incompatible commit; nothing of it was committed."""


def _schema_of(data: TableData) -> pa.Schema:
    if isinstance(data, pd.DataFrame):
        return pa.Schema.from_pandas(data, preserve_index=False)
    return data.schema


def _is_conflict(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _CONFLICT_MARKERS)
