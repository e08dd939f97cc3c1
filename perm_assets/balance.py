"""What a split looks like, for people: one table and one chart per materialization.

Every permutation and folds materialization records

- ``perm_assets/splits`` (folds: ``perm_assets/folds``): a `dg.MetadataValue.table` with a row
  per split or fold: rows, share of the selected rows, requested share; when a label is known
  (stratified kinds, or the asset's ``label=`` hint) the classes present, the largest
  deviation of any class from its expected count (in rows and in share points) and, up to
  `MAX_CLASS_COLUMNS` classes, a count column per class; for group kinds, groups per split
  and groups found in more than one split (0 when the split is sound);
- ``perm_assets/balance``: markdown holding an SVG chart as a ``data:`` image, which
  Dagster 1.13's UI renders inline (its markdown sanitizer allows ``data:`` sources): the share
  of every split, requested against actual, and, with a label, each class's share of every
  split against its share of all selected rows (balanced splits draw the same bars).

Counting is columnar and streamed (`perm_assets.membership`): one batched scan of the
permutation's rows into one byte per base row, one batched scan of the label/group column at
the pinned version, a ``bincount`` over (split, class) pairs per batch.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import dagster as dg
import numpy as np
import pyarrow as pa
from lancedb.table import Table

from perm_assets.build import PermutationData, check_scalar_columns, positions_in
from perm_assets.membership import Membership, arrow_batches, scan_filtered
from perm_assets.specs import (
    CalculatedSplit,
    FoldsSpec,
    GroupKFold,
    GroupSplit,
    HashSplit,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    StratifiedKFold,
    StratifiedSplit,
    TimeSeriesFolds,
)
from perm_assets.tables import read_all, where

SPLITS_KEY = "perm_assets/splits"
FOLDS_KEY = "perm_assets/folds"
CHART_KEY = "perm_assets/balance"
LABEL_META = "perm_assets/label"
"""Asset metadata naming the column whose class balance is reported (the ``label=`` hint)."""
MAX_CLASS_COLUMNS = 20
"""Up to this many classes get a count column each; beyond, the table keeps the summary."""
MAX_CHART_CLASSES = 120
"""The chart draws the most frequent classes up to this many (its caption says so)."""


@dataclass(frozen=True)
class Balance:
    """Rows of every split by class (and group spread), counted from one scan.

    Attributes:
        classes: class values as text, in value order.
        counts: ``(splits, classes)`` rows of each class in each split.
        groups: distinct groups per split (group kinds), else None.
        shared_groups: groups found in more than one split (group kinds), else None.
    """

    classes: list[str]
    counts: np.ndarray
    groups: np.ndarray | None = None
    shared_groups: int | None = None


def label_of(spec: PermutationSpec | FoldsSpec | None, hint: str | None) -> str | None:
    """The column whose classes are counted: the hint, else the spec's stratification label."""
    if hint is not None:
        return hint
    part = spec.split if isinstance(spec, PermutationSpec) else spec.folds if spec else None
    if isinstance(part, StratifiedSplit | StratifiedKFold):
        return part.label
    if isinstance(part, GroupSplit):
        return part.label
    return None


def group_of(spec: PermutationSpec | FoldsSpec | None) -> str | None:
    part = spec.split if isinstance(spec, PermutationSpec) else spec.folds if spec else None
    return part.group if isinstance(part, GroupSplit | GroupKFold) else None


def requested_shares(
    spec: PermutationSpec | FoldsSpec | None, filtered_rows: int | None
) -> list[float] | None:
    """Each split's share of the selected rows as the spec asks (None: the spec asks no share)."""
    if isinstance(spec, FoldsSpec):
        k = spec.folds.k
        return None if isinstance(spec.folds, TimeSeriesFolds) else [1.0 / k] * k
    if spec is None:
        return None
    split = spec.split
    if split is None:
        return [1.0]
    if isinstance(split, RandomSplit | SequentialSplit):
        if split.ratios is not None:
            return list(split.ratios)
        if split.counts is not None and filtered_rows:
            return [c / filtered_rows for c in split.counts]
        if split.fixed is not None:
            return [1.0 / split.fixed] * split.fixed
        return None
    if isinstance(split, HashSplit):
        total = sum(split.weights) + split.discard_weight
        return [w / total for w in split.weights]
    if isinstance(split, CalculatedSplit):
        return None
    return list(split.ratios)  # stratified, group and time splits


