"""Command line: ``python -m perm_assets retain --uri data/lancedb --keep 3 --days 7``.

Retires the pins no kept permutation version needs and cleans up old Lance versions (see
`perm_assets.pins.retain`), then prints what it did, one line per table. With ``DAGSTER_HOME``
set, the pins of that instance's latest ``--keep`` materializations per asset are kept too.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import dagster as dg

from perm_assets.pins import retain
from perm_assets.resources import LanceDBResource


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perm_assets")
    commands = parser.add_subparsers(dest="command", required=True)
    keep = commands.add_parser("retain", help="retire unneeded pins, clean up old versions")
    keep.add_argument("--uri", default="data/lancedb", help="the LanceDB database")
    keep.add_argument(
        "--keep", type=int, default=3, help="pinned versions kept per permutation (>= 1)"
    )
    keep.add_argument(
        "--days", type=float, default=7.0, help="remove unpinned versions older than this"
    )
    keep.add_argument(
        "--delete-unverified",
        action="store_true",
        help="also delete unreferenced files younger than 7 days (killed writes); unsafe while "
        "another process writes to the database",
    )
    args = parser.parse_args(argv)
    db = LanceDBResource(uri=args.uri)
    options = {
        "keep": args.keep,
        "cleanup_older_than": timedelta(days=args.days),
        "delete_unverified": args.delete_unverified,
    }
    home = os.environ.get("DAGSTER_HOME")
    if home and os.path.isdir(home):  # what that instance recorded stays readable
        with dg.DagsterInstance.get() as instance:
            report = retain(db, instance=instance, **options)
    else:
        why = "is unset" if not home else f"{home!r} is no folder"
        sys.stderr.write(
            f"no Dagster instance (DAGSTER_HOME {why}): only Lance's own versions are considered\n"
        )
        report = retain(db, **options)
    for table in sorted(report.kept_pins):
        sys.stdout.write(
            f"{table}: kept {len(report.kept_pins[table])} pins, retired "
            f"{len(report.retired_pins[table])}, removed {report.versions_removed[table]} "
            f"versions older than {report.cleanup_older_than[table]}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
