"""Training-side helpers for views: rank shards, read-ahead batch loading, tensor batches.

Three ways to feed a training loop from a `PermutationView` (or any lancedb `Permutation`):

- ``torch.utils.data.DataLoader(view, batch_size=256, num_workers=2)``: the view is a map-style
  dataset (``__len__``, ``__getitems__``). Workers started with ``spawn`` or ``forkserver``
  receive a pickle of under 1 KB and reopen the pinned tables themselves (see
  `PermutationView.__getstate__`). Under ``fork`` (the default on Linux) lancedb 0.40 hangs or
  crashes in some children, so each forked worker reads through a helper interpreter that
  reopens the view the same way (2-3 s of start-up per worker); a cached view warmed in the
  parent (`PermutationView.warm`) needs none: forked workers gather from the inherited row ids
  and memory-mapped cache entry. Formats ``torch`` and
  ``torch_row`` work with the default collate; ``torch_col``, ``arrow`` and ``numpy`` return
  whole batches, so pass ``collate_fn=torch.utils.data.default_convert``. Each batch is one
  random-access read of ``batch_size`` rows: about 55k rows/s per worker at 1,024 rows on a
  shuffled 8M-row split.
- `BatchLoader`: one process reads ahead in large I/O batches sized in bytes on a background
  thread and re-slices them into training batches of any size, in the view's exact order.
  Measured on 2 cores, shuffled 8M-row split of a 10M-row table, 1,024-row batches
  (``make bench`` runs ``bench/bench_torch.py``): 748k rows/s, against 60k for lancedb's
  ``Permutation.iter(1024)``, 37k for ``StreamingDataset`` and 391k for Hugging Face
  ``datasets`` shuffled (1.9x).
- `shard`: rank ``r`` of ``world_size``'s rows of a split for one epoch, for either of the two.

None of them waits for lancedb's offset map of the whole split (``Permutation.take_offsets``
builds one on its first call: 39 s at 72M rows, in every process and worker): reads by
position go through `perm_assets.reader` (the split's row ids, then base rows by id at the
pinned version). A plain `BatchLoader` pass streams the row ids, so its first batch does not
wait for the rest of the split. A shard's order is a seeded bijection of positions computed
per batch (`ShardOrder`; DistributedSampler's exact order on request), and tables built here
record their split ranges, so a shard's or a DataLoader worker's first batch reads only its
own row ids; a shard then reads the split's row ids once (8 bytes a row) on its prefetch
thread.

Resume: `BatchLoader.state_dict` / `load_state_dict` (and `Shard`'s, for torchdata's
``StatefulDataLoader`` over a shard) record the view's lineage, the shard, epoch and position;
a run killed mid-epoch continues with exactly the rows it had not delivered.

Speed against randomness: ``RandomSplit(clump_size=c)`` with ``Shuffle(clump_size=c)`` keeps
runs of ``c`` consecutive rows. Same bench, rows/s with `BatchLoader` / ``iter(1024)``:
c=1 691k / 61k (uniform order), c=64 818k / 408k, c=1024 899k / 666k (98.4% and 99.9% of
adjacent rows are table neighbours). With `BatchLoader`, row-level shuffling costs little.

Example (one rank of a DDP job):
    ``for epoch in range(3): for batch in BatchLoader(shard(train, rank=r, world_size=w,
    seed=7, epoch=epoch), batch_size=512): ...``
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any, Literal, cast

import numpy as np
import pyarrow as pa
import torch
from lancedb.permutation import Permutation, Transforms
from torch.utils.data import Dataset

from perm_assets.batches import reslice
from perm_assets.errors import LineageError, SpecError
from perm_assets.reader import ramp
from perm_assets.views import PermutationView, ViewLineage

__all__ = [
    "DEFAULT_IO_BYTES",
    "BatchLoader",
    "Remainder",
    "Shard",
    "ShardOrder",
    "feistel_permute",
    "shard",
    "shard_length",
    "shard_offsets",
    "to_tensors",
]

Remainder = Literal["drop", "pad"]
"""What `shard` does with the ``n % world_size`` rows that do not divide evenly."""

ShardOrder = Literal["bijection", "distributed_sampler"]
"""How a shuffled `shard` orders the split's positions each epoch.

