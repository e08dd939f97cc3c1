"""Exceptions that name what went wrong, the offending value and the fix."""

from __future__ import annotations


class SpecError(ValueError):
    """A permutation spec, config or input request that can never produce correct rows."""

    parts: list[str] | None = None
    """For a spec's own validation error: one ``field value: message`` entry per problem."""


class TableNotFoundError(LookupError):
    """A LanceDB table, or the version of it that an asset recorded, is not there."""


class LineageError(LookupError):
    """A recorded view cannot be reopened faithfully: a version was cleaned up, a table was
    deleted, or the base table was dropped and re-created."""
