"""Batch shapes and exact batch sizes: what a training loop receives from a view.

Each view format turns one Arrow ``RecordBatch`` of ``n`` rows (columns ``x: float32``,
``y: int64``, ``image: fixed_size_list<float32>[64]``) into:

| format | a batch is | use it as |
|---|---|---|
| ``numpy_dict`` | ``{"x": ndarray (n,), "image": ndarray (n, 64)}`` | ``batch["x"].mean()`` |
| ``torch_dict`` | ``{"x": Tensor (n,), "image": Tensor (n, 64)}`` | ``model(batch["image"])`` |
| ``arrow`` | ``pyarrow.RecordBatch`` | ``batch.column("x")`` |
| ``pandas`` | ``pandas.DataFrame`` | ``batch["x"]`` |
| ``polars`` | ``polars.DataFrame`` (needs polars) | ``batch["x"]`` |
| ``python`` (default) | ``list`` of ``n`` row dicts | ``batch[0]["x"]`` |
| ``python_col`` | ``{"x": list, ...}`` | ``batch["x"][0]`` |
| ``numpy`` | one unnamed 2-D array ``(n, n_cols)``, float64 for mixed types | ``batch[:, 0]`` |
| ``torch`` | ``list`` of ``n`` dicts of 0-D tensors (DataLoader collates) | ``batch[0]["x"]`` |
| ``torch_row`` | ``list`` of ``n`` 1-D tensors, one per row | ``batch[0][0]`` |
| ``torch_col`` | one 2-D tensor ``(n_cols, n)`` | ``batch[0]`` is column 0 |

``numpy_dict`` and ``torch_dict`` are this project's: one array or tensor per named column, zero
copy for numeric columns without nulls, the fast path for a training loop. The other names are
lancedb's own (``Permutation.with_format``), kept as they are; lancedb's docstring calls
``numpy`` a dict of arrays, but 0.40 returns the 2-D array above.

lancedb's ``Permutation.iter(b)`` reads ``b`` rows per I/O batch, but the reads of a split that
does not start on a multiple of ``b`` come back misaligned (205 then 793 rows at ``b=1024`` on a
``val`` split); `reslice` restores exactly ``b`` rows per batch, the last one shorter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

LanceFormat = Literal[
    "numpy", "python", "python_col", "pandas", "arrow", "torch", "torch_row", "torch_col", "polars"
]
"""Batch formats lancedb's `Permutation.with_format` implements."""

OwnFormat = Literal["numpy_dict", "torch_dict"]
"""Batch formats this project adds: a dict of one array or tensor per named column."""

ViewFormat = Literal[LanceFormat, OwnFormat]
"""Every batch format a view accepts (see the table in this module's docstring)."""

VIEW_FORMATS: tuple[str, ...] = (*get_args(LanceFormat), *get_args(OwnFormat))


def to_numpy_dict(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """One numpy array per column: ``(n,)`` for scalars, ``(n, d)`` for fixed-size lists
    (vectors), an object array for anything else. Zero-copy for numeric columns without nulls."""
    return {
        name: column_to_numpy(column)
        for name, column in zip(batch.schema.names, batch.columns, strict=True)
    }


def column_to_numpy(column: pa.Array) -> np.ndarray:
    """A column as numpy; a fixed-size list column (an embedding, an image) as a 2-D array."""
    if pa.types.is_fixed_size_list(column.type) and column.null_count == 0:
        size = column.type.list_size
        flat = column.flatten()  # respects the array's offset, unlike .values
        values = flat.to_numpy(zero_copy_only=False)
        return values.reshape(len(column), size)
    return column.to_numpy(zero_copy_only=False)


def to_torch_dict(batch: pa.RecordBatch) -> dict[str, Any]:
    """One tensor per column, shaped as `to_numpy_dict`: ``{"x": Tensor (n,), ...}``.

    Numeric and boolean columns (and fixed-size lists of them) without nulls; zero-copy for
    numbers. torch is an optional extra (``pip install 'perm-assets[torch]'``).
    """
    try:
        import torch
    except ImportError as exc:  # torch is an optional extra
        raise ImportError(
            "format 'torch_dict' needs PyTorch: pip install 'perm-assets[torch]'"
        ) from exc
    out: dict[str, Any] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        kind = column.type
        size = kind.list_size if pa.types.is_fixed_size_list(kind) else None
        flat = column.flatten() if size is not None else column
        if column.null_count or flat.null_count or not _has_tensor_form(flat.type):
            raise TypeError(
                f"format 'torch_dict': column '{name}' has Arrow type {kind}"
                f"{' with nulls' if column.null_count or flat.null_count else ''}, which has no "
                "tensor form; select numeric or fixed-size-list columns without nulls, or use "
                "format 'numpy_dict' / 'arrow'"
            )
        # Arrow hands numeric buffers to torch through DLPack without a copy (booleans are
        # bit-packed in Arrow, so they are unpacked once).
        tensor = (
            torch.from_numpy(flat.to_numpy(zero_copy_only=False))
            if pa.types.is_boolean(flat.type)
            else torch.from_dlpack(flat)
        )
        out[name] = tensor.reshape(len(column), size) if size is not None else tensor
    return out


def _has_tensor_form(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


OWN_TRANSFORMS: dict[str, Callable[[pa.RecordBatch], Any]] = {
    "numpy_dict": to_numpy_dict,
    "torch_dict": to_torch_dict,
}


def reslice(
    reads: Iterable[pa.RecordBatch], batch_size: int, *, drop_last: bool
) -> Iterator[pa.RecordBatch]:
    """Batches of exactly ``batch_size`` rows (the last shorter unless dropped), in order.

    Zero-copy slices; rows carried over a read boundary (when a read is not a multiple of
    ``batch_size``) are concatenated once.
    """
    carry: list[pa.RecordBatch] = []
    carried = 0
    for batch in reads:
        start = 0
        if carried:
            start = min(batch_size - carried, batch.num_rows)
            carry.append(batch.slice(0, start))
            carried += start
            if carried < batch_size:
                continue
            yield pa.concat_batches(carry)
            carry, carried = [], 0
        end = start + (batch.num_rows - start) // batch_size * batch_size
        for offset in range(start, end, batch_size):
            yield batch.slice(offset, batch_size)
        if end < batch.num_rows:
            carry, carried = [batch.slice(end)], batch.num_rows - end
    if carried and not drop_last:
        yield pa.concat_batches(carry)
