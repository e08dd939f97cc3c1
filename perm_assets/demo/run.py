"""``make run``: materialize the whole demo in one process, then print the summary.

``python -m perm_assets.demo.run definitions.py`` runs, against the instance in
``$DAGSTER_HOME`` (so ``make ui`` shows these runs):

1. one run of the digits group and its folds;
2. one run per fold partition of ``digits_cv_model`` (the partitions of one asset), then the
   summary over them;
3. two refreshes of the growing table (the hash split adds rows and moves none), then the
   maintenance asset.

Why in-process rather than ``dagster asset materialize`` / ``dg launch``: each CLI call starts
the multiprocess executor, a process per step (~24 s a run here, nine runs), and the CLI prints
a supersession warning per call. ``dg.materialize`` runs the same definitions, resources and
instance in one process; the runs, events and lineage recorded are the same. Step logs go to
Dagster's event log (see them in ``make ui``); the console shows warnings and the summary.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from perm_assets.demo import summary

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
"""Run config: console logs at WARNING (the event log keeps every DEBUG line)."""


def load_definitions(path: str) -> dg.Definitions:
    """The ``defs`` of a Python file such as ``definitions.py``."""
    spec = importlib.util.spec_from_file_location("perm_assets_demo_definitions", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load definitions from '{path}'")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defs = getattr(module, "defs", None)
    if not isinstance(defs, dg.Definitions):
        raise TypeError(f"'{path}' defines no `defs = dg.Definitions(...)`")
    return defs


def materialize(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    selection: dg.AssetSelection,
    *,
    partition_key: str | None = None,
) -> None:
    """One run of ``selection``, failing loudly."""
    assets = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    started = time.perf_counter()
    result = dg.materialize(
        assets,
        resources=dict(defs.resources or {}),
        instance=instance,
        selection=selection,
        partition_key=partition_key,
        run_config=QUIET,
    )
    where = f" [{partition_key}]" if partition_key else ""
    took = time.perf_counter() - started
    names = ", ".join(sorted(k.to_user_string() for k in selection.resolve(assets)))
    sys.stdout.write(f"run {result.run_id[:8]}: {names}{where} ({took:.1f} s)\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = args[0] if args else str(Path.cwd() / "definitions.py")
    defs = load_definitions(path)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        assets = dg.AssetSelection.assets
        groups = dg.AssetSelection.groups
        materialize(defs, instance, groups("digits") | assets("digits_folds"))
        folds = defs.get_assets_def("digits_cv_model").partitions_def
        assert folds is not None  # partitioned by fold (fold_partitions)
        for fold in folds.get_partition_keys():
            materialize(defs, instance, assets("digits_cv_model"), partition_key=fold)
        materialize(defs, instance, assets("digits_cv_summary"))
        for _ in range(2):
            materialize(defs, instance, groups("digit_batches"))
        materialize(defs, instance, assets("lance_maintenance"))
    sys.stdout.write(f"demo materialized in {time.perf_counter() - started:.1f} s\n")
    return summary.main()


if __name__ == "__main__":
    raise SystemExit(main())
