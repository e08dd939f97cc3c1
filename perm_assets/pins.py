"""Pins: Lance tags that keep the versions a permutation reads, and the retention that
retires them.

A permutation reads its base table at ``base_version``. lancedb only pins that number: if the
version is cleaned up the view fails, and if the base table is dropped and re-created the number
points at other rows. So every permutation materialization creates a Lance tag (a *pin*)
``perm_assets.<permutation table>.<token>`` on the base table's version, on the permutation
table's new version and, for folds, on the training table's version. The pin's name is recorded
in the permutation table's schema; opening a view checks that the pin is still there and still
points at the recorded version: a re-created base table has lost it, so the view fails with a
clear error instead of returning other rows.

Tagged versions survive ``optimize(cleanup_older_than=...)``: Lance refuses to clean them (and
refuses the whole cleanup while a tagged version is older than the cut-off). `retain` keeps the
pins of the latest ``keep`` versions of every permutation table, deletes the rest, then cleans
each table's versions older than both the requested age and its oldest remaining pin.
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
from lancedb.table import Table

from perm_assets.resources import LanceDBResource
from perm_assets.tables import PIN_KEY

PIN_PREFIX = "perm_assets."


def new_pin(perm_table: str) -> str:
    """A fresh pin name for one materialization of ``perm_table``."""
    return f"{PIN_PREFIX}{perm_table}.{secrets.token_hex(6)}"


def pinned_table(pin: str) -> str | None:
    """The permutation table a pin belongs to (None: not a perm_assets pin)."""
    if not pin.startswith(PIN_PREFIX) or pin.count(".") < 2:
        return None
    return pin[len(PIN_PREFIX) :].rsplit(".", 1)[0]


def pin(table: Table, name: str, version: int) -> None:
    """Tag ``version`` of ``table`` as ``name`` (protects it from cleanup)."""
    table.tags.create(name, version)


@dataclass
class RetentionReport:
    """What `retain` did, per table."""

    kept_pins: dict[str, list[str]] = field(default_factory=dict)
    retired_pins: dict[str, list[str]] = field(default_factory=dict)
    versions_removed: dict[str, int] = field(default_factory=dict)
    cleanup_older_than: dict[str, timedelta] = field(default_factory=dict)


def retain(
    db: LanceDBResource,
    *,
    keep: int = 3,
    cleanup_older_than: timedelta = timedelta(days=7),
    instance: dg.DagsterInstance | None = None,
    delete_unverified: bool = False,
    now: datetime | None = None,
) -> RetentionReport:
    """Retire pins no live permutation needs, then clean up old versions.

    Args:
        db: the database.
        keep: keep the pins of the latest ``keep`` versions of every permutation table (>= 1)
            and, with ``instance``, of the latest ``keep`` materializations Dagster recorded for
            every permutation asset of this database, and the versions of table assets those
            materializations recorded (unpinned: the cleanup spares them and everything newer):
            the views of those stay reproducible;
            older ones fail with LineageError. Without ``instance`` only Lance's own versions
            count, and a version Dagster still serves can be retired when newer Lance versions
            have no Dagster record (a write killed after its commit, another Dagster instance on
            the same database): pass the instance whenever there is one.
        cleanup_older_than: remove versions older than this, except pinned ones and anything
            newer than a table's oldest remaining pin (Lance refuses to clean tagged versions).
        instance: the Dagster instance whose materializations must stay readable.
        delete_unverified: also delete files no version references that are younger than
            Lance's 7-day safety window, i.e. the data files of killed writes. Unsafe while
            another process is writing to the database: its in-flight files look the same.
        now: the clock (for tests).
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the latest version of each permutation")
    if instance is None:
        logging.getLogger(__name__).warning(
            "retain() without a Dagster instance: only Lance's latest %d versions per "
            "permutation table keep their pins; a version Dagster still serves may be retired",
            keep,
        )
    connection = db.connect()
    tables = _openable(connection)
    live = _live_pins(tables, keep)
    served: dict[str, set[int]] = {}
    if instance is not None:
        pins, served = _recorded(instance, db, keep)
        live |= pins
    report = RetentionReport()
    for name, table in tables.items():
        pins = {p: int(v["version"]) for p, v in table.tags.list().items() if pinned_table(p)}
        retired = [p for p in pins if p not in live]
        for p in retired:
            table.tags.delete(p)
        kept = sorted(set(pins) - set(retired))
        report.kept_pins[name], report.retired_pins[name] = kept, sorted(retired)
        times = {v["version"]: v["timestamp"] for v in table.list_versions()}
        # Versions Dagster serves without a pin (table assets) are kept like pinned ones: the
        # cleanup spares everything from the oldest of them on.
        unpinned = served.get(name, set()) - {pins[p] for p in kept}
        kept_versions = {pins[p] for p in kept} | unpinned
        oldest = min((times[v] for v in kept_versions if v in times), default=None)
        # Lance refuses to clean a tagged version, so a pin survives a tight cut-off (retried
        # wider below); nothing guards an unpinned one, so its cut-off keeps a minute's slack.
        margin = 60.0 if unpinned & set(times) else 0.005
        older_than = _cleanup(table, cleanup_older_than, oldest, now, delete_unverified, margin)
        if delete_unverified:
            _remove_partial_files(db.uri, name)
        # Versions that existed before and are gone now: the cleanup itself commits versions,
        # so a difference of counts under-counts (it read -2 on every demo run).
        after = {v["version"] for v in table.list_versions()}
        report.versions_removed[name] = len(set(times) - after)
        report.cleanup_older_than[name] = older_than
    return report