def count_balance(
    base: Table,
    data: PermutationData,
    *,
    label: str | None,
    group: str | None,
    asset: str,
) -> Balance | None:
    """Classes by split (``label``) and group spread (``group``) of ``data`` over ``base``.

    ``base`` is checked out at the permutation's base version. Only those columns and the row
    ids are read, with the spec's filter (every permuted row passes it). Nulls count as a class
    of their own (a ``label=`` hint may name a column with gaps).
    """
    columns = [c for c in dict.fromkeys([label, group]) if c is not None]
    if not columns:
        return None
    if label is not None:  # a label= hint is checked only here: name it in the error
        check_scalar_columns(base, [label], role="label", asset=asset)
    spec = data.spec
    batches = data.stream() if data.stream is not None else arrow_batches(data.data)
    member = Membership.build(base, batches, len(data.split_names))
    if member is not None:  # row addresses: one byte per base row, the scan in batches
        with member:
            scan = scan_filtered(
                member,
                base,
                spec.filter if spec is not None else None,
                asset=asset,
                label=label,
                group=group,
                nulls_allowed=True,
            )
        groups = shared = None
        if scan.groups is not None:
            groups = scan.groups["groups_per_split"]
            shared = int(scan.groups["groups_in_several_splits"])
        return Balance(
            classes=scan.classes, counts=scan.counts, groups=groups, shared_groups=shared
        )
    query = base.search().select(columns).with_row_id(True)
    if spec is not None and spec.filter is not None:  # fewer rows to join; all permuted pass it
        query = query.where(cast(str, where(spec.filter)))
    scanned = read_all(query)
    row_ids, split_ids = _permuted(data)
    # Each permuted row's place in the scan (scans return row ids ascending).
    at = positions_in(scanned.column("_rowid").to_numpy(), row_ids)
    splits = len(data.split_names)
    classes: list[str] = []
    counts = np.zeros((splits, 0), dtype=np.int64)
    if label is not None:
        values, codes = _classes(scanned.column(label).combine_chunks())
        pairs = split_ids * len(values) + codes[at]
        counts = np.bincount(pairs, minlength=splits * len(values)).reshape(splits, len(values))
        classes = values
    groups = shared = None
    if group is not None:
        _, group_codes = _classes(scanned.column(group).combine_chunks())
        n_groups = int(group_codes.max(initial=0)) + 1
        pairs = np.unique(split_ids * n_groups + group_codes[at])  # (split, group) pairs
        split_part, group_part = np.divmod(pairs, n_groups)
        groups = np.bincount(split_part, minlength=splits)
        shared = int(np.count_nonzero(np.bincount(group_part, minlength=n_groups) > 1))
    return Balance(classes=classes, counts=counts, groups=groups, shared_groups=shared)


def _permuted(data: PermutationData) -> tuple[np.ndarray, np.ndarray]:
    """Row ids and split ids (int64) of every permuted row, for tables with stable row ids
    (not addresses); an out-of-core engine's stream is read batch by batch into two
    preallocated arrays (16 bytes a row)."""
    if data.stream is None:
        return (
            data.data.column("row_id").to_numpy(),
            data.data.column("split_id").to_numpy().astype(np.int64),
        )
    row_ids = np.empty(data.num_rows, dtype=np.uint64)
    split_ids = np.empty(data.num_rows, dtype=np.int64)
    done = 0
    for batch in data.stream():
        n = batch.num_rows
        row_ids[done : done + n] = batch.column("row_id").to_numpy()
        split_ids[done : done + n] = batch.column("split_id").to_numpy()
        done += n
    if done != data.num_rows:
        raise RuntimeError(f"the permutation streamed {done} rows, {data.num_rows} planned")
    return row_ids, split_ids


