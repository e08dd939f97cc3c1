"""Which engine computes a permutation or folds asset: chosen by configuration, not asset code.

- ``"lancedb"``: lancedb's permutation builder (and this project's numpy assignment for the
  kinds it lacks), in memory (`perm_assets.build`, `perm_assets.folds`). Fast below tens of
  millions of rows; memory grows with the row count (~2.5 GiB at 100M rows, more with checks).
- ``"local"``: the out-of-core engine (`perm_assets.engines.local`): bucketed external sort
  through spill files, memory bounded by ``LanceDBResource.local_bucket_rows``. Other rows
  than lancedb's for the same seed; deterministic for (table version, spec, seed).
- ``"ray"``: the distributed engine (`perm_assets.engines.ray`) on the Ray cluster at
  ``LanceDBResource.ray_address``: the local engine's rows for every kind it builds, computed
  by Ray Data tasks (needs the ``ray`` extra; imported only when chosen).
- ``"auto"`` (default): ``"lancedb"`` up to ``LanceDBResource.auto_local_above_rows`` filtered
  rows, ``"local"`` above (falling back to ``"lancedb"``, with a log line, for a kind the local
  engine does not build yet).

A new engine is a module here plus a branch in `_resolve`. Each builder yields the same
`PermutationData` / `FoldsData` the IO manager persists, so views and checks stay unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, get_args

from perm_assets.errors import SpecError

if TYPE_CHECKING:
    from lancedb.table import Table

    from perm_assets import build, folds
    from perm_assets.engines import local
    from perm_assets.resources import LanceDBResource
    from perm_assets.specs import FoldsSpec, PermutationSpec

# The builders import lancedb, dagster and the engines when called, not here: Ray workers import
# this package to run `perm_assets.engines.ray_tasks` and should not pay for them.

Engine = Literal["auto", "lancedb", "local", "ray"]
ENGINES: tuple[str, ...] = get_args(Engine)
"""Every engine name ``LanceDBResource(engine=...)`` accepts."""


def _resolve(
    db: LanceDBResource,
    table: Table,
    spec: PermutationSpec | FoldsSpec,
    *,
    asset: str,
    log: logging.Logger | None,
) -> str:
    """The engine that builds ``spec``: the configured one, or for ``"auto"`` by row count."""
    engine = db.engine
    if engine not in ENGINES:  # the resource refuses others; a value set around pydantic
        raise SpecError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    from perm_assets.engines import local
    from perm_assets.tables import where

    try:
        rows = table.count_rows(where(spec.filter))
    except (ValueError, RuntimeError):
        return "lancedb"  # it names the bad filter with the table's columns
    if rows <= db.auto_local_above_rows:
        return "lancedb"
    missing = local.unsupported(spec)
    if missing is not None:
        (log or logging.getLogger(__name__)).warning(
            f"{asset}: {rows} filtered rows is above auto_local_above_rows="
            f"{db.auto_local_above_rows}, but the local engine does not build {missing} yet; "
            "building with lancedb's builder (in memory)"
        )
        return "lancedb"
    (log or logging.getLogger(__name__)).info(
        f"{asset}: {rows} filtered rows, above auto_local_above_rows="
        f"{db.auto_local_above_rows}: out-of-core local engine"
    )
    return "local"


def _settings(db: LanceDBResource) -> local.LocalSettings:
    from perm_assets.engines import local

    return local.LocalSettings(
        spill_dir=db.spill_dir,
        bucket_rows=db.local_bucket_rows,
        scan_batch_rows=db.local_scan_batch_rows,
    )


@contextmanager
def build_permutation(
    db: LanceDBResource,
    table: Table,
    spec: PermutationSpec,
    *,
    asset: str,
    log: logging.Logger | None = None,
) -> Iterator[build.PermutationData]:
    """The permutation of ``spec`` (seeds resolved) over ``table`` by the configured engine.

    Use the result inside the block: a local build streams it from spill files that are
    removed when the block exits (normally, on an error, or when its generator is closed).
    """
    from perm_assets import build
    from perm_assets.engines import local

    engine = _resolve(db, table, spec, asset=asset, log=log)
    if engine == "ray":
        from perm_assets.engines import ray  # Ray is an optional extra: imported when chosen

        with ray.build_permutation(
            table,
            spec,
            asset=asset,
            address=db.ray_address,
            storage_options=db.resolved_storage_options(),
        ) as data:
            yield data
        return
    if engine == "local":
        with local.Spill(db.spill_dir) as spill:
            yield local.build_permutation(
                table, spec, asset=asset, spill=spill, settings=_settings(db)
            )
        return
    with db.builder_memory():
        data = build.build_permutation(table, spec, asset=asset)
    yield data


@contextmanager
def build_folds(
    db: LanceDBResource,
    table: Table,
    spec: FoldsSpec,
    *,
    asset: str,
    log: logging.Logger | None = None,
) -> Iterator[folds.FoldsData]:
    """The folds of ``spec`` (seeds resolved) over ``table`` by the configured engine; as
    `build_permutation`, use the result inside the block."""
    from perm_assets import folds
    from perm_assets.engines import local

    engine = _resolve(db, table, spec, asset=asset, log=log)
    if engine == "ray":
        from perm_assets.engines import ray  # Ray is an optional extra: imported when chosen

        with ray.build_folds(
            table,
            spec,
            asset=asset,
            address=db.ray_address,
            storage_options=db.resolved_storage_options(),
        ) as folds_data:
            yield folds_data
        return
    if engine == "local":
        with local.Spill(db.spill_dir) as spill:
            yield local.build_folds(table, spec, asset=asset, spill=spill, settings=_settings(db))
        return
    yield folds.build_folds(table, spec, asset=asset)
