"""`LanceDBResource`: where the LanceDB tables live and how to open them.

The resource is frozen configuration. It hands back lancedb's own objects (`DBConnection`,
`Table`) and keeps no state of its own: every call opens what it needs.
"""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, ClassVar, Literal, cast

import dagster as dg
import lancedb
from lancedb.db import DBConnection
from lancedb.table import Table
from pydantic import Field, ValidationError

from perm_assets.errors import SpecError, TableNotFoundError
from perm_assets.specs import explain

# lancedb 0.40's permutation builder sorts inside a DataFusion pool limited to 100 MiB unless this
# variable says otherwise; random splits and shuffles then fail from about 3M rows.
BUILDER_MEMORY_ENV = "LANCEDB_PERM_BUILDER_MEMORY_LIMIT"
DEFAULT_BUILDER_MEMORY_LIMIT_MB = 4096
# engine="auto": lancedb's in-memory builder up to this many filtered rows, the local engine
# above (lancedb's peak grows ~25 bytes per row plus the checks' copies; measured in the README).
AUTO_LOCAL_ABOVE_ROWS = 50_000_000

# The variable is read on each builder run, so it is set around the run. One process-wide lock
# keeps two threads from racing on the environment.
_ENV_LOCK = threading.Lock()


class StrictFields:
    """Refuse unknown keyword arguments at construction, naming the closest field.

    Dagster's configurable resources ignore an unknown scalar keyword
    (``builder_memory_limit=8192`` left the default 4096 in place) and refuse only dict-valued
    ones; a misspelt setting must fail where it is written.
    """

    _SHORTCUTS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **data: Any) -> None:
        fields = cast(dict[str, Any], getattr(type(self), "model_fields", {}))
        known = set(fields) | self._SHORTCUTS
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise SpecError(
                f"{type(self).__name__}: unknown field(s) {', '.join(hints)}; its fields are "
                f"{', '.join(sorted(known))}"
            )
        try:
            super().__init__(**data)
        except ValidationError as exc:
            # One line naming the field, the value and what is allowed (pydantic's own is a
            # block per problem), e.g. "engine 'ray': Input should be 'auto', 'lancedb' or
            # 'local'".
            raise SpecError(f"{type(self).__name__}: {explain(exc)}") from None


