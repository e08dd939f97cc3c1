"""Command line: ``python -m perm_assets retain --uri data/lancedb --keep 3 --days 7``.

Retires the pins no kept permutation version needs and cleans up old Lance versions (see
`perm_assets.pins.retain`), then prints what it did, one line per table.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

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
    args = parser.parse_args(argv)
    report = retain(
        LanceDBResource(uri=args.uri), keep=args.keep, cleanup_older_than=timedelta(days=args.days)
    )
    for table in sorted(report.kept_pins):
        sys.stdout.write(
            f"{table}: kept {len(report.kept_pins[table])} pins, retired "
            f"{len(report.retired_pins[table])}, removed {report.versions_removed[table]} "
            f"versions older than {report.cleanup_older_than[table]}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
