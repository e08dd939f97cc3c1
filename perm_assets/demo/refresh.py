"""The refresh half of the demo: a table that grows on a schedule, a hash split that follows it
(eager automation), and the maintenance that retires old pins.

Each refresh appends the next 300 handwritten digits (ids continue, so every row is new); the
hash split keeps every existing id in its split, which its blocking check
``no_row_moved_between_splits`` verifies and reports (rows moved: 0, rows added per split).
"""

from datetime import timedelta

import dagster as dg
import numpy as np
import pyarrow as pa
from pydantic import Field

from perm_assets import HashSplit, LanceDBResource, permutation_asset
from perm_assets.pins import retain

GROUP = "digit_batches"
BATCH_ROWS = 300
PIXELS = 64


@dg.asset(group_name=GROUP, kinds={"lancedb"}, metadata={"write_mode": "append"})
def digit_batches(lancedb: LanceDBResource) -> pa.Table:
    """A growing table of digits: each materialization appends the next 300 (``id`` continues
    across refreshes, ``batch`` counts them)."""
    from sklearn.datasets import load_digits

    features, target = load_digits(return_X_y=True)
    start = lancedb.open_table("digit_batches").count_rows() if _exists(lancedb) else 0
    ids = np.arange(start, start + BATCH_ROWS, dtype=np.int64)
    rows = ids % len(target)
    pixels = np.ascontiguousarray(features[rows], dtype=np.float32)
    return pa.table(
        {
            "id": ids,
            "batch": np.full(BATCH_ROWS, start // BATCH_ROWS, dtype=np.int64),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), PIXELS),
            "label": np.asarray(target[rows], dtype=np.int64),
        }
    )


def _exists(lancedb: LanceDBResource) -> bool:
    return lancedb.table_exists("digit_batches")


digit_batches_splits = permutation_asset(
    "digit_batches_splits",
    source=digit_batches,
    split=HashSplit(columns=["id"], weights=[4, 1], split_names=["train", "test"]),
    group_name=GROUP,
    description="80/20 train/test by a hash of id: a refresh only adds rows, never moves them.",
    automation_condition=dg.AutomationCondition.eager(),
)

refresh_schedule = dg.ScheduleDefinition(
    name="refresh_digit_batches",
    cron_schedule="0 * * * *",
    target=[digit_batches],
    description="Hourly: append the next digits; the hash split follows by eager automation.",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)

# Dagster ships its default automation sensor stopped; the demo's runs as soon as the daemon does.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "perm_assets_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
)


class MaintenanceConfig(dg.Config):
    """How much history the maintenance keeps."""

    keep: int = Field(
        default=3,
        ge=1,
        description="Keep the pins of the latest this many versions of every permutation.",
    )
    cleanup_older_than_days: float = Field(
        default=7.0,
        ge=0,
        description="Remove unpinned versions older than this many days.",
    )


@dg.asset(group_name="maintenance", deps=[digit_batches_splits])
def lance_maintenance(
    context: dg.AssetExecutionContext, config: MaintenanceConfig, lancedb: LanceDBResource
) -> dg.MaterializeResult:
    """Retire the pins that no kept permutation version needs, then clean up old versions."""
    report = retain(
        lancedb,
        keep=config.keep,
        cleanup_older_than=timedelta(days=config.cleanup_older_than_days),
        instance=context.instance,  # what Dagster serves stays pinned, whatever Lance holds
    )
    retired = sum(len(p) for p in report.retired_pins.values())
    removed = sum(report.versions_removed.values())
    context.log.info(f"retired {retired} pins, removed {removed} versions")
    return dg.MaterializeResult(
        metadata={
            "pins_retired": retired,
            "pins_kept": sum(len(p) for p in report.kept_pins.values()),
            "versions_removed": removed,
            "versions_removed_by_table": dg.MetadataValue.json(report.versions_removed),
        }
    )


ASSETS = [digit_batches, digit_batches_splits, lance_maintenance]