def split_report(
    names: Sequence[str],
    rows: Sequence[int],
    *,
    selected: int,
    requested: Sequence[float | None] | None,
    balance: Balance | None,
    label: str | None,
    train_rows: Sequence[int] | None = None,
    unit: str = "split",
) -> dict[str, Any]:
    """The table and chart metadata of one materialization (keys `SPLITS_KEY` or
    `FOLDS_KEY`, and `CHART_KEY`)."""
    rows_arr = np.asarray(rows, dtype=np.int64)
    shares = rows_arr / selected if selected else np.zeros(len(rows_arr))
    columns = [
        dg.TableColumn(unit, "string", description=f"{unit} name"),
        dg.TableColumn("rows", "int", description="rows in the " + unit),
        dg.TableColumn("share", "float", description="rows / rows the filter selects"),
        dg.TableColumn(
            "requested_share", "float", description="share the spec asks (empty: not a share)"
        ),
    ]
    records: list[dict[str, Any]] = [
        {
            unit: name,
            "rows": int(rows_arr[i]),
            "share": round(float(shares[i]), 6),
            "requested_share": _rounded(requested[i]) if requested else None,
        }
        for i, name in enumerate(names)
    ]
    if train_rows is not None:
        columns.append(dg.TableColumn("train_rows", "int", description="rows the fold trains on"))
        for record, n in zip(records, train_rows, strict=True):
            record["train_rows"] = int(n)
    if balance is not None and label is not None:
        columns += [
            dg.TableColumn("classes", "int", description=f"distinct '{label}' values present"),
            dg.TableColumn(
                "max_class_dev_rows",
                "float",
                description="largest |class rows - class total x split share| over classes",
            ),
            dg.TableColumn(
                "max_class_dev_pp",
                "float",
                description="largest |class share in split - class share overall|, in points",
            ),
            dg.TableColumn("worst_class", "string", description="the class with that deviation"),
        ]
        deviation_rows, deviation_pp, worst = _deviations(balance.counts)
        for i, record in enumerate(records):
            record["classes"] = int(np.count_nonzero(balance.counts[i]))
            record["max_class_dev_rows"] = round(float(deviation_rows[i]), 3)
            record["max_class_dev_pp"] = round(float(deviation_pp[i]), 4)
            record["worst_class"] = balance.classes[worst[i]] if balance.classes else None
        if len(balance.classes) <= MAX_CLASS_COLUMNS:
            for j, cls in enumerate(balance.classes):
                name = f"{label}={cls}"
                columns.append(dg.TableColumn(name, "int", description=f"rows with {name}"))
                for i, record in enumerate(records):
                    record[name] = int(balance.counts[i, j])
    if balance is not None and balance.groups is not None:
        columns += [
            dg.TableColumn("groups", "int", description="distinct groups in the " + unit),
            dg.TableColumn(
                "groups_shared", "int", description="groups of all splits found in >1 split"
            ),
        ]
        for i, record in enumerate(records):
            record["groups"] = int(balance.groups[i])
            record["groups_shared"] = balance.shared_groups
    table = dg.MetadataValue.table(
        records=[dg.TableRecord(r) for r in records], schema=dg.TableSchema(columns=columns)
    )
    chart = _chart(list(names), shares, requested, balance, label, unit=unit)
    return {
        FOLDS_KEY if unit == "fold" else SPLITS_KEY: table,
        CHART_KEY: dg.MetadataValue.md(chart),
    }


# ----------------------------------------------------------------------------- internals
def _classes(values: pa.Array) -> tuple[list[str], np.ndarray]:
    """Distinct values as text and each row's code into them (dense, 0-based); nulls are a
    class of their own, ``null``."""
    if pa.types.is_integer(values.type) and not values.null_count:
        numbers = values.to_numpy()
        low = int(numbers.min(initial=0))
        span = int(numbers.max(initial=0)) - low + 1
        if 0 < span <= 4 * max(numbers.size, 1) and span <= 1 << 24:  # dense: no sort needed
            present = np.flatnonzero(np.bincount(numbers - low, minlength=span))
            lookup = np.zeros(span, dtype=np.int64)
            lookup[present] = np.arange(present.size)
            return [str(int(v) + low) for v in present], lookup[numbers - low]
        uniques, codes = np.unique(numbers, return_inverse=True)
        return [str(v) for v in uniques.tolist()], codes
    encoded = values.dictionary_encode(null_encoding="encode")
    names = ["null" if v is None else str(v) for v in encoded.dictionary.to_pylist()]
    return names, encoded.indices.to_numpy()


