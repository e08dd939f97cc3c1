"""`permutation_asset`: a persisted, versioned permutation of a LanceDB table asset.

No ``from __future__ import annotations`` here: Dagster reads the asset function's annotations
(the per-asset Config class is created at definition time) and needs real objects.
"""

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import dagster as dg
from lancedb.table import Table
from pydantic import Field, ValidationError, create_model

from perm_assets import engines
from perm_assets.balance import LABEL_META
from perm_assets.build import PermutationData
from perm_assets.checks import (
    check_specs,
    folds_checks,
    permutation_checks,
    run_folds_checks,
    run_permutation_checks,
)
from perm_assets.errors import SpecError
from perm_assets.folds import FOLDS_KIND, FoldsData
from perm_assets.io_manager import KIND_KEY, LanceDBIOManager
from perm_assets.resources import LanceDBResource
from perm_assets.specs import (
    Folds,
    FoldsSpec,
    GroupSplit,
    PermutationSpec,
    RandomSplit,
    Shuffle,
    Split,
    StratifiedSplit,
    TimeSeriesFolds,
    explain,
)
from perm_assets.tables import table_name
from perm_assets.wiring import RESOURCE_KEY_META, SPLIT_NAMES_META

FOLDS_K_KEY = "perm_assets/folds_k"
SpecT = TypeVar("SpecT", PermutationSpec, FoldsSpec)
SourceLike = dg.AssetsDefinition | dg.AssetSpec | dg.SourceAsset | dg.AssetKey | str | Sequence[str]


def permutation_asset(
    name: str,
    *,
    source: SourceLike,
    filter: str | None = None,
    split: Split | Mapping[str, Any] | None = None,
    shuffle: Shuffle | Mapping[str, Any] | None = None,
    key_prefix: str | Sequence[str] | None = None,
    group_name: str | None = None,
    description: str | None = None,
    io_manager_key: str = "io_manager",
    resource_key: str = "lancedb",
    automation_condition: dg.AutomationCondition | None = None,
    tags: Mapping[str, str] | None = None,
    retry_policy: dg.RetryPolicy | None = None,
    op_tags: Mapping[str, Any] | None = None,
    pool: str | None = None,
    label: str | None = None,
) -> dg.AssetsDefinition:
    """An asset whose every materialization is a new version of a persisted permutation table.

    The table lists which rows of ``source`` (a LanceDB table asset) are used, in which split,
    in which order; no row data is copied. The spec is validated now: a bad ratio or name fails
    at definition time. ``filter``, the random split's ``seed`` and sizes, and the shuffle's seed
    are also the asset's run config, defaulting to these values, so a run launched from the
    Dagster UI can re-split without a code change.

    Args:
        name: asset name; the permutation table is named after the full key.
        source: the LanceDB table asset whose rows are permuted.
        filter: SQL predicate selecting rows, e.g. ``"label != 0"``.
        split: a `RandomSplit`, `SequentialSplit`, `HashSplit`, `CalculatedSplit` (or a dict
            with ``kind``); None keeps one split of all rows.
        shuffle: a `Shuffle` of the read order within each split.
        io_manager_key: key of the `LanceDBIOManager` that persists it (and the source).
        resource_key: key of the `LanceDBResource` (the builder's memory limit).
        retry_policy: re-run a failed materialization, e.g. ``dg.RetryPolicy(max_retries=3,
            delay=10)`` against object-store hiccups; safe, as each attempt reads the base table
            at the version recorded upstream and writes one new version or none (a folds
            attempt that fails may leave a training-table version that no folds version pins,
            so nothing reads it).
        op_tags: tags of the step, e.g. ``{"dagster-k8s/config": {...}}`` for its pod size.
        pool: concurrency pool of the step (``concurrency: {pools: ...}`` in dagster.yaml), to
            bound how many builds share a machine's memory.
        label: column whose class balance per split each materialization reports (its
            ``perm_assets/splits`` table and ``perm_assets/balance`` chart); stratified splits
            report their own label without it. Rows are not affected.

    Example:
        ``permutation_asset("digits_splits", source=digits, split=RandomSplit(ratios=[0.8,
        0.2], seed=7, split_names=["train", "test"]), shuffle=Shuffle(seed=1))``
    """
    prefix = [key_prefix] if isinstance(key_prefix, str) else list(key_prefix or [])
    key = dg.AssetKey([*prefix, name])
    asset_name = key.to_user_string()
    source_key = _source_key(source, asset=asset_name, io_manager_key=io_manager_key)
    spec = _validated(
        asset_name, PermutationSpec, {"filter": filter, "split": split, "shuffle": shuffle}
    )
    checks = permutation_checks(spec)

    def materialize(
        context: dg.AssetExecutionContext,
        resource: LanceDBResource,
        config: dg.Config,
        source: Table,
    ) -> Iterator[dg.Output[PermutationData] | dg.AssetCheckResult]:
        configured = _apply_config(asset_name, spec, config)
        run_spec = configured.resolve_seeds()
        # A local (out-of-core) build streams from spill files that live as long as the block.
        with engines.build_permutation(
            resource, source, run_spec, asset=asset_name, log=context.log
        ) as data:
            context.log.info(
                f"{asset_name}: {data.rows_by_split()} rows of "
                f"{data.base_table}@{data.base_version}"
            )
            yield _output(data, overrides=_overrides(spec, configured))
        # The IO manager has persisted the output by now: check what was written (read back
        # from the table), after the build's spill files or Ray blocks are released.
        yield from run_permutation_checks(resource, table_name(key), data, checks)

    return _asset(
        key=key,
        source_key=source_key,
        config_cls=_config_class(name, spec),
        materialize=materialize,
        check_specs=check_specs(key, checks),
        kind="permutation",
        description=description or f"Permutation of {source_key.to_user_string()}.",
        group_name=group_name,
        io_manager_key=io_manager_key,
        resource_key=resource_key,
        automation_condition=automation_condition,
        tags=tags,
        retry_policy=retry_policy,
        op_tags=op_tags,
        pool=pool,
        split_names=spec.split_names(),
        extra_metadata=_label_metadata(asset_name, label),
    )


