"""Definition-time checks of how permutation assets are wired into a code location.

Dagster loads a code location without knowing what perm_assets needs: a permutation asset whose
IO manager is Dagster's default ``fs_io_manager`` passes ``dagster definitions validate`` and
fails in the run with ``FileNotFoundError: .../storage/clicks``; a consumer asking for split
``"validation"`` of a train/val/test permutation fails only when the run loads it. The split
names, the IO manager and the input metadata are all known when the definitions load, so
`check_definitions` checks them then::

    defs = check_definitions(dg.Definitions(assets=[...], resources={...}))

Every problem is listed at once, each naming the asset, the offending value and what is
allowed. Column names are not checked here: the base table's schema is only known in a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import dagster as dg

from perm_assets.errors import SpecError
from perm_assets.folds import FOLDS_KIND
from perm_assets.io_manager import KIND_KEY, LanceDBIOManager
from perm_assets.resources import LanceDBResource
from perm_assets.views import FOLD_SPLITS, ViewRequest

SPLIT_NAMES_META = "perm_assets/split_names"
"""Definition metadata of a permutation or folds asset: its split names, JSON."""
RESOURCE_KEY_META = "perm_assets/resource_key"
"""Definition metadata of a permutation or folds asset: the key of its LanceDBResource."""


def check_definitions(defs: dg.Definitions) -> dg.Definitions:
    """``defs``, after checking that every permutation asset can run and be read as declared.

    Checked: each permutation or folds asset's IO manager (and its source's) is a
    `LanceDBIOManager` and its resource key holds a `LanceDBResource`; every input read from one
    of them has valid view metadata (known keys and formats) and asks for splits and folds it
    defines.

    Raises:
        SpecError: one line per problem found.
    """
    assets = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    resources: Mapping[str, Any] = defs.resources or {}
    producers: dict[dg.AssetKey, dict[str, Any]] = {}
    io_keys: dict[dg.AssetKey, str] = {}
    for asset in assets:
        for key in asset.keys:
            io_keys[key] = asset.get_io_manager_key_for_asset_key(key)
            metadata = asset.metadata_by_key.get(key, {})
            if metadata.get(KIND_KEY) in ("permutation", FOLDS_KIND):
                producers[key] = dict(metadata)
    problems: list[str] = []
    for key, metadata in producers.items():
        problems += _wiring_problems(key, metadata, io_keys, resources)
    for asset in assets:
        for input_def in asset.node_def.input_defs:
            upstream = asset.keys_by_input_name.get(input_def.name)
            if upstream is None or upstream not in producers:
                continue
            consumer = ", ".join(k.to_user_string() for k in asset.keys)
            problems += [
                f"asset '{consumer}', input '{input_def.name}': {problem}"
                for problem in _request_problems(
                    upstream, producers[upstream], input_def.metadata or {}
                )
            ]
    if problems:
        raise SpecError(
            f"{len(problems)} problem(s) in the definitions:\n- " + "\n- ".join(problems)
        )
    return defs


def _wiring_problems(
    key: dg.AssetKey,
    metadata: Mapping[str, Any],
    io_keys: Mapping[dg.AssetKey, str],
    resources: Mapping[str, Any],
) -> list[str]:
    label = key.to_user_string()
    problems = []
    needed = {label: io_keys.get(key, "io_manager")}
    source = metadata.get("perm_assets/source")
    if isinstance(source, str):
        source_key = dg.AssetKey.from_user_string(source)
        if source_key in io_keys:  # an external source (AssetSpec) has no IO manager here
            needed[source] = io_keys[source_key]
    for asset, io_key in needed.items():
        bound = resources.get(io_key)
        if not _is_a(bound, LanceDBIOManager):
            what = "nothing (Dagster's default fs_io_manager)" if bound is None else _name(bound)
            problems.append(
                f"asset '{asset}' (read by permutation asset '{label}') is stored by IO manager "
                f"key '{io_key}', bound to {what}; bind resources={{'{io_key}': "
                "LanceDBIOManager(db=...)}"
            )
    resource_key = str(metadata.get(RESOURCE_KEY_META, "lancedb"))
    bound = resources.get(resource_key)
    if not _is_a(bound, LanceDBResource):
        what = "nothing" if bound is None else _name(bound)
        problems.append(
            f"permutation asset '{label}' needs a LanceDBResource under resource key "
            f"'{resource_key}', bound to {what}; bind resources={{'{resource_key}': "
            "LanceDBResource(uri=...)}"
        )
    return problems


def _request_problems(
    upstream: dg.AssetKey, metadata: Mapping[str, Any], request_metadata: Mapping[str, Any]
) -> list[str]:
    label = upstream.to_user_string()
    try:
        request = ViewRequest.from_metadata(request_metadata, asset=label)
    except SpecError as exc:
        return [str(exc)]
    names = json.loads(str(metadata.get(SPLIT_NAMES_META, "[]")))
    folds = metadata.get(KIND_KEY) == FOLDS_KIND
    allowed: list[str | int] = [*names, *(FOLD_SPLITS if folds else ())]
    wanted = request.split if isinstance(request.split, list) else [request.split]
    problems = []
    for split in wanted:
        if split is None or not names:
            continue
        if isinstance(split, int):
            if not 0 <= split < len(names):
                problems.append(
                    f"split index {split} is out of range for asset '{label}' (splits 0.."
                    f"{len(names) - 1}: {', '.join(names)})"
                )
        elif split not in allowed:
            listed = ", ".join(f"'{s}'" for s in allowed)
            problems.append(f"split '{split}' is not in asset '{label}' (splits: {listed})")
    if request.fold is not None:
        if not folds:
            problems.append(
                f"fold {request.fold!r} was asked of asset '{label}', which is not a folds "
                "asset; drop 'fold' or read a folds_asset"
            )
        elif isinstance(request.fold, str) and request.fold not in names:
            problems.append(f"fold '{request.fold}' is not in asset '{label}' ({', '.join(names)})")
        elif isinstance(request.fold, int) and not 0 <= request.fold < len(names):
            problems.append(
                f"fold {request.fold} is out of range for asset '{label}' (0..{len(names) - 1})"
            )
    return problems


def _is_a(bound: object, cls: type) -> bool:
    """An instance of ``cls``, or ``cls.configure_at_launch()`` (a partial resource whose
    values come with each run's config)."""
    if isinstance(bound, cls):
        return True
    resource_cls = getattr(bound, "resource_cls", None)
    return isinstance(resource_cls, type) and issubclass(resource_cls, cls)


def _name(value: object) -> str:
    return type(value).__name__
