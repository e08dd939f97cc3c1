"""Which rows, in which order, a model trained on, months later: reproducing recorded views.

The IO manager records every view it hands out on the consumer's ``LOADED_INPUT`` event
(``lineage/*`` metadata: asset, tables, Lance versions, split, columns, format, batch size).
`reproduce_input` reopens exactly that view from a past run; `load_view` opens a permutation or
table asset as a given run materialized it. Both open the tables at the recorded versions, so
re-materializations since then change nothing, and both fail with `LineageError` (never other
rows) when a version was cleaned up or the base table was re-created (see `perm_assets.pins`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from perm_assets.errors import LineageError, TableNotFoundError
from perm_assets.identity import VersionIdentity
from perm_assets.resources import LanceDBResource
from perm_assets.tables import table_name
from perm_assets.views import PermutationView, ViewRequest, open_view, refine

VERSION_KEY = "lance/version"
LINEAGE_PREFIX = "lineage/"


STAMP_KEY = "lance/version_stamp"
"""Materialization metadata: when Lance committed the version (`perm_assets.pins.version_stamp`)."""
PIN_KEY = "perm_assets/pin"


def recorded_identity(instance: dg.DagsterInstance, key: dg.AssetKey) -> VersionIdentity | None:
    """The Lance version of the asset's latest materialization with what identifies it (pin,
    commit time), or of its latest observation (an observed source table); None when neither
    recorded a version."""
    event = instance.get_latest_materialization_event(key)
    materialization = event.asset_materialization if event is not None else None
    if materialization is not None and VERSION_KEY in materialization.metadata:
        return identity_of(materialization.metadata)
    version = recorded_version(instance, key)
    return None if version is None else VersionIdentity(version)


def identity_of(metadata: Mapping[str, Any]) -> VersionIdentity:
    """The `VersionIdentity` a materialization's metadata records (pin and stamp if any)."""

    def value(key: str) -> Any:
        entry = metadata.get(key)
        return getattr(entry, "value", entry)

    stamp = value(STAMP_KEY)
    pin = value(PIN_KEY)
    return VersionIdentity(
        int(value(VERSION_KEY)),
        pin=str(pin) if pin is not None else None,
        stamp=int(stamp) if stamp is not None else None,
    )


def recorded_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> int | None:
    """The Lance version of the asset's latest materialization, or of its latest observation
    (an observed source table); None when it was neither."""
    event = instance.get_latest_materialization_event(key)
    materialization = event.asset_materialization if event is not None else None
    if materialization is not None and VERSION_KEY in materialization.metadata:
        return int(materialization.metadata[VERSION_KEY].value)  # type: ignore[arg-type]
    # Reads of an asset are observations too (input metadata): skip those without a version.
    for record in instance.fetch_observations(key, limit=50).records:
        observation = record.asset_observation
        if observation is not None and VERSION_KEY in observation.metadata:
            return int(observation.metadata[VERSION_KEY].value)  # type: ignore[arg-type]
    return None


def load_view(
    key: dg.AssetKey | str,
    *,
    db: LanceDBResource,
    instance: dg.DagsterInstance,
    run_id: str | None = None,
    request: ViewRequest | None = None,
    cache: bool = False,
) -> PermutationView:
    """The view of permutation (or table) asset ``key`` as run ``run_id`` materialized it.

    Without ``run_id``: its latest materialization. The tables are opened at the Lance versions
    that materialization recorded, so later re-materializations do not change the rows.
    ``cache=True`` reads through the resource's local column cache (as ``ViewRequest(cache=
    True)``): same rows, same order.
    """
    if cache:
        request = (request or ViewRequest()).model_copy(update={"cache": True})
    asset_key = dg.AssetKey.from_user_string(key) if isinstance(key, str) else key
    label = asset_key.to_user_string()
    records = instance.fetch_materializations(asset_key, limit=1000).records
    for record in records:
        mat = record.asset_materialization
        if mat is None or (run_id is not None and record.run_id != run_id):
            continue
        if VERSION_KEY not in mat.metadata:
            break
        identity = identity_of(mat.metadata)
        try:
            return open_view(
                db,
                asset=label,
                table=table_name(asset_key),
                version=identity.version,
                request=request,
                expected=identity,
            )
        except TableNotFoundError as exc:
            raise LineageError(
                f"cannot open asset '{label}' as run {record.run_id} materialized it: {exc}"
            ) from exc
    which = f"by run {run_id}" if run_id else "at all"
    raise LineageError(f"asset '{label}' was not materialized {which} with a Lance version")


@dataclass(frozen=True)
class RecordedInput:
    """A view as one run's step recorded it on its ``LOADED_INPUT`` event."""

    run_id: str
    step_key: str
    input_name: str
    metadata: dict[str, Any]