def folds_asset(
    name: str,
    *,
    source: SourceLike,
    folds: Folds | Mapping[str, Any],
    filter: str | None = None,
    shuffle: Shuffle | Mapping[str, Any] | None = None,
    key_prefix: str | Sequence[str] | None = None,
    group_name: str | None = None,
    description: str | None = None,
    io_manager_key: str = "io_manager",
    resource_key: str = "lancedb",
    automation_condition: dg.AutomationCondition | None = None,
    tags: Mapping[str, str] | None = None,
    retry_policy: dg.RetryPolicy | None = None,
    op_tags: Mapping[str, Any] | None = None,
    pool: str | None = None,
    label: str | None = None,
) -> dg.AssetsDefinition:
    """Cross-validation folds of a LanceDB table asset, persisted as permutation tables.

    Every materialization writes the folds table (splits ``fold_0`` ... ``fold_{k-1}``, the
    validation rows of each fold) and its training table (each fold's training rows as one
    range of it, see `perm_assets.folds`), as new Lance versions; no row data is copied. A
    training asset partitioned by `fold_partitions` (the fold names) asks
    ``dg.AssetIn(metadata={"split": "train"})`` or ``{"split": "validation"}`` and receives,
    for partition ``fold_i``, a view over fold ``i``'s training rows or its validation rows.
    Blocking asset checks verify, with every materialization, that no fold trains on its own
    validation rows, that no group spans two folds (group k-fold) and that training precedes
    validation (time series).

    Args:
        name: asset name; the tables are ``<key>`` and ``<key>__train``.
        source: the LanceDB table asset whose rows are folded.
        folds: a `KFold`, `StratifiedKFold`, `GroupKFold` or `TimeSeriesFolds` (or a dict with
            ``kind``).
        filter: SQL predicate applied before folding, e.g. ``"label IS NOT NULL"``.
        shuffle: read order within every validation fold and training set; None: table
            order (time order for time-series folds). A k-fold training set is read fold block
            by fold block, starting with the fold after its own.
        retry_policy, op_tags, pool, label: as for `permutation_asset` (a stratified k-fold
            reports its own label without ``label``).

    Example:
        ``folds_asset("digits_folds", source=digits, folds=StratifiedKFold(k=5, label="label",
        seed=0))``
    """
    prefix = [key_prefix] if isinstance(key_prefix, str) else list(key_prefix or [])
    key = dg.AssetKey([*prefix, name])
    asset_name = key.to_user_string()
    source_key = _source_key(source, asset=asset_name, io_manager_key=io_manager_key)
    spec = _validated(asset_name, FoldsSpec, {"filter": filter, "folds": folds, "shuffle": shuffle})
    checks = folds_checks(spec)

    def materialize(
        context: dg.AssetExecutionContext,
        resource: LanceDBResource,
        config: dg.Config,
        source: Table,
    ) -> Iterator[dg.Output[FoldsData] | dg.AssetCheckResult]:
        configured = _apply_config(asset_name, spec, config)
        run_spec = configured.resolve_seeds()
        with engines.build_folds(
            resource, source, run_spec, asset=asset_name, log=context.log
        ) as data:
            if data.small_classes:
                context.log.warning(
                    f"{asset_name}: classes with fewer rows than k={data.k} cannot be in every "
                    f"fold: {data.small_classes}"
                )
            context.log.info(
                f"{asset_name}: validation rows {data.validation.rows_by_split()}, training rows "
                f"{data.train_rows()} of {data.validation.base_table}@"
                f"{data.validation.base_version}"
            )
            yield _output(data.validation, value=data, overrides=_overrides(spec, configured))
        yield from run_folds_checks(resource, table_name(key), data, checks)  # as above

    asset = _asset(
        key=key,
        source_key=source_key,
        config_cls=_config_class(name, spec),
        materialize=materialize,
        check_specs=check_specs(key, checks),
        kind=FOLDS_KIND,
        description=description
        or f"{spec.folds.k} cross-validation folds of {source_key.to_user_string()}.",
        group_name=group_name,
        io_manager_key=io_manager_key,
        resource_key=resource_key,
        automation_condition=automation_condition,
        tags=tags,
        retry_policy=retry_policy,
        op_tags=op_tags,
        pool=pool,
        split_names=spec.split_names(),
        extra_metadata={FOLDS_K_KEY: spec.folds.k, **_label_metadata(asset_name, label)},
    )
    return asset