class LanceDBResource(StrictFields, dg.ConfigurableResource):
    """A LanceDB database: a local directory or an object-store URI, plus its storage options.

    Example:
        ``LanceDBResource(uri="s3://bucket/lancedb", storage_options={"aws_access_key_id":
        dg.EnvVar("AWS_ACCESS_KEY_ID"), ...})``
    """

    uri: str = Field(
        default="data/lancedb",
        description=(
            "Where the database lives: a local directory (relative paths resolve against the "
            "working directory) or an object-store URI such as 's3://bucket/path'."
        ),
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Options for the object store (endpoint, region, credentials). Pass secrets as "
            "dg.EnvVar so they never appear in run config or the UI."
        ),
    )
    read_consistency_seconds: float | None = Field(
        default=0.0,
        description=(
            "How stale a table handle may be before it re-checks for other processes' commits. "
            "0 checks on every read (safe when several runs write the same tables); None never "
            "re-checks (fastest, single writer only)."
        ),
    )
    builder_memory_limit_mb: int = Field(
        default=DEFAULT_BUILDER_MEMORY_LIMIT_MB,
        ge=64,
        description=(
            "Memory pool for lancedb's permutation builder sort, in MiB. lancedb's default of "
            "100 MiB fails from about 3M rows; 4096 MiB covers well over 10M rows. Raise it for "
            "larger tables (the sort spills to disk beyond the pool only where lancedb can)."
        ),
    )

    engine: Literal["auto", "lancedb", "local", "ray"] = Field(
        default="auto",
        description=(
            "What builds permutation and folds tables. 'lancedb': lancedb's builder, in memory "
            "(fastest below tens of millions of rows; ~2.5 GiB at 100M rows). 'local': the "
            "out-of-core engine (perm_assets.engines.local), spill files on local disk, memory "
            "bounded by local_bucket_rows; other rows than lancedb's for the same seed, the "
            "same rows on every run. 'auto': lancedb up to auto_local_above_rows filtered "
            "rows, local above (lancedb, with a log line, for kinds local does not build). "
            "'ray': the distributed engine (perm_assets.engines.ray) on the Ray cluster at "
            "ray_address, the same rows as 'local' (needs pip install 'perm-assets[ray]')."
        ),
    )
    ray_address: str | None = Field(
        default=None,
        description=(
            "engine='ray': the Ray cluster to build on, e.g. '10.0.0.5:6379' or 'ray://head:10001' "
            "(Ray client). None: $RAY_ADDRESS, else a local Ray started for the build. Workers "
            "read the tables with credentials from their own environment (AWS_* variables, "
            "instance roles); secret storage options are never sent in Ray task arguments."
        ),
    )
    auto_local_above_rows: int = Field(
        default=AUTO_LOCAL_ABOVE_ROWS,
        ge=0,
        description=(
            "engine='auto' builds with the local engine above this many filtered rows. The "
            "default, 50M, keeps lancedb's faster in-memory build where it peaks at a few GiB "
            "(see the README's engine figures)."
        ),
    )
    spill_dir: str | None = Field(
        default=None,
        description=(
            "Local folder for the local engine's spill files (about 16 bytes per filtered row, "
            "20 with a label), one subfolder per build, removed when it ends; a killed build's "
            "is removed by the next build. None: the system temporary folder."
        ),
    )
    local_bucket_rows: int = Field(
        default=8_000_000,
        ge=1,
        description=(
            "Rows the local engine sorts in memory at once (~40 bytes each at peak). Smaller: "
            "less memory, more spill files. It does not change the rows built."
        ),
    )
    local_scan_batch_rows: int = Field(
        default=1 << 20,
        ge=1,
        description="Rows per batch the local engine reads from the base table.",
    )

    cache_dir: str | None = Field(
        default=None,
        description=(
            "Local folder of the column cache that views opened with cache=True read from "
            "(ViewRequest / AssetIn metadata {'cache': True}, load_view(cache=True)): the "
            "selected columns at the pinned version, fetched once, shared by the processes "
            "of a node. None: $XDG_CACHE_HOME/perm_assets (else ~/.cache/perm_assets)."
        ),
    )
    cache_max_bytes: int = Field(
        default=64 << 30,
        gt=0,
        description=(
            "Bound on the column cache's size in bytes (default 64 GiB); least recently used "
            "entries are removed first. A view needing more than this fails with a clear error."
        ),
    )

    def column_cache(self) -> tuple[str, int]:
        """``(folder, max bytes)`` of the column cache (the folder resolved now, not at import)."""
        if self.cache_dir is not None:
            return self.cache_dir, self.cache_max_bytes
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "perm_assets"), self.cache_max_bytes

    def connect(self) -> DBConnection:
        """Open a connection to the database (cheap; nothing is read until a table is opened)."""
        interval = (
            None
            if self.read_consistency_seconds is None
            else timedelta(seconds=self.read_consistency_seconds)
        )
        return lancedb.connect(
            self.uri,
            storage_options=self.resolved_storage_options() or None,
            read_consistency_interval=interval,
        )

    def resolved_storage_options(self) -> dict[str, str]:
        """The storage options with every ``dg.EnvVar`` read from the environment.

        Dagster resolves them when a run starts; a resource built and used directly (a
        notebook, a script, ``python -m perm_assets``) still holds the variables' *names*, which
        lancedb would send as credentials.

        Raises:
            ValueError: a named environment variable is not set (the message names it, never
                a value).
        """
        resolved: dict[str, str] = {}
        for key, value in self.storage_options.items():
            if isinstance(value, dg.EnvVar):
                found = value.get_value()
                if found is None:
                    raise ValueError(
                        f"LanceDB storage option '{key}' reads environment variable "
                        f"'{value.env_var_name}', which is not set; set it or pass the option "
                        "another way"
                    )
                resolved[key] = found
            else:
                resolved[key] = value
        return resolved

    def table_exists(self, name: str) -> bool:
        """Whether a table called ``name`` exists in the database.

        Only lancedb's "not found" counts as absent: a refused or failed request (bad
        credentials, an unreachable store) raises instead of reading as "no table".
        """
        try:
            self.connect().open_table(name)
        except ValueError as exc:
            if _is_not_found(exc):
                return False
            raise
        return True

    def open_table(
        self, name: str, *, version: int | None = None, asset: str | None = None
    ) -> Table:
        """Open table ``name``, checked out read-only at Lance ``version`` when one is given.

        ``asset``: the asset on whose behalf it is opened (named in the error).

        Raises:
            TableNotFoundError: the table, or that version of it, does not exist.
        """
        whose = f"asset '{asset}': " if asset else ""
        fix = f"Re-materialize asset '{asset}'" if asset else "Re-materialize the asset"
        db = self.connect()
        try:
            table = db.open_table(name)
        except ValueError as exc:  # lancedb: "Table 'x' was not found"
            if not _is_not_found(exc):
                raise
            raise TableNotFoundError(
                f"{whose}LanceDB table '{name}' does not exist at '{self.uri}'. Materialize the "
                "asset that writes it first."
            ) from exc
        if version is not None:
            try:
                table.checkout(version)
            except (ValueError, OSError, RuntimeError) as exc:
                raise TableNotFoundError(
                    f"{whose}LanceDB table '{name}' at '{self.uri}' has no version {version} "
                    f"(latest: {table.version}): it was cleaned up, or the table was dropped and "
                    f"re-created since that version was recorded. {fix}."
                ) from exc
        return table

    @contextmanager
    def builder_memory(self) -> Iterator[None]:
        """Run lancedb's permutation builder with this resource's memory pool.

        An explicit ``LANCEDB_PERM_BUILDER_MEMORY_LIMIT`` in the environment is left alone only
        when it is larger: the configured floor never lowers what an operator raised.
        """
        wanted = self.builder_memory_limit_mb * 1024 * 1024
        with _ENV_LOCK:
            previous = os.environ.get(BUILDER_MEMORY_ENV)
            if previous is not None and previous.isdigit() and int(previous) >= wanted:
                yield
                return
            os.environ[BUILDER_MEMORY_ENV] = str(wanted)
            try:
                yield
            finally:
                if previous is None:
                    os.environ.pop(BUILDER_MEMORY_ENV, None)
                else:
                    os.environ[BUILDER_MEMORY_ENV] = previous


def _is_not_found(exc: BaseException) -> bool:
    """lancedb's "Table 'x' was not found", as opposed to a refused or failed request."""
    return "not found" in str(exc).lower()
