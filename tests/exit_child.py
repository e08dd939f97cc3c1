"""Child process of tests/test_clean_exit.py: take one batch, stop, let the interpreter exit.

``python tests/exit_child.py DB_URI ASSET MODE``; MODE is one of

- ``break``: ``for batch in BatchLoader(view): break`` (the pass is closed by the loop);
- ``keep``: ``next(iter(BatchLoader(view)))`` with the iterator kept in a global, so the
  read-ahead thread is inside a read while the interpreter shuts down;
- ``shard``: as ``keep``, over rank 0 of a 2-rank `shard`;
- ``dataloader``: one batch of a map-style ``DataLoader(view, num_workers=2)`` (fork), its
  iterator kept in a global.

Prints ``first batch: N rows`` and returns normally: the exit code must be 0. An exit handler
registered before perm_assets is imported (so it runs after perm_assets' own) exits with code 3
if a read-ahead thread is still alive then: a daemon thread inside a lancedb read while the
interpreter finalizes is what crashed (1 run in 4 at 100M rows).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, cast


def _no_read_ahead_left() -> None:
    alive = [t for t in threading.enumerate() if t.name == "perm-assets-read-ahead"]
    if any(t.is_alive() for t in alive):
        print(f"{len(alive)} read-ahead thread(s) alive at exit", file=sys.stderr, flush=True)
        os._exit(3)


atexit.register(_no_read_ahead_left)  # first registered, last run

# ruff: noqa: E402, T201 -- imports follow the exit handler on purpose; output is the report

from torch.utils.data import DataLoader, default_convert

from perm_assets import LanceDBResource, ViewRequest, open_view
from perm_assets.training import BatchLoader, shard

KEPT: list[Any] = []  # module globals outlive the main code: finalized at shutdown


def main(uri: str, asset: str, mode: str) -> None:
    db = LanceDBResource(uri=uri, read_consistency_seconds=None)
    request = ViewRequest(split="train", columns=["id", "x"], format="arrow")
    view = open_view(db, asset=asset, table=asset, version=None, request=request)
    rows = 0
    if mode == "break":
        for batch in BatchLoader(view, 1024):
            rows = batch.num_rows
            break
    elif mode in ("keep", "shard"):
        source = shard(view, rank=0, world_size=2, seed=1) if mode == "shard" else view
        KEPT.append(iter(BatchLoader(source, 1024, io_bytes=1 << 20)))
        rows = next(KEPT[-1]).num_rows
    elif mode == "dataloader":
        loader = DataLoader(
            cast(Any, view),
            batch_size=1024,
            num_workers=2,
            multiprocessing_context="fork",
            collate_fn=default_convert,
        )
        KEPT.append(iter(loader))
        rows = next(KEPT[-1]).num_rows
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"first batch: {rows} rows", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