def fold_partitions(folds: dg.AssetsDefinition) -> dg.StaticPartitionsDefinition:
    """The partitions of a training asset that runs once per fold of ``folds``.

    Partition ``fold_i`` of the consumer receives fold ``i``'s training or validation rows.
    """
    k = folds.metadata_by_key.get(folds.key, {}).get(FOLDS_K_KEY)
    if not isinstance(k, int):
        raise SpecError(
            f"fold_partitions: asset '{folds.key.to_user_string()}' is not a folds asset; pass "
            "the result of folds_asset(...)"
        )
    return dg.StaticPartitionsDefinition([f"fold_{i}" for i in range(k)])


def _label_metadata(asset: str, label: str | None) -> dict[str, str]:
    """The ``label=`` hint as asset metadata, which the IO manager reads when it reports."""
    if label is None:
        return {}
    if not isinstance(label, str) or not label.strip():
        raise SpecError(f"asset '{asset}': label={label!r} must name a column, e.g. 'label'")
    return {LABEL_META: label}


def _asset(
    *,
    key: dg.AssetKey,
    source_key: dg.AssetKey,
    config_cls: type[dg.Config],
    materialize: Callable[..., Iterator[Any]],
    check_specs: list[dg.AssetCheckSpec],
    kind: str,
    description: str,
    group_name: str | None,
    io_manager_key: str,
    resource_key: str,
    automation_condition: dg.AutomationCondition | None,
    tags: Mapping[str, str] | None,
    retry_policy: dg.RetryPolicy | None,
    op_tags: Mapping[str, Any] | None,
    pool: str | None,
    split_names: list[str],
    extra_metadata: Mapping[str, Any] | None = None,
) -> dg.AssetsDefinition:
    """The Dagster asset around ``materialize``: source input, run config, checks, metadata."""
    label = key.to_user_string()
    description += (
        " The run config (launchpad) overrides the filter, seeds and sizes for one run only; "
        "the next run without config uses these defaults again."
    )

    @dg.asset(
        key=key,
        ins={"source": dg.AssetIn(key=source_key, dagster_type=LANCE_TABLE)},
        io_manager_key=io_manager_key,
        required_resource_keys={resource_key},
        group_name=group_name,
        description=description,
        metadata={
            KIND_KEY: kind,
            "perm_assets/source": source_key.to_user_string(),
            SPLIT_NAMES_META: json.dumps(split_names),
            RESOURCE_KEY_META: resource_key,
            **(extra_metadata or {}),
        },
        kinds={"lancedb"},
        automation_condition=automation_condition,
        tags=dict(tags or {}),
        check_specs=check_specs,
        retry_policy=retry_policy,
        op_tags=dict(op_tags) if op_tags is not None else None,
        pool=pool,
    )
    def _permutation(
        context: dg.AssetExecutionContext,
        config: config_cls,  # pyright: ignore[reportInvalidTypeForm]
        source: Table,
    ) -> Iterator[Any]:
        _require_lancedb_io_manager(context, io_manager_key, asset=label)
        resource = getattr(context.resources, resource_key)
        if not isinstance(resource, LanceDBResource):
            raise TypeError(
                f"asset '{label}' needs a LanceDBResource under resource key '{resource_key}', "
                f"got {type(resource).__name__}"
            )
        yield from materialize(context, resource, config, source)

    return _permutation


