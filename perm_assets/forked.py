"""The read helper of a forked DataLoader worker: a view's rows through pylance, not lancedb.

lancedb 0.40 and pylance are not fork-safe (their async runtimes' threads do not survive
``fork``), so a forked worker reads through a fresh interpreter (`views._ForkedReader`), and
that interpreter's start-up is part of the worker's first batch. Unpickling the view there
imports ``perm_assets.views`` (dagster and lancedb: 3.6 s on an idle machine, 14 s on a busy
one). This helper imports only numpy, pyarrow and pylance (~0.7 s), opens the view's tables
by location at their pinned versions, checks them as `perm_assets.views.open_view` did (pin and
commit time, `perm_assets.identity`), and answers with the parent's own `SplitRows` and
`take_rows` over `LanceStore`, so the rows and their order are the parent's.

It serves views of tables pylance opens by location: local disk and object stores. Views of
LanceDB Cloud or namespace tables, or opened with ``with_connection_factory``, use the full
helper (`views._serve_forked_reads`).

Protocol (pickles over stdin/stdout, one request at a time): first a `ReadPlan`, then
``("count",)``, ``("take", offsets, selection)``, ``("schema", selection)``,
``("read", batch_size, selection)`` (replies a pass id) and ``("next", pass id)`` (None at
the end of the pass); each reply is ``("ok", value)`` or ``("error", exception)``.
``selection`` None is the plan's.
"""

from __future__ import annotations

import itertools
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pyarrow as pa

from perm_assets.identity import VersionIdentity, verify_identity, verify_pin
from perm_assets.reader import LanceStore, SplitRows, take_rows

__all__ = ["ReadPlan", "answer_requests", "helper_pipes", "serve"]


@dataclass(frozen=True)
class ReadPlan:
    """Where a view's rows are, for the helper: plain values, read in the forked worker from
    the view's Python attributes (no lancedb call there).

    ``storage_options`` travel in plain text over the helper's own pipe (never to disk or a
    log): the helper opens the tables with the parent's options, whatever their source.
    """

    asset: str
    base_path: str
    base_name: str
    base_version: int
    stored_path: str | None
    """The permutation (or folds training) table; None for an identity view of a table."""
    stored_name: str
    stored_version: int
    split: int
    pin: str | None
    stamp: int | None
    offset: int | None
    limit: int | None
    selection: dict[str, str]
    storage_options: dict[str, str] = field(repr=False)  # credentials: never in a repr

    @property
    def what(self) -> str:
        return f"view of asset '{self.asset}'"


class _Opened:
    """A plan's tables opened at their versions and verified."""

    def __init__(self, plan: ReadPlan) -> None:
        import lance  # here, not at import: the helper's import is its whole start-up

        def open_at(path: str, name: str, version: int) -> LanceStore:
            dataset = lance.dataset(
                path, version=version, storage_options=plan.storage_options or None
            )
            return LanceStore(dataset, name)

        self.plan = plan
        self.base = open_at(plan.base_path, plan.base_name, plan.base_version)
        if plan.stored_path is None:
            verify_identity(
                self.base,
                VersionIdentity(plan.base_version, stamp=plan.stamp),
                asset=plan.asset,
            )
            stored = None
        else:
            stored = open_at(plan.stored_path, plan.stored_name, plan.stored_version)
            identity = VersionIdentity(plan.stored_version, pin=plan.pin, stamp=plan.stamp)
            verify_identity(stored, identity, asset=plan.asset)
            # A dropped and re-created base table reuses version numbers: the pin tells them
            # apart (as open_view checks in the parent).
            verify_pin(self.base, plan.pin, plan.base_version, asset=plan.asset)
        self.rows = SplitRows(self.base, stored, plan.split)

    def count(self) -> int:
        return self.rows.size(self.plan.offset, self.plan.limit)

    def take(self, offsets: list[int], selection: Mapping[str, str]) -> pa.RecordBatch:
        ids = self.rows.at(self.plan.offset, self.plan.limit, np.asarray(offsets, np.int64))
        return take_rows(self.base, ids, selection, what=self.plan.what)

    def schema(self, selection: Mapping[str, str]) -> pa.Schema:
        return take_rows(self.base, np.empty(0, np.uint64), selection, what=self.plan.what).schema

    def read(self, batch_size: int, selection: Mapping[str, str]) -> Iterator[pa.RecordBatch]:
        chunks = self.rows.stream(self.plan.offset, self.plan.limit, itertools.repeat(batch_size))
        for ids in chunks:
            yield take_rows(self.base, ids, selection, what=self.plan.what)


def helper_pipes() -> tuple[IO[bytes], IO[bytes]]:
    """A helper's request and reply streams (stdin, stdout); a library's print goes to stderr
    from now on, so it cannot corrupt the replies."""
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    return requests, replies


def answer_requests(
    requests: IO[bytes],
    replies: IO[bytes],
    answer: Callable[[str, list[Any]], Any],
    start_pass: Callable[[int, Any], Iterator[Any]],
) -> None:
    """Both helpers' loop (this one's and `views._serve_forked_reads`): ``("read", batch_size,
    selection)`` opens a pass with ``start_pass`` and replies its id, ``("next", id)`` pulls
    its next batch (None at its end), every other request is ``answer(kind, args)``. Passes are
    kept apart by id: a worker may have several open at once (two iterators of one view).
    Returns when the worker closes the pipe or exits."""
    passes: dict[int, Iterator[Any]] = {}
    while True:
        try:
            kind, *args = pickle.load(requests)
        except EOFError:  # the forked worker closed the pipe or exited
            return
        try:
            reply: Any
            if kind == "next":
                reply = next(passes[args[0]], None)
                if reply is None:
                    del passes[args[0]]
            elif kind == "read":
                reply = max(passes, default=0) + 1  # an id not in use
                passes[reply] = start_pass(args[0], args[1])
            else:
                reply = answer(kind, args)
            message: tuple[str, Any] = ("ok", reply)
        except Exception as exc:
            message = ("error", exc)
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an exception that does not pickle travels as its text
            data = pickle.dumps(("error", RuntimeError(repr(message[1]))))
        try:
            replies.write(data)
            replies.flush()
        except BrokenPipeError:  # the forked worker exited while this reply was on its way
            return


def serve() -> None:
    """Main loop: a `ReadPlan`, then requests, on stdin; replies on stdout (module doc)."""
    requests, replies = helper_pipes()
    plan: ReadPlan = pickle.load(requests)
    try:
        opened = _Opened(plan)
    except Exception as exc:  # answered to every request: the worker raises it where it reads
        failed = exc

        def refuse(*_: Any) -> Any:
            raise failed

        answer_requests(requests, replies, refuse, refuse)
        return

    def answer(kind: str, args: list[Any]) -> Any:
        if kind == "count":
            return opened.count()
        if kind == "take":
            return opened.take(args[0], args[1] or plan.selection)
        if kind == "schema":
            return opened.schema(args[0] or plan.selection)
        raise ValueError(f"unknown request {kind!r}")

    def start_pass(batch_size: int, selection: Mapping[str, str] | None) -> Iterator[Any]:
        return opened.read(batch_size, selection or plan.selection)

    answer_requests(requests, replies, answer, start_pass)