def _recorded(
    instance: dg.DagsterInstance, db: LanceDBResource, keep: int
) -> tuple[set[str], dict[str, set[int]]]:
    """What the latest ``keep`` materializations of every asset of database ``db`` recorded:
    their pins (permutation and folds assets) and, per table, their Lance versions."""
    root = _root(db.uri)
    pins: set[str] = set()
    versions: dict[str, set[int]] = {}
    for key in instance.get_asset_keys():
        for record in instance.fetch_materializations(key, limit=keep).records:
            mat = record.asset_materialization
            if mat is None or "dagster/table_name" not in mat.metadata:
                continue
            uri = mat.metadata.get("dagster/uri")
            if uri is not None and _root(str(uri.value)).rsplit("/", 1)[0] != root:
                continue  # another database's asset
            if PIN_METADATA in mat.metadata:
                pins.add(str(mat.metadata[PIN_METADATA].value))
            if "lance/version" in mat.metadata:
                table = str(mat.metadata["dagster/table_name"].value)
                versions.setdefault(table, set()).add(int(str(mat.metadata["lance/version"].value)))
    return pins, versions


PIN_METADATA = "perm_assets/pin"
"""Materialization metadata naming the pin of a permutation or folds materialization."""


def _root(uri: str) -> str:
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri).rstrip("/")


def _cleanup(
    table: Table,
    requested: timedelta,
    oldest_pinned: datetime | None,
    now: datetime | None,
    delete_unverified: bool,
    margin: float,
) -> timedelta:
    """Clean versions older than ``requested`` and than the oldest pinned version.

    The cut-off is computed against our clock, Lance's is taken a moment later: if that moment
    puts the pinned version past the cut-off Lance refuses the whole cleanup (nothing is lost),
    so the margin is widened and the cleanup tried again.
    """
    for widened in (margin, margin * 10, margin * 100, max(5.0, margin * 1000)):
        older_than = requested
        if oldest_pinned is not None:
            # lancedb reports version timestamps as naive local time.
            clock = now or datetime.now()
            older_than = max(requested, clock - oldest_pinned + timedelta(seconds=widened))
        try:
            with warnings.catch_warnings():
                # lancedb warns on a cut-off of 0 (every old version goes): asked for here.
                warnings.simplefilter("ignore", UserWarning)
                table.optimize(cleanup_older_than=older_than, delete_unverified=delete_unverified)
        except RuntimeError as exc:
            if "tagged version" not in str(exc):
                raise
            continue
        return older_than
    raise RuntimeError(
        f"table '{table.name}': Lance kept refusing to clean up around its pinned versions"
    )


def _remove_partial_files(uri: str, name: str) -> None:
    """The ``.tmp*`` files a killed local write leaves in a table's data folder.

    Lance's local writer streams a data file into a temporary name and renames it when the file
    is complete; a write killed mid-file leaves that file, which Lance's cleanup never lists
    (it is no data file of any version). Object stores have no such files: their partial
    uploads are multipart uploads, aborted by the store's lifecycle rules.
    """
    if "://" in uri and not uri.startswith("file://"):
        return
    data = os.path.join(uri.removeprefix("file://"), f"{name}.lance", "data")
    if not os.path.isdir(data):
        return
    for entry in os.scandir(data):
        if entry.name.startswith(".tmp") and entry.is_file():
            os.remove(entry.path)


def _table_names(connection: Any) -> list[str]:
    listed = connection.list_tables()
    return list(getattr(listed, "tables", listed))


def _openable(connection: Any) -> dict[str, Table]:
    """Every listed table that opens. lancedb lists any ``<name>.lance`` folder, also one
    holding only the data files of a first write that was never committed (a failed Ray
    build's fragments, `perm_assets.tables.commit_fragments`): no version, nothing to retain."""
    tables: dict[str, Table] = {}
    for name in _table_names(connection):
        try:
            tables[name] = connection.open_table(name)
        except ValueError:
            logging.getLogger(__name__).info("retain: %s has no committed version; skipped", name)
    return tables


def _live_pins(tables: dict[str, Table], keep: int) -> set[str]:
    """Pins recorded by the latest ``keep`` versions of every permutation table."""
    live: set[str] = set()
    for table in tables.values():
        if PIN_KEY.encode() not in (table.schema.metadata or {}):
            continue
        versions = sorted(int(v["version"]) for v in table.list_versions())[-keep:]
        for version in versions:
            table.checkout(version)
            recorded = (table.schema.metadata or {}).get(PIN_KEY.encode())
            if recorded is not None:
                live.add(recorded.decode())
        table.checkout_latest()
    return live