def _check_lance_table(_: Any, value: object) -> dg.TypeCheck:
    if isinstance(value, Table):
        return dg.TypeCheck(success=True)
    return dg.TypeCheck(
        success=False,
        description=(
            "a permutation asset reads its source as a lancedb Table, but the source's IO "
            f"manager returned {type(value).__module__}.{type(value).__name__}: store the source "
            "with LanceDBIOManager (resources={'io_manager': LanceDBIOManager(db=...)}); "
            "perm_assets.check_definitions finds this when the definitions load"
        ),
    )


LANCE_TABLE = dg.DagsterType(
    type_check_fn=_check_lance_table,
    name="LanceDBTable",
    typing_type=Table,
    description="A LanceDB table, as LanceDBIOManager loads a table asset.",
)
"""The source input's type: one name per job, so one object for every permutation asset."""


def _require_lancedb_io_manager(
    context: dg.AssetExecutionContext, io_manager_key: str, *, asset: str
) -> None:
    """Fail before building when the output would not land in LanceDB (Dagster's default
    ``fs_io_manager`` would pickle it, and every consumer would fail later)."""
    bound = getattr(context.resources, io_manager_key, None)
    if bound is not None and not isinstance(bound, LanceDBIOManager):
        raise SpecError(
            f"permutation asset '{asset}' must be stored by LanceDBIOManager, but IO manager key "
            f"'{io_manager_key}' is bound to {type(bound).__name__}; bind resources="
            f"{{'{io_manager_key}': LanceDBIOManager(db=...)}}"
        )


def _output(
    data: PermutationData, value: object = None, *, overrides: dict[str, Any]
) -> dg.Output[Any]:
    """The output with its data version, and what the run config changed from the code's
    defaults (so a re-split from the launchpad is visible on the materialization)."""
    metadata = {
        OVERRIDES_META: dg.MetadataValue.json(overrides)
        if overrides
        else "none: the code's defaults",
        ENGINE_META: data.algorithm or "lancedb",
    }
    with warnings.catch_warnings():
        # Output(data_version=...) is the documented way to set it; Dagster flags it beta.
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(
            data if value is None else value,
            data_version=permutation_data_version(data),
            metadata=metadata,
        )


ENGINE_META = "perm_assets/engine"
"""Materialization metadata: the engine (and algorithm version) that computed the rows."""
OVERRIDES_META = "perm_assets/run_config_overrides"
"""Materialization metadata: the spec fields a run's config changed from the code's defaults."""


