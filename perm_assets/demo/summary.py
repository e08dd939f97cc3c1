"""Print what the last demo run produced, read back from the Dagster instance.

Run by ``make run`` after the materialization: ``python -m perm_assets.demo.summary``.
"""

from __future__ import annotations

import sys

import dagster as dg

from perm_assets.demo import ASSETS

_SHOWN = (
    "lance/version",
    "dagster/row_count",
    "dagster/data_version",
    "rows/train",
    "rows/test",
    "accuracy",
    "train/table_version",
    "train/base_version",
    "perm_assets/k",
    "accuracy_mean",
    "accuracy_std",
)


def main() -> int:
    lines = []
    with dg.DagsterInstance.get() as instance:
        for asset in ASSETS:
            event = instance.get_latest_materialization_event(asset.key)
            if event is None or event.asset_materialization is None:
                lines.append(f"{asset.key.to_user_string():<20} not materialized")
                continue
            mat = event.asset_materialization
            shown = {k: mat.metadata[k].value for k in _SHOWN if k in mat.metadata}
            version = (mat.tags or {}).get("dagster/data_version")
            if version:
                shown["data_version"] = version[:24]
            detail = "  ".join(f"{k}={v}" for k, v in shown.items())
            lines.append(f"{asset.key.to_user_string():<20} {detail}")
    sys.stdout.write("\n".join(["perm_assets demo: latest materializations", *lines]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