def recorded_inputs(
    instance: dg.DagsterInstance, run_id: str, *, step_key: str | None = None
) -> list[RecordedInput]:
    """Every view the IO manager handed out in run ``run_id`` (optionally to one step)."""
    found = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.LOADED_INPUT):
        event = entry.dagster_event
        if event is None or (step_key is not None and event.step_key != step_key):
            continue
        data = event.event_specific_data
        metadata = {k: v.value for k, v in getattr(data, "metadata", {}).items()}
        if not any(k.startswith(LINEAGE_PREFIX) for k in metadata):
            continue
        found.append(
            RecordedInput(
                run_id=run_id,
                step_key=event.step_key or "",
                input_name=getattr(data, "input_name", ""),
                metadata=metadata,
            )
        )
    return found


def reproduce_input(
    db: LanceDBResource,
    instance: dg.DagsterInstance,
    *,
    run_id: str,
    input_name: str,
    step_key: str | None = None,
    split: str | None = None,
) -> PermutationView:
    """Reopen exactly the view that ``input_name`` received in run ``run_id``: same tables at
    the same Lance versions, same split, columns, format and batch size, so the same rows in
    the same order. ``split`` picks one view of a dict input (``{"split": [...]}``).

    Raises LineageError when the run recorded no such input, or the versions are gone.
    """
    candidates = [
        r
        for r in recorded_inputs(instance, run_id, step_key=step_key)
        if r.input_name == input_name
    ]
    views = [_lineage_views(r.metadata) for r in candidates]
    flat = {name: meta for group in views for name, meta in group.items()}
    if not flat:
        recorded = sorted({r.input_name for r in recorded_inputs(instance, run_id)})
        where = f" of step '{step_key}'" if step_key else ""
        raise LineageError(
            f"run {run_id} recorded no view for input '{input_name}'{where}; recorded inputs: "
            f"{recorded}"
        )
    if split is None and len(flat) > 1:
        raise LineageError(
            f"input '{input_name}' of run {run_id} received several views {sorted(flat)}; pass "
            "split=..."
        )
    meta = flat[split] if split is not None else next(iter(flat.values()))
    return _reopen(db, meta)


def _lineage_views(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``lineage/<field>`` (one view) or ``lineage/<name>/<field>`` (a dict of views)."""
    views: dict[str, dict[str, Any]] = {}
    for key, value in metadata.items():
        if not key.startswith(LINEAGE_PREFIX):
            continue
        rest = key[len(LINEAGE_PREFIX) :]
        name, _, fld = rest.rpartition("/")
        views.setdefault(name, {})[fld] = value
    return views


def _reopen(db: LanceDBResource, meta: dict[str, Any]) -> PermutationView:
    asset = str(meta["asset"])
    if _normalised(str(meta["uri"])) != _normalised(db.uri):
        raise LineageError(
            f"the view of asset '{asset}' was read from '{meta['uri']}', not '{db.uri}'; pass "
            "the LanceDBResource of that database"
        )
    request = ViewRequest(
        split=int(meta["split_index"]),
        columns=_split_columns(meta.get("columns")),
        format=meta.get("format") or None,
        batch_size=int(meta["batch_size"]) if meta.get("batch_size") else None,
    )
    try:
        view = open_view(
            db,
            asset=asset,
            table=str(meta["table"]),
            version=int(meta["table_version"]),
            request=ViewRequest(split=request.split),
            expected=VersionIdentity(
                int(meta["table_version"]),
                pin=str(meta["pin"]) if meta.get("pin") else None,
                stamp=int(meta["stamp"]) if meta.get("stamp") else None,
            ),
        )
    except TableNotFoundError as exc:
        raise LineageError(
            f"cannot reproduce the view of asset '{asset}' ({meta['table']}@"
            f"{meta['table_version']} over {meta['base_table']}@{meta['base_version']}): {exc}"
        ) from exc
    if (view.lineage.base_table, view.lineage.base_version) != (
        str(meta["base_table"]),
        int(meta["base_version"]),
    ):
        raise LineageError(
            f"asset '{asset}': {meta['table']}@{meta['table_version']} now points at "
            f"{view.lineage.base_table}@{view.lineage.base_version}, but the run read "
            f"{meta['base_table']}@{meta['base_version']}"
        )
    if meta.get("offset") is not None or meta.get("limit") is not None:  # a fold's training range
        view = view.restricted(_int_or_none(meta.get("offset")), _int_or_none(meta.get("limit")))
    return refine(view, request, asset=asset)


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(str(value))


def _normalised(uri: str) -> str:
    """A local path made absolute (the recorded one may be relative or absolute)."""
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def _split_columns(value: object) -> list[str] | None:
    if not value:
        return None
    return [c.strip() for c in str(value).split(",")]


def lineage_of(views: list[PermutationView], keys: list[str] | None = None) -> dict[str, Any]:
    """Flat ``lineage/...`` metadata for one view, or for several as
    ``lineage/<key>/...`` (keys: the dict input's keys, default the split names)."""
    if keys is None and len(views) == 1:
        return views[0].lineage_metadata()
    out: dict[str, Any] = {}
    for i, view in enumerate(views):
        name = keys[i] if keys is not None else view.lineage.split or str(view.lineage.split_index)
        out.update(
            {
                k.replace(LINEAGE_PREFIX, f"{LINEAGE_PREFIX}{name}/", 1): v
                for k, v in view.lineage_metadata().items()
            }
        )
    return out
