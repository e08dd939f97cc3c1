"""`lancedb_table_source`: a LanceDB table written by someone else, as an observable asset.

Its data version is the table's Lance version (``<table>@<version>``), so permutation assets
built on it show as stale ("Unsynced") in the UI as soon as an observation sees a new version,
and fresh again once they re-run. The IO manager reads it at the observed version.
"""

import warnings
from collections.abc import Sequence

import dagster as dg

from perm_assets.resources import LanceDBResource
from perm_assets.tables import SOURCE_TABLE_KEY, table_name

KIND_KEY = "perm_assets/kind"


def lancedb_table_source(
    name: str,
    *,
    table: str | None = None,
    key_prefix: str | Sequence[str] | None = None,
    group_name: str | None = None,
    description: str | None = None,
    io_manager_key: str = "io_manager",
    resource_key: str = "lancedb",
    automation_condition: dg.AutomationCondition | None = None,
) -> dg.SourceAsset:
    """An observable source asset for LanceDB table ``table`` (default: named after the key).

    Observing it (from the UI, a schedule or a sensor) records the table's current Lance
    version, row count and schema; downstream assets read it at that version.

    Example:
        ``events = lancedb_table_source("events", table="raw_events")`` then
        ``permutation_asset("events_splits", source=events, split=HashSplit(...))``.
    """
    prefix = [key_prefix] if isinstance(key_prefix, str) else list(key_prefix or [])
    key = dg.AssetKey([*prefix, name])
    stored = table or table_name(key)

    def _observe(context: dg.OpExecutionContext) -> dg.ObserveResult:
        db = getattr(context.resources, resource_key)
        if not isinstance(db, LanceDBResource):
            raise TypeError(
                f"source '{key.to_user_string()}' needs a LanceDBResource under resource key "
                f"'{resource_key}', got {type(db).__name__}"
            )
        opened = db.open_table(stored)
        return dg.ObserveResult(
            data_version=dg.DataVersion(f"{stored}@{opened.version}"),
            metadata={
                "lance/version": opened.version,
                "dagster/row_count": opened.count_rows(),
                "dagster/table_name": stored,
                "dagster/column_schema": dg.TableSchema(
                    columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in opened.schema]
                ),
            },
        )

    with warnings.catch_warnings():
        # Observable source assets are the documented way to version external data; Dagster
        # flags the decorator beta.
        warnings.simplefilter("ignore", dg.BetaWarning)
        source = dg.observable_source_asset(
            key=key,
            io_manager_key=io_manager_key,
            required_resource_keys={resource_key},
            group_name=group_name,
            description=description or f"LanceDB table '{stored}', written outside this project.",
            metadata={KIND_KEY: "table", SOURCE_TABLE_KEY: stored},
            automation_condition=automation_condition,
        )(_observe)
    assert isinstance(source, dg.SourceAsset)
    return source
