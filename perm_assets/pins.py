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

import secrets
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from lancedb.table import Table

from perm_assets.errors import LineageError
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


def verify_pin(base: Table, pin_name: str | None, version: int, *, asset: str) -> None:
    """Raise LineageError unless ``base`` still carries pin ``pin_name`` at ``version``.

    Views of permutations persisted before pins existed (no ``pin_name``) are not checked.
    """
    if pin_name is None:
        return
    tags = base.tags.list()
    found = tags.get(pin_name)
    if found is not None and int(found["version"]) == version:
        return
    state = "no such tag" if found is None else f"it at version {found['version']}"
    raise LineageError(
        f"asset '{asset}' pins version {version} of base table '{base.name}' with tag "
        f"'{pin_name}', but the table has {state}: the base table was dropped and re-created, "
        "or the pin was retired by retain(). Reading would return other rows than were "
        f"materialized; re-materialize asset '{asset}'."
    )


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
    now: datetime | None = None,
) -> RetentionReport:
    """Retire pins no live permutation needs, then clean up old versions.

    Args:
        db: the database.
        keep: keep the pins of the latest ``keep`` versions of every permutation table (>= 1):
            the views of those versions stay reproducible; older ones fail with LineageError.
        cleanup_older_than: remove versions older than this, except pinned ones and anything
            newer than a table's oldest remaining pin (Lance refuses to clean tagged versions).
        now: the clock (for tests).
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the latest version of each permutation")
    connection = db.connect()
    tables = {name: connection.open_table(name) for name in _table_names(connection)}
    live = _live_pins(tables, keep)
    report = RetentionReport()
    for name, table in tables.items():
        pins = {p: int(v["version"]) for p, v in table.tags.list().items() if pinned_table(p)}
        retired = [p for p in pins if p not in live]
        for p in retired:
            table.tags.delete(p)
        kept = sorted(set(pins) - set(retired))
        report.kept_pins[name], report.retired_pins[name] = kept, sorted(retired)
        times = {v["version"]: v["timestamp"] for v in table.list_versions()}
        oldest = min((times[pins[p]] for p in kept if pins[p] in times), default=None)
        before = len(times)
        older_than = _cleanup(table, cleanup_older_than, oldest, now)
        report.versions_removed[name] = before - len(table.list_versions())
        report.cleanup_older_than[name] = older_than
    return report


def _cleanup(
    table: Table, requested: timedelta, oldest_pinned: datetime | None, now: datetime | None
) -> timedelta:
    """Clean versions older than ``requested`` and than the oldest pinned version.

    The cut-off is computed against our clock, Lance's is taken a moment later: if that moment
    puts the pinned version past the cut-off Lance refuses the whole cleanup (nothing is lost),
    so the margin is widened and the cleanup tried again.
    """
    for margin in (0.005, 0.05, 0.5, 5.0):
        older_than = requested
        if oldest_pinned is not None:
            # lancedb reports version timestamps as naive local time.
            clock = now or datetime.now()
            older_than = max(requested, clock - oldest_pinned + timedelta(seconds=margin))
        try:
            with warnings.catch_warnings():
                # lancedb warns on a cut-off of 0 (every old version goes): asked for here.
                warnings.simplefilter("ignore", UserWarning)
                table.optimize(cleanup_older_than=older_than)
        except RuntimeError as exc:
            if "tagged version" not in str(exc):
                raise
            continue
        return older_than
    raise RuntimeError(
        f"table '{table.name}': Lance kept refusing to clean up around its pinned versions"
    )


def _table_names(connection: Any) -> list[str]:
    listed = connection.list_tables()
    return list(getattr(listed, "tables", listed))


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
