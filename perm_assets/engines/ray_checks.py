"""The blocking checks of a Ray build, run as Ray tasks, never over the rows on the driver:
the membership pass (where the permutation's rows are: their splits, duplicates, strays; and
the filtered base rows counted against them: classes, groups, times) and the k-fold training
check (`rotated_training`: the training table is the folds table rotated).

`perm_assets.membership` does this in one process with one byte per base row. Here the base's
fragments are cut into shards of about `SHARD_ROWS` rows (at least one per CPU of the
cluster); then, with two stages of plain Ray tasks (`ray_tasks._route_rows`,
`ray_tasks._check_shard`):

1. route: a task per group of permutation fragments (about `ROUTE_ROWS` rows) reads its rows
   and sends each to the shard of its base fragment (``row_id >> 32``): 9 bytes a row;
2. check: a task per shard builds that shard's `Membership` (one byte per row of its
   fragments) from the rows routed to it and scans its fragments' filtered rows;

and the driver adds the shards' figures up (`combine`): a row id is in exactly one shard, so
duplicates, strays and per-split rows add; a group can span shards, so (group, split) pairs are
merged before groups are counted. The figures equal `membership`'s for the same tables.

Not Ray Data's ``groupby(...).map_groups``: it sorts every row (16+ bytes) through a
shuffle to group them; the checks need no order within a shard.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from perm_assets.engines import ray_tasks
from perm_assets.engines.ray import (
    _on_cluster,
    _public_options,
    _Watch,
    connect,
)
from perm_assets.membership import MAX_SPLITS, Membership, Scan, ScanCounts

if TYPE_CHECKING:
    from lancedb.table import Table

SHARD_ROWS = 1 << 25
"""Base rows per check shard: its task holds one byte per row (32 MiB) plus its rows of the
permutation (9 bytes each), so a 1B-row base makes 30 shards."""
ROUTE_ROWS = 1 << 24
"""Permutation rows per route task (16M: ~150 MB routed)."""
PART_BYTES = 1 << 20
"""Routed bytes per (route, shard) part on average, at least, where CPUs would ask for more
tasks (see `plan`)."""


@dataclass(frozen=True)
class Plan:
    """Which task does what: ``shard_of[f]`` the shard of base fragment ``f``, ``shards[s]``
    the base fragment ids of shard ``s``, ``routes[r]`` the permutation fragment ids route
    task ``r`` reads."""

    shard_of: np.ndarray
    shards: list[list[int]]
    routes: list[list[int]]


def plan(
    base_fragments: list[tuple[int, int]],
    perm_fragments: list[tuple[int, int]],
    *,
    cpus: int,
    shard_rows: int | None = None,
    route_rows: int | None = None,
    part_bytes: int | None = None,
) -> Plan:
    """Shards of consecutive base fragments (``(id, physical rows)``) of about equal rows and
    route tasks of consecutive permutation fragments (None: `SHARD_ROWS`, `ROUTE_ROWS`,
    `PART_BYTES`):

    - shards: at least one per ``shard_rows`` base rows (their tasks' memory), and up to one
      per CPU while routed parts stay about ``part_bytes`` or more;
    - routes: about ``route_rows`` rows each, up to one per CPU, as parts allow.

    Each route task returns a part per shard (9 bytes a row): Ray keeps returns under 100 KiB
    in the driver's own memory, so many small parts (many CPUs, few rows) would gather the
    routed rows in the driver."""
    shard_rows = shard_rows or SHARD_ROWS
    route_rows = route_rows or ROUTE_ROWS
    perm_total = sum(rows for _, rows in perm_fragments)
    parts = max(1, perm_total * 9 // (part_bytes or PART_BYTES))  # routes x shards at most
    total = sum(rows for _, rows in base_fragments)
    needed = math.ceil(total / shard_rows)
    count = max(1, min(len(base_fragments), max(needed, min(cpus, parts))))
    shards = _cut(base_fragments, count)
    top = max((fid for fid, _ in base_fragments), default=-1)
    shard_of = np.zeros(top + 1, dtype=np.int64)
    for s, ids in enumerate(shards):
        shard_of[ids] = s
    wanted = max(math.ceil(perm_total / route_rows), min(cpus, parts // len(shards)))
    routes = _cut(perm_fragments, min(len(perm_fragments), wanted)) if perm_fragments else []
    return Plan(shard_of=shard_of, shards=shards, routes=routes)


def _cut(fragments: list[tuple[int, int]], count: int) -> list[list[int]]:
    """``fragments`` (in order) cut into at most ``count`` non-empty runs of about equal rows:
    a fragment goes to the run its middle row falls in (an empty one counts as one row), so
    the first and the last fragment are in different runs when ``count`` > 1."""
    rows = np.maximum(np.asarray([r for _, r in fragments], dtype=np.float64), 1.0)
    middles = np.cumsum(rows) - rows / 2
    run = np.minimum((middles * count / rows.sum()).astype(np.int64), count - 1)
    runs: list[list[int]] = [[] for _ in range(count)]
    for (fragment_id, _), r in zip(fragments, run.tolist(), strict=True):
        runs[r].append(int(fragment_id))
    return [r for r in runs if r]


def combine(
    results: list[tuple[Membership, ScanCounts]], num_splits: int, **keys: str | None
) -> tuple[Membership, Scan]:
    """The shards' figures added up: as one `Membership` and one scan over every fragment."""
    member = Membership.combined([m for m, _ in results])
    counts = ScanCounts.of(
        num_splits, label=keys.get("label"), group=keys.get("group"), time=keys.get("time")
    )
    for _, part in results:
        counts.merge(part)
    return member, counts.result()


Submit = Callable[..., Any]
"""How a task is started: ``submit(fn, returns, *args, **kwargs)`` gives ``returns`` results
(a Ray task's object refs, a tuple when ``returns`` > 1); `on_ray` below, or the function called
in this process (tests/test_ray_checks.py)."""


def on_ray(ray: Any) -> Submit:
    """`Submit` as Ray tasks, retried on other nodes when theirs dies (their inputs are in the
    tables or rebuilt from lineage)."""

    def submit(fn: Callable[..., Any], returns: int, *args: Any, **kwargs: Any) -> Any:
        return ray.remote(fn).options(num_returns=returns, max_retries=-1).remote(*args, **kwargs)

    return submit


def layout_of(
    stored: Table,
    base: Table,
    *,
    cpus: int,
    shard_rows: int | None = None,
    route_rows: int | None = None,
    part_bytes: int | None = None,
) -> Plan | None:
    """The `plan` for checking the permutation table ``stored`` over ``base`` (both pinned);
    None when the ids are not row addresses (stable row ids) or the base has no fragment."""
    base_dataset = base.to_lance()
    if base_dataset.has_stable_row_ids:
        return None
    base_fragments = [
        (f.fragment_id, f.metadata.physical_rows) for f in base_dataset.get_fragments()
    ]
    if not base_fragments:
        return None
    return plan(
        base_fragments,
        [(f.fragment_id, f.metadata.physical_rows) for f in stored.to_lance().get_fragments()],
        cpus=cpus,
        shard_rows=shard_rows,
        route_rows=route_rows,
        part_bytes=part_bytes,
    )


def membership_tasks(
    submit: Submit,
    stored: Table,
    base: Table,
    layout: Plan,
    filter: str | None,
    num_splits: int,
    *,
    asset: str,
    storage_options: dict[str, str] | None,
    label: str | None = None,
    group: str | None = None,
    time: str | None = None,
) -> list[Any]:
    """The route tasks of ``layout``, then a `ray_tasks._check_shard` per shard of it fed
    their parts: the shards' results (refs on Ray), for `combine`."""
    from perm_assets.tables import where

    shards = len(layout.shards)
    routed = []
    for fragment_ids in layout.routes:
        out = submit(
            ray_tasks._route_rows,
            shards,
            cast(Any, stored).uri,
            stored.version,
            fragment_ids,
            shard_of=layout.shard_of,
            shards=shards,
            storage_options=storage_options,
        )
        routed.append([out] if shards == 1 else list(out))
    return [
        submit(
            ray_tasks._check_shard,
            1,
            *[parts[s] for parts in routed],
            base_uri=cast(Any, base).uri,
            base_version=base.version,
            fragments=fragment_ids,
            num_splits=num_splits,
            filter=where(filter),
            label=label,
            group=group,
            time=time,
            asset=asset,
            table=base.name,
            among=f" among the rows of filter {filter!r}" if filter else "",
            storage_options=storage_options,
        )
        for s, fragment_ids in enumerate(layout.shards)
    ]


def cover(
    stored: Table,
    base: Table,
    filter: str | None,
    num_splits: int,
    *,
    address: str | None,
    storage_options: dict[str, str],
    asset: str,
    label: str | None = None,
    group: str | None = None,
    time: str | None = None,
) -> tuple[Membership, Scan, dict[str, int]] | None:
    """`membership.Membership.build` + `membership.scan_filtered` of the permutation table
    ``stored`` (pinned) over ``base`` (at its pinned version), as Ray tasks; plus the task
    counts (``route_tasks``, ``shard_tasks``). None when the ids are not row addresses, the
    base is empty or there are too many splits (the caller's in-memory path)."""
    if num_splits > MAX_SPLITS:
        return None
    ray = connect(address)
    layout = layout_of(stored, base, cpus=_cpus(ray))
    if layout is None:
        return None
    # Each shard's parts are freed once its task has them: only the tasks hold them.
    results = _gather(
        ray,
        asset,
        lambda submit: membership_tasks(
            submit,
            stored,
            base,
            layout,
            filter,
            num_splits,
            asset=asset,
            storage_options=_public_options(storage_options),
            label=label,
            group=group,
            time=time,
        ),
    )
    member, scan = combine(results, num_splits, label=label, group=group, time=time)
    return member, scan, {"route_tasks": len(layout.routes), "shard_tasks": len(layout.shards)}


def _gather(ray: Any, asset: str, start: Callable[[Submit], list[Any]]) -> list[Any]:
    """The results of the tasks ``start`` submits to Ray, waited for as the build's are
    (`_Watch`), Ray's errors named as the checks' (`_on_cluster`)."""
    with _on_cluster(ray, asset=asset, during="checks"):
        return _Watch(ray, asset=asset, during="checks").get(start(on_ray(ray)))


def _cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def training_chunks(length: int, *, cpus: int, rows: int | None = None) -> list[tuple[int, int]]:
    """Training positions ``[0, length)`` cut into ranges of about ``rows`` (None:
    `ROUTE_ROWS`) positions, at least one per CPU."""
    chunks = max(1, cpus, math.ceil(length / (rows or ROUTE_ROWS)))
    cuts = np.linspace(0, length, chunks + 1).astype(np.int64).tolist()
    return [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]


def training_tasks(
    submit: Submit,
    folds: Table,
    train: Table,
    sizes: np.ndarray,
    ranges: list[list[int]],
    chunks: list[tuple[int, int]],
    *,
    storage_options: dict[str, str] | None,
) -> list[Any]:
    """A `ray_tasks._training_range` per chunk of training positions: their results (refs on
    Ray), for `training_figures`."""
    return [
        submit(
            ray_tasks._training_range,
            1,
            lo,
            hi,
            folds_uri=cast(Any, folds).uri,
            folds_version=folds.version,
            train_uri=cast(Any, train).uri,
            train_version=train.version,
            first=int(sizes[0]),
            ranges=ranges,
            storage_options=storage_options,
        )
        for lo, hi in chunks
    ]


def training_figures(
    results: list[tuple[bool, int, list[int]]],
    sizes: np.ndarray,
    ranges: list[list[int]],
    *,
    length: int,
) -> dict[str, Any]:
    """The `ray_tasks._training_range` results of every chunk of a ``length``-row training
    table added up into `checks.rotated_training_figures`."""
    from perm_assets.checks import rotated_training_figures  # checks imports this module

    own = [0] * len(ranges)
    matches, read = True, 0
    for equal, rows, mine in results:
        matches = matches and equal
        read += rows
        for i, count in enumerate(mine):
            own[i] += count
    return rotated_training_figures(
        sizes, ranges, length=read, matches=matches and read == length, own=own
    )


def rotated_training(
    folds: Table,
    train: Table,
    sizes: np.ndarray,
    ranges: list[list[int]],
    *,
    address: str | None,
    storage_options: dict[str, str],
    asset: str,
) -> dict[str, Any]:
    """`checks._rotated_training_streamed`'s figures (a k-fold training table is the folds
    table rotated, each fold's range free of its own rows), from Ray tasks that each compare
    a chunk of about `ROUTE_ROWS` training positions (`ray_tasks._training_range`): the
    driver adds up three numbers a task."""
    ray = connect(address)
    length = train.count_rows()
    chunks = training_chunks(length, cpus=_cpus(ray))
    options = _public_options(storage_options)
    results = _gather(
        ray,
        asset,
        lambda submit: training_tasks(
            submit, folds, train, sizes, ranges, chunks, storage_options=options
        ),
    )
    figures = training_figures(results, sizes, ranges, length=length)
    return {**figures, "checked_by_ray_tasks": {"training_range_tasks": len(chunks)}}