- ``"bijection"`` (the default): a seeded pseudo-random bijection of ``[0, n)`` (a Feistel
  network with cycle walking, keyed by seed and epoch), evaluated only at the positions a batch
  needs: the first batch costs O(batch), whatever the split's size, and no process ever holds
  an order array.
- ``"distributed_sampler"``: exactly ``torch.utils.data.DistributedSampler``'s order
  (``torch.randperm`` of the whole split, seeded with ``seed + epoch``), for runs that must
  match one that used the sampler. Its first batch waits for the whole permutation (several
  seconds and 8 bytes a row at 80M rows, in every rank and DataLoader worker).

Both give disjoint, equally long shards that cover the split as ``remainder`` says, and both
resume exactly (`Shard.state_dict` records which one).
"""

DEFAULT_IO_BYTES = 4 * 1024 * 1024
"""Bytes per read-ahead I/O batch: 262,144 rows of two 8-byte columns (fastest here: 2-8 MiB)."""

_PROBE_ROWS = 1024  # rows read once to measure bytes per row (variable-width columns vary)


def shard_length(num_rows: int, world_size: int, remainder: Remainder = "drop") -> int:
    """Rows every rank gets: ``num_rows // world_size`` ('drop') or rounded up ('pad')."""
    if remainder == "drop":
        return num_rows // world_size
    return -(-num_rows // world_size)


def shard_offsets(
    num_rows: int,
    *,
    rank: int,
    world_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    remainder: Remainder = "drop",
    order: ShardOrder = "bijection",
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Offsets (positions in a split of ``num_rows``) that rank ``rank`` reads, in order.

    The epoch's order of the split's positions (`ShardOrder`; unshuffled: stored order) is
    dealt out as ``DistributedSampler`` deals: rank ``r`` takes every ``world_size``-th entry
    from ``r``. With ``order="distributed_sampler"`` the result is exactly the indices of
    ``torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle, seed,
    drop_last=remainder == "drop")`` after ``set_epoch(epoch)``: ``torch.randperm`` seeded with
    ``seed + epoch`` (so seed 1 epoch 0 equals seed 0 epoch 1, as in torch).

    Args:
        num_rows: rows in the split (``len(view)``).
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks.
        seed: shuffle seed shared by every rank.
        epoch: epoch number; each epoch gives another order.
        shuffle: False keeps the split's stored order (already shuffled if the asset shuffled).
        remainder: 'drop' leaves out the last ``num_rows % world_size`` offsets of the order;
            'pad' repeats the first ones until every rank has ``ceil(num_rows / world_size)``.
        order: see `ShardOrder`.
        positions: positions in the shard to compute (None: all of them). With the
            bijection only these are computed, in O(len(positions)).

    Returns:
        int64 array of offsets: ``shard_length(num_rows, world_size, remainder)`` of them,
        or one per entry of ``positions``.

    Raises:
        ValueError: a negative row count or seed, ``world_size < 1``, a rank out of range,
            or an unknown ``remainder`` or ``order``.
        IndexError: a position outside the shard.
    """
    if num_rows < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard needs num_rows >= 0, world_size >= 1 and 0 <= rank < world_size; got "
            f"num_rows={num_rows}, rank={rank}, world_size={world_size}"
        )
    if remainder not in ("drop", "pad"):
        raise ValueError(f"remainder must be 'drop' or 'pad', not {remainder!r}")
    if order not in ("bijection", "distributed_sampler"):
        raise ValueError(f"order must be 'bijection' or 'distributed_sampler', not {order!r}")
    length = shard_length(num_rows, world_size, remainder)
    total = length * world_size
    if shuffle and order == "distributed_sampler":
        generator = torch.Generator().manual_seed(seed + epoch)
        permuted = torch.randperm(num_rows, generator=generator).numpy()
        if total > num_rows:  # 'pad': np.resize repeats the order cyclically, as torch pads
            permuted = np.resize(permuted, total)
        dealt = permuted[rank:total:world_size]
        return dealt if positions is None else dealt[_checked(positions, length)]
    if seed < 0 or epoch < 0:
        raise ValueError(f"shard needs seed >= 0 and epoch >= 0; got seed={seed}, epoch={epoch}")
    wanted = np.arange(length, dtype=np.int64) if positions is None else positions
    # Entry i of the epoch's order, dealt as DistributedSampler deals; 'pad' wraps around.
    index = _checked(wanted, length) * world_size + rank
    if total > num_rows:
        index %= max(num_rows, 1)
    if not shuffle:
        return index
    return feistel_permute(index, num_rows, seed=seed, epoch=epoch)


def _checked(positions: np.ndarray, length: int) -> np.ndarray:
    """``positions`` as int64, refusing any outside ``[0, length)`` (numpy would wrap -1)."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= length):
        bad = positions[(positions < 0) | (positions >= length)][0]
        raise IndexError(f"position {bad} is out of range for a shard of {length:,} rows")
    return positions


_FEISTEL_ROUNDS = 6  # 4 make a pseudo-random permutation (Luby-Rackoff); 2 more for mixing


def feistel_permute(index: np.ndarray, num_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """Entries ``index`` of a seeded pseudo-random permutation of ``[0, num_rows)``.

    A Feistel network over the smallest power of two ``2**b >= num_rows`` (a bijection there,
    halves of ``b // 2`` and ``b - b // 2`` bits), with cycle walking: an output
    ``>= num_rows`` goes through the network again until it falls inside, which keeps a
    bijection of ``[0, num_rows)`` (under 2 passes on average). Vectorized and
    O(len(index)): no order array of the whole split. Keys come from
    ``SeedSequence([seed, epoch])``, so every rank and worker computes the same order.
    """
    index = np.asarray(index, dtype=np.int64)
    if index.size == 0:
        return index
    bits = max(2, (num_rows - 1).bit_length())
    keys = np.random.SeedSequence([seed, epoch]).generate_state(_FEISTEL_ROUNDS, np.uint64)
    out = _feistel(index.astype(np.uint64), bits, keys)
    limit = np.uint64(num_rows)
    pending = np.flatnonzero(out >= limit)
    while pending.size:
        out[pending] = _feistel(out[pending], bits, keys)
        pending = pending[out[pending] >= limit]
    return out.astype(np.int64)


def _feistel(values: np.ndarray, bits: int, keys: np.ndarray) -> np.ndarray:
    """One pass of an unbalanced Feistel network over ``bits``-bit values (uint64 arrays).

    Each round maps ``(left, right)`` to ``(right, left ^ F(right))``, invertible whatever the
    two halves' widths, which swap every round."""
    left_bits, right_bits = bits // 2, bits - bits // 2
    left = values >> np.uint64(right_bits)
    right = values & np.uint64((1 << right_bits) - 1)
    for key in keys:
        mixed = _mix(right ^ key)
        mixed &= np.uint64((1 << left_bits) - 1)
        mixed ^= left
        left, right = right, mixed
        left_bits, right_bits = right_bits, left_bits
    left <<= np.uint64(right_bits)
    left |= right
    return left


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on ``z``: every input bit flips about half the
    output bits."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


class Shard(Dataset[Any]):
    """One rank's rows of a view for one epoch: a map-style dataset. Build it with `shard`.

    Pickles to the view's state (under 1 KB) plus a few settings; a worker recomputes the
    offsets instead of receiving them (8 bytes a row), and with the default bijection order
    only those of the batches it reads (`offsets_at`).
    """

    def __init__(
        self,
        view: Permutation,
        *,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        remainder: Remainder,
        order: ShardOrder = "bijection",
    ) -> None:
        self.view = view
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle = shuffle
        self.remainder: Remainder = remainder
        self.order: ShardOrder = order
        self.split_rows = view.num_rows
        self._offsets: np.ndarray | None = None
        # Fail on a bad rank, remainder, order or seed now, not in a worker process.
        shard_offsets(
            0, rank=rank, world_size=world_size, seed=seed, remainder=remainder, order=order
        )

    @property
    def offsets(self) -> np.ndarray:
        """Positions in the view that this shard reads, in order: the whole array, computed
        once (8 bytes a row; readers use `offsets_at`)."""
        if self._offsets is None:
            self._offsets = self._compute(None)
        return self._offsets

    def offsets_at(self, positions: np.ndarray) -> np.ndarray:
        """Positions in the view of the shard's rows at ``positions`` (IndexError outside
        it): O(len(positions)) with the bijection order, a slice of `offsets` otherwise."""
        if self._offsets is not None or (self.shuffle and self.order == "distributed_sampler"):
            return self.offsets[_checked(positions, len(self))]
        return self._compute(np.asarray(positions))

    def _compute(self, positions: np.ndarray | None) -> np.ndarray:
        return shard_offsets(
            self.split_rows,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            remainder=self.remainder,
            order=self.order,
            positions=positions,
        )

    def with_epoch(self, epoch: int) -> Shard:
        """The same rank's shard for another epoch (a new order; nothing is re-materialized)."""
        return Shard(
            self.view,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            remainder=self.remainder,
            order=self.order,
        )

    def __len__(self) -> int:
        return shard_length(self.split_rows, self.world_size, self.remainder)

    def __getitem__(self, index: int) -> Any:
        """Row ``index`` of the shard, in the view's format (lancedb: a one-row batch)."""
        return self.view.take_offsets(self.offsets_at(np.array([index])).tolist())

    def __getitems__(self, indices: list[int]) -> Any:
        """Rows at ``indices`` in one read; DataLoader calls this once per batch."""
        return self.view.take_offsets(self.offsets_at(np.asarray(indices)).tolist())

    def __iter__(self) -> Iterator[Any]:
        """Every row in batches of the view's batch size (the last one shorter)."""
        return iter(BatchLoader(self, self.view.batch_size))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_offsets": None}

    def settings(self) -> dict[str, Any]:
        """The shard's layout besides its epoch: rank, world size, seed, shuffle, remainder
        and order."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "remainder": self.remainder,
            "order": self.order,
        }

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch``'s order from now on (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch
        self._offsets = None

    def state_dict(self) -> dict[str, Any]:
        """The view's lineage, the shard's layout and epoch (about 1 KB, JSON-serializable).

        A map-style DataLoader (or torchdata's ``StatefulDataLoader``) keeps the position in
        its sampler; this state makes a resumed run read the same view and epoch."""
        return {
            "kind": _SHARD_STATE,
            "view": view_identity(self.view),
            "shard": self.settings(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the epoch of `state_dict`, after checking it names this view and layout.

        Raises:
            LineageError: the state was saved on another view.
            SpecError: another shard layout, or not a Shard state.
        """
        if not isinstance(state, Mapping) or state.get("kind") != _SHARD_STATE:
            raise SpecError(
                f"not a Shard state (kind {_kind_of(state)!r}, expected {_SHARD_STATE!r})"
            )
        check_view_identity(state["view"], view_identity(self.view))
        _same_settings("shard", _with_order(state["shard"]), self.settings())
        self.set_epoch(int(state["epoch"]))


def shard(
    view: Permutation,
    *,
    rank: int,
    world_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    remainder: Remainder = "drop",
    order: ShardOrder = "bijection",
) -> Shard:
    """Rank ``rank`` of ``world_size``'s share of ``view`` for ``epoch``.

    Shards are disjoint and equally long, so a synchronous all-reduce never waits on a rank
    that ran out: with 'drop' they cover the split except at most ``world_size - 1`` rows
    (which ones changes with the epoch when shuffled); with 'pad' they cover all of it and up
    to ``world_size - 1`` rows appear twice. A new ``epoch`` reorders rows from the persisted
    permutation in memory: the asset is never re-materialized. The result works with
    `BatchLoader` (fast) and as a map-style DataLoader dataset.

    The epoch's order is a seeded bijection of positions computed per batch (first batch in
    O(batch) at any size); ``order="distributed_sampler"`` gives exactly
    ``DistributedSampler``'s rows instead, after a ``randperm`` of the whole split (see
    `ShardOrder`).

    Why not the existing pieces:
    - ``torch.utils.data.DistributedSampler`` deals rows to ranks as here (with
      ``order="distributed_sampler"``, offset for offset: `shard_offsets`), but needs a
      ``randperm`` of the whole split per epoch, yields one Python int per row and leaves
      reading to the DataLoader, one random-access read per training batch. `Shard` computes
      its offsets as numpy arrays, so `BatchLoader` reads them in large I/O batches. Passing
      the sampler to a DataLoader over the view still works and gives the same rows as
      ``order="distributed_sampler"``.
    - ``lancedb.streaming.StreamingDataset`` (elastic sharding, epoch reshuffle, resumable
      ``state_dict``) builds its own permutation of a table from a filter and a seed: it cannot
      read a persisted split (lancedb issue 4016), so it would lose the asset's split, pinned
      versions and lineage, and it yields rows one by one to the DataLoader.
    - ``Permutation.with_skip``/``with_take`` give contiguous blocks of the stored order: no
      per-epoch reshuffle and no padding, so offsets into the split are used instead.

    Args:
        view: the split to shard (every rank must pass the same view).
        rank, world_size, seed, epoch, shuffle, remainder: see `shard_offsets`.
        order: ``"bijection"`` (default) or ``"distributed_sampler"``, see `ShardOrder`.

    Raises:
        ValueError: a rank out of ``[0, world_size)``, a negative seed, or an unknown
            ``remainder`` or ``order``.
    """
    return Shard(
        view,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        remainder=remainder,
        order=order,
    )


class BatchLoader:
    """Training batches of any size from a view or shard, read ahead in large I/O batches.

    A background thread reads ``io_rows`` rows at a time (about ``io_bytes``; bytes per row
    from the schema, or measured on the first rows for variable-width columns) while the
    training loop computes on the previous batch; each I/O batch is sliced (zero-copy) into
    ``batch_size``-row training batches, in exactly the source's order, and passed through
    the view's format (``with_format``/``with_transform``). Memory stays below about
    ``(prefetch + 2) * io_bytes``: ``prefetch`` batches queued, one being read, one being sliced.

    Views from this project are read by row id (`perm_assets.reader`), never through
    lancedb's offset map of the whole split, so the first batch comes in O(1) for a view and
    after one read of the split's row ids for a shard.

    Re-iterable: each ``for batch in loader`` starts a fresh pass (and a fresh thread). A pass
    that is left early stops its thread, and any thread still running at interpreter exit is
    stopped and joined first (a read in flight at shutdown crashed the interpreter).

    Resumable: `state_dict` names the view's lineage, the shard, the epoch and the rows
    delivered in the current pass; `load_state_dict` on a loader over the same view makes its
    next pass continue exactly there (see `set_epoch` for shards).

    Args:
        source: a view (any lancedb `Permutation`) or a `Shard` of one.
        batch_size: rows per training batch.
        io_bytes: target bytes per I/O batch; at least one training batch is read at once.
        prefetch: I/O batches read ahead of the training loop.
        drop_last: leave out a last batch shorter than ``batch_size``.

    Raises:
        ValueError: ``batch_size``, ``io_bytes`` or ``prefetch`` below 1.

    Example:
        ``for batch in BatchLoader(view.with_format("arrow"), 1024): train_step(batch)``
    """

    def __init__(
        self,
        source: Permutation | Shard,
        batch_size: int,
        *,
        io_bytes: int = DEFAULT_IO_BYTES,
        prefetch: int = 2,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1 or io_bytes < 1 or prefetch < 1:
            raise ValueError(
                f"BatchLoader needs batch_size, io_bytes and prefetch >= 1; got "
                f"batch_size={batch_size}, io_bytes={io_bytes}, prefetch={prefetch}"
            )
        view = source.view if isinstance(source, Shard) else source
        self.source = source
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.drop_last = drop_last
        # lancedb annotates transform_fn as ``Callable[pa.RecordBatch, Any]``, which is invalid.
        self._transform = cast(Callable[[pa.RecordBatch], Any], view.transform_fn)
        self._arrow = _arrow_view(view)
        self.num_rows = len(source)
        self._epoch = source.epoch if isinstance(source, Shard) else 0
        self._position = 0  # rows delivered in the current (or last) pass
        self._start = 0  # where the next pass starts: set by load_state_dict
        self.row_bytes = self._measure_row_bytes()
        # Whole training batches per I/O batch: slices then never straddle two reads.
        self.io_rows = max(1, io_bytes // (self.row_bytes * batch_size)) * batch_size

    def __len__(self) -> int:
        """Training batches per pass."""
        if self.drop_last:
            return self.num_rows // self.batch_size
        return -(-self.num_rows // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch this loader reads (a shard's order; for a view, a counter kept for
        `state_dict`)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` from the next pass on: a shard reorders (`Shard.with_epoch`), a view
        keeps its order. The next pass starts at the first row."""
        if isinstance(self.source, Shard):
            self.source = self.source.with_epoch(epoch)
        self._epoch = epoch
        self._position = self._start = 0

    def __iter__(self) -> Generator[Any, None, None]:
        start, self._start = self._start, 0
        self._position = start
        if start >= self.num_rows:
            return
        reads = _Prefetcher(self._read(start), depth=self.prefetch)
        try:
            for batch in reslice(reads, self.batch_size, drop_last=self.drop_last):
                self._position += batch.num_rows  # before the yield: a checkpoint taken
                yield self._transform(batch)  # after receiving this batch counts it
        finally:
            reads.close()

    def _read(self, start: int) -> Iterator[pa.RecordBatch]:
        """I/O batches of ``io_rows`` rows in source order from row ``start`` of the pass
        (runs on the prefetch thread)."""
        view = self._arrow
        if isinstance(view, PermutationView) and (rows := view.split_rows()) is not None:
            if isinstance(self.source, Shard):
                first = True
                for part in self._shard_offsets(start, ramp(self.batch_size, self.io_rows)):
                    yield view.take_row_ids(rows.at(view.offset, view.limit, part))
                    if first:  # later batches: slices of the whole split, read once now
                        rows.all()
                        first = False
                return
            if start == 0 and not view.cached:
                # The first batch by id: streaming its row ids takes one small read (lancedb's
                # own first read of a stream took 0.7-2.5 s at 10M-100M rows here).
                ids = rows.stream(view.offset, view.limit, ramp(self.batch_size, self.batch_size))
                first = next(ids, None)
                _close(ids)
                yield from self._stream(view, None if first is None else view.take_row_ids(first))
                return
            # A resumed or cached pass (the cache gathers by row id; lancedb's stream would
            # read the table): streamed from the permutation table from row ``start`` (lancedb's
            # with_skip rebuilds its reader first, ~3 s at 100M rows), reads ramping up from one
            # training batch.
            offset = (view.offset or 0) + start
            limit = None if view.limit is None else max(view.limit - start, 0)
            for ids in rows.stream(offset, limit, ramp(self.batch_size, self.io_rows)):
                yield view.take_row_ids(ids)
            return
        if isinstance(self.source, Shard):  # a plain Permutation, or a forked child's view
            for part in self._shard_offsets(start, itertools.repeat(self.io_rows)):
                yield view.take_offsets(part.tolist())
            return
        if not start:
            yield from self._stream(view)
            return
        if isinstance(view, PermutationView):  # a forked child: skip is relative
            view = view.with_skip(start)
        else:  # a plain lancedb Permutation: its with_skip replaces the offset
            for first in range(start, self.num_rows, self.io_rows):
                stop = min(first + self.io_rows, self.num_rows)
                yield view.take_offsets(list(range(first, stop)))
            return
        yield from view.iter(self.io_rows, skip_last_batch=False)

    def _shard_offsets(self, start: int, sizes: Iterable[int]) -> Iterator[np.ndarray]:
        """The shard's offsets from position ``start`` on, in chunks of the next of ``sizes``
        rows, each computed when it is needed (`Shard.offsets_at`)."""
        source = cast(Shard, self.source)
        end = len(source)
        for size in sizes:
            if start >= end:
                return
            stop = min(start + size, end)
            yield source.offsets_at(np.arange(start, stop, dtype=np.int64))
            start = stop

    def _stream(
        self, view: Permutation, head: pa.RecordBatch | None = None
    ) -> Iterator[pa.RecordBatch]:
        """A whole pass through lancedb's own stream (``Permutation.iter``, no offset map),
        which measured up to ~15% faster here than taking the same rows by id. Its first read
        is ``head`` (the first training batch, read apart) or a separate one-batch stream, so
        the first batch does not wait for a whole I/O batch."""
        if head is None:
            first = cast(
                Iterator[pa.RecordBatch], view.iter(self.batch_size, skip_last_batch=False)
            )
            try:
                head = next(first, None)
            finally:
                _close(first)
        if head is None or head.num_rows == 0:
            return
        yield head
        skip = head.num_rows  # lancedb's first read may be shorter than asked (misaligned)
        if skip >= self.num_rows:
            return
        reads = cast(Iterator[pa.RecordBatch], view.iter(self.io_rows, skip_last_batch=False))
        try:
            for batch in reads:
                if skip:
                    dropped = min(skip, batch.num_rows)
                    batch, skip = batch.slice(dropped), skip - dropped
                if batch.num_rows:
                    yield batch
        finally:
            _close(reads)

    def _measure_row_bytes(self) -> int:
        fixed = _fixed_row_bytes(self._arrow.schema)
        if fixed is not None:
            return max(1, fixed)
        rows = min(self.num_rows, _PROBE_ROWS)
        if rows == 0:
            return 1
        probe = next(iter(self._read_head(rows)))
        return max(1, -(-probe.nbytes // max(1, probe.num_rows)))

    def _read_head(self, rows: int) -> Iterator[pa.RecordBatch]:
        """The first ``rows`` rows of a pass (the row-size probe of variable-width columns)."""
        if isinstance(self.source, Shard):
            head = self.source.offsets_at(np.arange(rows, dtype=np.int64))
            yield self._arrow.take_offsets(head.tolist())
            return
        reads = self._arrow.iter(rows, skip_last_batch=False)
        try:
            yield next(iter(reads))
        finally:
            close = getattr(reads, "close", None)
            if close is not None:
                close()

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: the view's lineage (tables, pinned versions, split, columns),
        the shard, epoch, batch size and rows delivered in the current pass. Small (about
        1 KB) and JSON-serializable; `load_state_dict` continues from it."""
        source = self.source
        return {
            "kind": _LOADER_STATE,
            "view": view_identity(source.view if isinstance(source, Shard) else source),
            "shard": source.settings() if isinstance(source, Shard) else None,
            "epoch": self._epoch,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "num_rows": self.num_rows,
            "position": self._position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict`: the next pass reads the same epoch from the next row.

        Raises:
            LineageError: the state was saved on another view (another table, version,
                split, skip/take, columns or row count), named with both values.
            SpecError: another shard layout, batch size or ``drop_last``, or not a
                BatchLoader state.
        """
        if not isinstance(state, Mapping) or state.get("kind") != _LOADER_STATE:
            raise SpecError(
                f"not a BatchLoader state (kind {_kind_of(state)!r}, expected {_LOADER_STATE!r})"
            )
        source = self.source
        view = source.view if isinstance(source, Shard) else source
        check_view_identity(state["view"], view_identity(view))
        ours = source.settings() if isinstance(source, Shard) else None
        _same_settings("shard", _with_order(state["shard"]), ours)
        for key in ("batch_size", "drop_last"):
            _same_settings(key, state[key], getattr(self, key))
        self.set_epoch(int(state["epoch"]))
        if int(state["num_rows"]) != self.num_rows:
            raise LineageError(
                f"loader state was saved on a pass of {state['num_rows']:,} rows; this loader "
                f"reads {self.num_rows:,} rows of the same view"
            )
        position = int(state["position"])
        if not 0 <= position <= self.num_rows:
            raise SpecError(f"loader state position {position} is outside 0..{self.num_rows}")
        self._start = self._position = position


def _close(stream: Iterator[Any]) -> None:
    """End a lancedb read stream (a generator) now, not when it is garbage-collected."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


_LOADER_STATE = "perm_assets.BatchLoader/1"
_SHARD_STATE = "perm_assets.Shard/1"


def view_identity(view: Permutation) -> dict[str, Any]:
    """What a resumed loader must read again: tables, pinned versions, split, skip/take and
    columns. For a project view, its `ViewLineage` (less format and batch size, which do not
    change the rows); for a plain lancedb `Permutation`, its tables' names and versions."""
    columns = list(view.selection)
    lineage = getattr(view, "lineage", None)
    if isinstance(lineage, ViewLineage):
        identity = asdict(lineage)
        for key in ("format", "batch_size"):
            identity.pop(key)
        identity["uri"] = _normalised_uri(lineage.uri)
        return {**identity, "columns": columns}
    stored = view.permutation_table
    return {
        "table": None if stored is None else stored.name,
        "table_version": None if stored is None else stored.version,
        "base_table": view.base_table.name,
        "base_version": view.base_table.version,
        "split_index": view.split,
        "offset": view.offset,
        "limit": view.limit,
        "columns": columns,
    }


def check_view_identity(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> None:
    """Refuse a state saved on another view, naming each field that differs.

    Raises:
        LineageError: a differing table, version, pin, split, skip/take or column list.
    """
    keys = sorted(set(saved) | set(ours))
    differ = [k for k in keys if saved.get(k) != ours.get(k)]
    if differ:
        details = "; ".join(
            f"{k}: saved {saved.get(k)!r}, this view {ours.get(k)!r}" for k in differ
        )
        what = ours.get("asset") or ours.get("table") or ours.get("base_table")
        raise LineageError(
            f"loader state was saved on another view than this one of '{what}' ({details}); "
            "load it onto a view of the same asset version, split and columns "
            "(reproduce_input reopens it)"
        )


def _same_settings(name: str, saved: Any, ours: Any) -> None:
    if saved != ours:
        raise SpecError(
            f"loader state was saved with {name}={saved!r}, this loader has {name}={ours!r}; "
            f"resuming with another {name} would deliver other rows"
        )


def _with_order(saved: Any) -> Any:
    """Shard settings saved before shards had an order read DistributedSampler's order."""
    if isinstance(saved, Mapping) and "order" not in saved:
        return {**saved, "order": "distributed_sampler"}
    return saved


def _kind_of(state: Any) -> Any:
    return state.get("kind") if isinstance(state, Mapping) else type(state).__name__


def _normalised_uri(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def _fixed_row_bytes(schema: pa.Schema) -> int | None:
    """Bytes per row of a schema of fixed-width columns (values only), else None."""
    total = 0
    for field in schema:
        width = _fixed_width_bits(field.type)
        if width is None:
            return None
        total += width
    return -(-total // 8)


def _fixed_width_bits(kind: pa.DataType) -> int | None:
    if pa.types.is_fixed_size_list(kind):
        inner = _fixed_width_bits(kind.value_type)
        return None if inner is None else inner * kind.list_size
    if pa.types.is_boolean(kind):
        return 1
    try:
        return kind.bit_width
    except ValueError:  # variable width: strings, lists, structs
        return None


def to_tensors(batch: pa.RecordBatch) -> dict[str, torch.Tensor]:
    """A batch as one tensor per column, zero-copy: ``{"x": tensor([...]), ...}``.

    The shape DataLoader's default collate builds from format ``torch``, without its per-row
    dicts; for ``view.with_transform(to_tensors)`` with `BatchLoader`. Numeric columns without
    nulls only (as lancedb's torch formats).
    """
    return {
        name: torch.from_dlpack(column)
        for name, column in zip(batch.schema.names, batch.columns, strict=True)
    }


def _arrow_view(view: Permutation) -> Permutation:
    """``view`` yielding Arrow batches, without lancedb's ``copy.copy``.

    lancedb copies through ``__getstate__``, which reads the whole permutation table for a
    plain `Permutation`; a shallow copy shares the reader instead, as `PermutationView` does.
    """
    arrow = object.__new__(type(view))
    arrow.__dict__.update(view.__dict__)
    arrow.__dict__["transform_fn"] = Transforms.arrow2arrow  # lancedb's annotation is invalid
    return arrow


class _Prefetcher:
    """Iterates ``source`` on a daemon thread, at most ``depth`` items ahead of the consumer."""

    def __init__(self, source: Iterator[pa.RecordBatch], *, depth: int) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._run, args=(source,), name="perm-assets-read-ahead", daemon=True
        )
        _LIVE.add(self)
        self._thread.start()

    def _run(self, source: Iterator[pa.RecordBatch]) -> None:
        try:
            for item in source:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(("error", exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _put(self, entry: tuple[str, Any]) -> bool:
        # A timeout, not a blocking put: a consumer that stopped early must not strand the thread.
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self

    def __next__(self) -> pa.RecordBatch:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (at most one in-flight read)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        _LIVE.discard(self)


_LIVE: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()
"""Read-ahead threads not closed yet: a loop that breaks out of a pass and keeps the
iterator (or an exception traceback that holds it) leaves one running."""


@atexit.register
def _close_read_ahead() -> None:
    # A daemon thread still inside a lancedb read while the interpreter finalizes crashed the
    # process (a segmentation fault after `break` in 1 run of 4 at 100M rows): stop and join
    # every one before shutdown. Registered after lancedb's import, so it runs before any
    # exit handler of lancedb's (atexit runs handlers last-in, first-out).
    for reads in list(_LIVE):
        reads.close()