def _deviations(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per split: largest class deviation in rows and in share points, and its class index."""
    totals = counts.sum(axis=0).astype(np.float64)  # rows of each class over all splits
    split_rows = counts.sum(axis=1).astype(np.float64)
    selected = totals.sum()
    if selected == 0 or counts.shape[1] == 0:
        zeros = np.zeros(counts.shape[0])
        return zeros, zeros, np.zeros(counts.shape[0], dtype=np.int64)
    expected = np.outer(split_rows / selected, totals)
    off = np.abs(counts - expected)
    worst = off.argmax(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        in_split = np.where(split_rows[:, None] > 0, counts / split_rows[:, None], 0.0)
    points = np.abs(in_split - totals / selected) * 100
    return off.max(axis=1), points.max(axis=1), worst


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


_PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6"]


def _chart(
    names: list[str],
    shares: np.ndarray,
    requested: Sequence[float | None] | None,
    balance: Balance | None,
    label: str | None,
    *,
    unit: str,
) -> str:
    """Markdown: a caption and an SVG (as a ``data:`` image) of shares and class balance."""
    width, left, bar_h, gap = 640, 110, 16, 6
    parts: list[str] = []
    y = 20
    parts.append(_text(8, y - 6, f"share of selected rows per {unit} (outline: requested)", 12))
    for i, name in enumerate(names):
        color = _PALETTE[i % len(_PALETTE)]
        w = (width - left - 70) * float(shares[i])
        parts.append(_text(8, y + bar_h - 4, name, 11))
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        want = requested[i] if requested else None
        if want is not None:
            rw = (width - left - 70) * want
            parts.append(
                f'<rect x="{left}" y="{y}" width="{rw:.1f}" height="{bar_h}" fill="none" '
                'stroke="#222" stroke-dasharray="3,2"/>'
            )
        parts.append(_text(left + w + 4, y + bar_h - 4, f"{shares[i] * 100:.2f}%", 11))
        y += bar_h + gap
    caption = f"Rows per {unit}."
    if balance is not None and label is not None and balance.classes:
        shown = min(len(balance.classes), MAX_CHART_CLASSES)
        # The most frequent classes when not all fit, drawn in value order.
        drawn = np.sort(np.argsort(-balance.counts.sum(axis=0), kind="stable")[:shown])
        counts = balance.counts[:, drawn].astype(np.float64)
        split_rows = np.maximum(balance.counts.sum(axis=1), 1).astype(np.float64)
        overall = balance.counts.sum(axis=0)[drawn] / max(int(balance.counts.sum()), 1)
        in_split = counts / split_rows[:, None]
        top = float(max(in_split.max(initial=0), overall.max(initial=0))) or 1.0
        y += 18
        title = (
            f"share of each '{label}' class within each {unit}, bars from 0 to "
            f"{top * 100:.1f}% (black tick: its share of all selected rows)"
        )
        parts.append(_text(8, y - 4, title, 12))
        row_h, plot_w = 44, width - left - 10
        step = plot_w / shown
        for i, name in enumerate(names):
            color = _PALETTE[i % len(_PALETTE)]
            y0 = y + 4
            parts.append(_text(8, y0 + row_h / 2 + 4, name, 11))
            parts.append(
                f'<line x1="{left}" y1="{y0 + row_h}" x2="{left + plot_w}" y2="{y0 + row_h}" '
                'stroke="#999"/>'
            )
            for j in range(shown):
                h = row_h * in_split[i, j] / top
                x = left + j * step
                parts.append(
                    f'<rect x="{x:.1f}" y="{y0 + row_h - h:.1f}" width="{max(step - 1, 0.5):.1f}" '
                    f'height="{h:.1f}" fill="{color}"/>'
                )
                t = y0 + row_h - row_h * overall[j] / top
                parts.append(
                    f'<line x1="{x:.1f}" y1="{t:.1f}" x2="{x + max(step - 1, 0.5):.1f}" '
                    f'y2="{t:.1f}" stroke="#111" stroke-width="1.5"/>'
                )
            y = y0 + row_h + 8
        if shown <= 30:  # class names under the last row, when they fit
            for j in range(shown):
                x = left + j * step + step / 2
                parts.append(_text(x, y + 8, balance.classes[drawn[j]], 9, anchor="middle"))
            y += 12
        more = len(balance.classes) - shown
        caption = (
            f"Rows per {unit}, and the share of each of the {shown} most frequent "
            f"'{label}' classes within each {unit}"
            + (f" ({more} rarer classes not drawn)" if more > 0 else "")
            + "; equal bars across rows mean a balanced split."
        )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 8}" '
        f'font-family="sans-serif">{"".join(parts)}</svg>'
    )
    encoded = base64.b64encode(svg.encode()).decode()
    return f"{caption}\n\n![class balance](data:image/svg+xml;base64,{encoded})"


def _text(x: float, y: float, text: str, size: int, *, anchor: str = "start") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}">'
        f"{html.escape(text)}</text>"
    )