def _overrides(default: SpecT, configured: SpecT) -> dict[str, Any]:
    """``{"split.seed": {"default": 42, "run": 123}, ...}`` for every field that differs."""
    before = _flat(default.model_dump(mode="json"))
    after = _flat(configured.model_dump(mode="json"))
    return {
        key: {"default": before.get(key), "run": after.get(key)}
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def permutation_data_version(data: PermutationData) -> dg.DataVersion:
    """``<base table>@<base version>/<spec hash>``: equal exactly when the rows are equal.

    The resolved spec (seeds included) and the base version determine the permutation, so an
    identical re-materialization keeps its data version and leaves downstream assets fresh.
    """
    spec_json = data.spec.model_dump_json() if data.spec is not None else ""
    if data.algorithm is not None:  # another engine's rows for the same spec (lancedb: none)
        spec_json += "\n" + data.algorithm
    digest = hashlib.sha256(spec_json.encode()).hexdigest()[:12]
    return dg.DataVersion(f"{data.base_table}@{data.base_version}/{digest}")


def _validated(label: str, model: type[SpecT], fields: dict[str, Any]) -> SpecT:
    try:
        return model.model_validate(fields)
    except SpecError as exc:
        raise SpecError(f"permutation asset '{label}': {_without_spec_name(exc)}") from None
    except ValidationError as exc:
        raise SpecError(f"permutation asset '{label}': {explain(exc)}") from None


def _without_spec_name(exc: SpecError) -> str:
    """A spec's own error without its class name (the factory names the asset instead)."""
    return " | ".join(exc.parts) if exc.parts else str(exc)


def _source_key(source: SourceLike, *, asset: str, io_manager_key: str) -> dg.AssetKey:
    if isinstance(source, dg.AssetsDefinition):
        if len(source.keys) != 1:
            raise SpecError(
                f"permutation asset '{asset}': source has {len(source.keys)} assets "
                f"({[k.to_user_string() for k in source.keys]}); pass the one table asset"
            )
        key = source.key
        if source.metadata_by_key.get(key, {}).get(KIND_KEY) == "permutation":
            raise SpecError(
                f"permutation asset '{asset}': source '{key.to_user_string()}' is a permutation; "
                "the source must be a LanceDB table asset (filter and split the table directly)"
            )
        used = source.get_io_manager_key_for_asset_key(key)
        if used != io_manager_key:
            raise SpecError(
                f"permutation asset '{asset}': source '{key.to_user_string()}' is stored by IO "
                f"manager '{used}', not by the LanceDBIOManager under '{io_manager_key}'; give "
                f"the source io_manager_key='{io_manager_key}' or pass io_manager_key='{used}'"
            )
        return key
    if isinstance(source, dg.AssetSpec | dg.SourceAsset):
        return source.key
    if isinstance(source, dg.AssetKey):
        return source
    if isinstance(source, str):
        return dg.AssetKey.from_user_string(source)
    if isinstance(source, Sequence) and all(isinstance(p, str) for p in source):
        return dg.AssetKey(list(source))
    raise TypeError(
        f"permutation asset '{asset}': source {source!r} is not an asset; pass the table "
        "asset's AssetsDefinition, AssetSpec, AssetKey or key string"
    )


# ------------------------------------------------------------------------ launchpad config
def _config_class(name: str, spec: PermutationSpec | FoldsSpec) -> type[dg.Config]:
    """A `dg.Config` holding the re-split knobs, defaulting to the factory's values.

    Permutations: filter, the split's seed and sizes (or hash weights, or expression), the
    shuffle seed. Folds: filter, the fold seed, the shuffle seed (k fixes the partitions).
    """
    fields: dict[str, Any] = {
        "filter": (
            str | None,
            Field(default=spec.filter, description="SQL predicate selecting rows; null: all."),
        )
    }
    inner = spec.split if isinstance(spec, PermutationSpec) else spec.folds
    if isinstance(inner, RandomSplit | StratifiedSplit | GroupSplit) or (
        isinstance(spec, FoldsSpec) and not isinstance(inner, TimeSeriesFolds)
    ):
        fields["seed"] = (
            int | None,
            Field(default=getattr(inner, "seed", None), description="Seed; null: a fresh one."),
        )
    sizes = {"ratios": "Fraction of rows per split.", "counts": "Rows per split."}
    sizes |= {"weights": "Relative size of each split.", "expression": "SQL split index."}
    sizes |= {"discard_weight": "Relative share of rows left out."}
    for field, description in sizes.items():
        value = getattr(inner, field, None)
        if value is not None and not isinstance(spec, FoldsSpec):
            kind = type(value) if not isinstance(value, list) else list[type(value[0])]
            default = list(value) if isinstance(value, list) else value
            fields[field] = (kind, Field(default=default, description=description))
    if spec.shuffle is not None:
        fields["shuffle_seed"] = (
            int | None,
            Field(default=spec.shuffle.seed, description="Seed of the shuffle; null: fresh."),
        )
    class_name = "".join(part.title() for part in name.split("_")) + "Config"
    return create_model(class_name, __base__=dg.Config, **fields)


def _apply_config(label: str, spec: SpecT, config: dg.Config) -> SpecT:
    """The factory spec with the run's config values, validated again."""
    values = config.model_dump()
    raw = spec.model_dump(exclude_none=True)
    raw["filter"] = values.get("filter")
    inner = "split" if isinstance(spec, PermutationSpec) else "folds"
    if inner in raw:
        knobs = ("seed", "ratios", "counts", "weights", "discard_weight", "expression")
        raw[inner] = {**raw[inner], **{k: values[k] for k in knobs if k in values}}
    if spec.shuffle is not None:
        raw["shuffle"] = {**raw["shuffle"], "seed": values.get("shuffle_seed")}
    try:
        return type(spec).model_validate(raw)
    except SpecError as exc:
        raise SpecError(
            f"permutation asset '{label}', run config {values}: {_without_spec_name(exc)}"
        ) from None
    except ValidationError as exc:
        raise SpecError(
            f"permutation asset '{label}', run config {values}: {explain(exc)}"
        ) from None
