"""Print what the last demo run produced, read back from the Dagster instance.

Run by ``make run`` after the materialization: ``python -m perm_assets.demo.summary``. One line
per asset (one per partition for the fold models), numbers rounded to what is worth reading.
"""

from __future__ import annotations

import sys
from typing import Any

import dagster as dg

from perm_assets.demo import ASSETS

_SHOWN = {
    "lance/version": "version",
    "dagster/row_count": "rows",
    "rows/train": "train",
    "rows/test": "test",
    "accuracy": "accuracy",
    "train/table_version": "read splits@",
    "train/base_version": "base@",
    "perm_assets/k": "folds",
    "accuracy_mean": "mean accuracy",
    "accuracy_std": "+/-",
    "pins_retired": "pins retired",
    "pins_kept": "pins kept",
    "versions_removed": "versions removed",
}


def main() -> int:
    lines = ["perm_assets demo: latest materializations"]
    with dg.DagsterInstance.get() as instance:
        for asset in ASSETS:
            label = asset.key.to_user_string()
            if asset.partitions_def is not None:
                for partition in asset.partitions_def.get_partition_keys():
                    mat = _latest(instance, asset.key, partition)
                    lines.append(_line(f"{label}[{partition}]", mat))
            else:
                lines.append(_line(label, _latest(instance, asset.key, None)))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _latest(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None
) -> dg.AssetMaterialization | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return records[0].asset_materialization if records else None


def _line(label: str, mat: dg.AssetMaterialization | None) -> str:
    if mat is None:
        return f"  {label:<28} not materialized"
    shown = [
        f"{name} {_fmt(mat.metadata[key].value)}"
        for key, name in _SHOWN.items()
        if key in mat.metadata
    ]
    return f"  {label:<28} " + ", ".join(shown)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
