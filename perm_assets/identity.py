"""What identifies one Lance table version, and the checks that a pinned version is still it.

Kept free of dagster and lancedb imports: a forked DataLoader worker's read helper
(`perm_assets.forked`) runs these checks on pylance datasets, and its start-up is in the
worker's first batch. Any ``table`` here only needs ``name``, ``version``, ``tags.list()``
and ``list_versions()`` (a lancedb ``Table``, or `perm_assets.reader.LanceStore`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from perm_assets.errors import LineageError

__all__ = ["VersionIdentity", "Versioned", "verify_identity", "verify_pin", "version_stamp"]


class Versioned(Protocol):
    """What these checks read of a table: lancedb's ``Table`` has it, and so does
    `perm_assets.reader.LanceStore` over a pylance dataset."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def tags(self) -> Any: ...

    def list_versions(self) -> list[dict[str, Any]]: ...


def verify_pin(base: Versioned, pin_name: str | None, version: int, *, asset: str) -> None:
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


def version_stamp(table: Versioned, version: int | None = None) -> int | None:
    """When Lance committed ``version`` of ``table`` (default: its checked-out version), in
    microseconds since the epoch; None when the version is not listed.

    A dropped and re-created table reuses version numbers, never commit times (microsecond
    precision), so (version, stamp) identifies the rows a version holds. Table assets have no
    pin; this is their identity. lancedb reports naive local times; ``.timestamp()`` reads them
    in the same local zone, so the stamp is the same in every time zone.
    """
    wanted = table.version if version is None else version
    for listed in table.list_versions():
        if int(listed["version"]) == wanted:
            return round(listed["timestamp"].timestamp() * 1_000_000)
    return None


@dataclass(frozen=True)
class VersionIdentity:
    """What a materialization or a view recorded of one table version: enough to tell it from
    another table's version of the same number.

    ``pin`` (permutation and folds tables: the tag made with the materialization) or ``stamp``
    (`version_stamp`, any table); either may be None for records made before they existed.
    """

    version: int
    pin: str | None = None
    stamp: int | None = None


def verify_identity(table: Versioned, identity: VersionIdentity, *, asset: str) -> None:
    """Raise LineageError unless ``table`` at ``identity.version`` is the recorded one."""
    problem = None
    if identity.pin is not None:
        tag = table.tags.list().get(identity.pin)
        if tag is None or int(tag["version"]) != identity.version:
            problem = f"has no tag '{identity.pin}' at version {identity.version}"
    if problem is None and identity.stamp is not None:
        found = version_stamp(table, identity.version)
        if found != identity.stamp:
            problem = (
                f"version {identity.version} was committed at {_when(found)}, not at "
                f"{_when(identity.stamp)} as recorded"
            )
    if problem is not None:
        raise LineageError(
            f"asset '{asset}': table '{table.name}' {problem}: the table was dropped and "
            "re-created (or the version retired by retain()) since it was recorded. Reading it "
            f"would return other rows; re-materialize asset '{asset}'."
        )


def _when(stamp: int | None) -> str:
    if stamp is None:
        return "no recorded time"
    return datetime.fromtimestamp(stamp / 1_000_000).isoformat(sep=" ")
