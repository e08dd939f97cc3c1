"""Dagster components: a permutation or folds asset declared in YAML instead of Python.

A ``defs.yaml`` in a dg project's defs folder::

    type: perm_assets.PermutationComponent
    attributes:
      name: clicks_splits
      source: clicks
      filter: "label IS NOT NULL"
      split: {kind: random, ratios: [0.8, 0.2], seed: 42, split_names: [train, test]}
      shuffle: {seed: 7}
      group_name: clicks
      automation_condition: "{{ dg.AutomationCondition.eager() }}"

builds exactly what ``permutation_asset("clicks_splits", source="clicks", ...)`` builds: the
attributes are the factory's keyword arguments and ``split``/``folds``/``shuffle`` are built by
the same spec classes (`perm_assets.specs`). `dg check yaml` (run first by `dg check defs`)
checks the attribute names and the split/folds ``kind`` against the JSON schema, naming the
file, the line and the allowed values; a value the specs reject (ratios summing to 1.1, an
unknown field of a split) fails when the definitions load, with the specs' one-line message,
the file and the line.

The components are not `dg.Resolvable`: Resolvable makes every attribute also accept a
template string, which turns a bad ``split`` into pydantic's "none of the union matched" noise
instead of the specs' message. Only ``automation_condition`` is a template, rendered here.
"""

import warnings
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, ClassVar, Self

import dagster as dg
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
)

from perm_assets.errors import SpecError
from perm_assets.factories import folds_asset, permutation_asset
from perm_assets.specs import (
    FOLDS_KINDS,
    SPLIT_KINDS,
    CalculatedSplit,
    FoldsSpec,
    GroupKFold,
    GroupSplit,
    HashSplit,
    KFold,
    PermutationSpec,
    RandomSplit,
    SequentialSplit,
    Shuffle,
    StratifiedKFold,
    StratifiedSplit,
    TimeSeriesFolds,
    TimeSplit,
    explain,
)

# The kinds are the specs' own (`perm_assets.specs`): a new kind needs no change here.
_SPLIT_KINDS: dict[str, type[BaseModel]] = dict(SPLIT_KINDS)
_FOLDS_KINDS: dict[str, type[BaseModel]] = dict(FOLDS_KINDS)


def _spec_by_kind(field: str, kinds: dict[str, type[BaseModel]]) -> Any:
    """A pydantic validator building ``field`` (a mapping with ``kind``) as the factories do,
    so a mistake gets the factory's one-line message (``split: ratios [0.8, 0.3] sum to 1.1,
    above 1; they must sum to 1``), less the asset name: the YAML file and line name it."""

    def validate(value: object) -> object:
        if value is None or isinstance(value, tuple(kinds.values())):
            return value
        allowed = ", ".join(kinds)
        if not isinstance(value, dict):
            raise ValueError(f"{field} must be a mapping with a `kind` ({allowed}), got {value!r}")
        kind = value.get("kind")
        if kind not in kinds:
            raise ValueError(f"{field}.kind {kind!r} is not a {field} kind; use one of: {allowed}")
        _reject_unknown(field, value, kinds[kind])
        return _through_spec(field, value)

    return PlainValidator(validate)


def _through_spec(field: str, value: object) -> Any:
    """``value`` validated as the ``field`` of the factory's spec (`PermutationSpec` or
    `FoldsSpec`), with the same message (`perm_assets.specs.explain`) when it is wrong."""
    spec_cls = FoldsSpec if field == "folds" else PermutationSpec
    try:
        return getattr(spec_cls.model_validate({field: value}), field)
    except ValidationError as exc:
        raise ValueError(explain(exc)) from None


def _reject_unknown(field: str, value: dict[str, Any], cls: type[BaseModel]) -> None:
    # A misspelt size (`ratio:`) would otherwise surface as "give exactly one of ratios, counts
    # or fixed"; name the stray field and the ones that exist instead.
    unknown = [k for k in value if k not in cls.model_fields]
    if unknown:
        raise ValueError(
            f"{field}.{unknown[0]}: unknown field of {cls.__name__}; its fields are "
            + ", ".join(cls.model_fields)
        )


def _kind_schema(field: str, kinds: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """The JSON schema `dg check yaml` sees: a mapping whose ``kind`` is one of ``kinds``, so a
    wrong kind is reported with the allowed ones; the other fields are left to the spec classes
    (checked when the definitions load), whose messages say more than jsonschema's."""
    return {
        "type": ["object", "null"] if field == "split" else "object",
        "properties": {"kind": {"enum": list(kinds)}},
        "required": ["kind"],
    }


def _shuffle(value: object) -> object:
    if value is None or isinstance(value, Shuffle):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"shuffle must be a mapping such as {{seed: 7}}, got {value!r}")
    _reject_unknown("shuffle", value, Shuffle)
    return _through_spec("shuffle", value)


_SplitField = Annotated[
    RandomSplit
    | SequentialSplit
    | HashSplit
    | CalculatedSplit
    | StratifiedSplit
    | GroupSplit
    | TimeSplit
    | None,
    _spec_by_kind("split", _SPLIT_KINDS),
    WithJsonSchema(_kind_schema("split", _SPLIT_KINDS)),
]
_FoldsField = Annotated[
    KFold | StratifiedKFold | GroupKFold | TimeSeriesFolds,
    _spec_by_kind("folds", _FOLDS_KINDS),
    WithJsonSchema(_kind_schema("folds", _FOLDS_KINDS)),
]
_ShuffleField = Annotated[
    Shuffle | None,
    PlainValidator(_shuffle),
    WithJsonSchema({"type": ["object", "null"]}),
]


def _allowed_names(schema: dict[str, Any]) -> None:
    # jsonschema's own message for an unknown attribute does not say which ones exist;
    # `propertyNames` makes `dg check yaml` print "'sourc' is not one of ['name', ...]".
    schema["propertyNames"] = {"enum": list(schema.get("properties", {}))}


class _PermutationComponentBase(dg.Component, BaseModel):
    """The attributes both components share: the asset's name and place, source and filter."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_allowed_names)

    factory: ClassVar[str]

    name: str = Field(min_length=1, description="Asset name (the last part of its key).")
    source: str = Field(
        min_length=1,
        description="Key of the LanceDB table asset whose rows are used: 'digits', 'raw/clicks'.",
    )
    filter: str | None = Field(
        default=None, description='SQL predicate selecting the rows, e.g. "label IS NOT NULL".'
    )
    shuffle: _ShuffleField = None
    key_prefix: list[str] | None = Field(default=None, description="Prefix of the asset key.")
    group_name: str | None = Field(default=None, description="Dagster asset group.")
    description: str | None = Field(default=None, description="Shown in the Dagster UI.")
    automation_condition: str | None = Field(
        default=None,
        description=(
            "When Dagster materializes the asset by itself, as a template: "
            "'{{ dg.AutomationCondition.eager() }}' (needs an automation sensor running)."
        ),
    )
    tags: dict[str, str] | None = Field(default=None, description="Asset tags.")
    io_manager_key: str = Field(
        default="io_manager", description="Key of the LanceDBIOManager that stores it."
    )
    resource_key: str = Field(default="lancedb", description="Key of the LanceDBResource.")
    pool: str | None = Field(default=None, description="Concurrency pool of the step.")
    label: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Column whose class balance per split the materialization reports (table and "
            "chart); stratified kinds report their own label without it. Rows are unaffected."
        ),
    )

    _condition: dg.AutomationCondition | None = PrivateAttr(default=None)
    _yaml_file: str | None = PrivateAttr(default=None)

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return cls

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext) -> Self:
        if not isinstance(attributes, cls):
            raise SpecError(f"{_yaml_file(context)}: {cls.__name__} needs `attributes`")
        component = attributes
        component._yaml_file = _yaml_file(context)
        if component.automation_condition is not None:
            where = context.resolution_context.at_path("attributes").at_path("automation_condition")
            condition = where.resolve_value(component.automation_condition)
            if not isinstance(condition, dg.AutomationCondition):
                raise SpecError(
                    f"{component._yaml_file}: automation_condition "
                    f"{component.automation_condition!r} is not an AutomationCondition; write "
                    "a template such as '{{ dg.AutomationCondition.eager() }}'"
                )
            component._condition = condition
        return component

    def _common(self) -> dict[str, Any]:
        """The factory's keyword arguments every component passes."""
        return {
            "source": dg.AssetKey.from_user_string(self.source),
            "filter": self.filter,
            "shuffle": self.shuffle,
            "key_prefix": self.key_prefix,
            "group_name": self.group_name,
            "description": self.description,
            "automation_condition": self._condition,
            "tags": self.tags,
            "io_manager_key": self.io_manager_key,
            "resource_key": self.resource_key,
            "pool": self.pool,
            "label": self.label,
        }

    def _named(self, exc: SpecError) -> SpecError:
        """The factory's SpecError (it names the asset) naming the YAML file as well."""
        return SpecError(f"{self._yaml_file}: {exc}" if self._yaml_file else str(exc))


class _Scaffold(BaseModel):
    source: str = Field(
        default="my_table", description="Key of the LanceDB table asset to permute."
    )


class _ComponentScaffolder(dg.Scaffolder[_Scaffold]):
    """`dg scaffold defs perm_assets.PermutationComponent <name> --source <table asset>`: a
    ``defs.yaml`` naming the asset after its folder, with an example split and shuffle."""

    @classmethod
    def get_scaffold_params(cls) -> type[_Scaffold]:
        return _Scaffold

    def scaffold(self, request: dg.ScaffoldRequest[_Scaffold]) -> None:
        source = request.params.source if request.params else _Scaffold().source
        folds = request.type_name.endswith("FoldsComponent")
        body = (
            "  folds: {kind: kfold, k: 5, seed: 0}\n"
            if folds
            else "  split: {kind: random, ratios: [0.8, 0.2], seed: 0,"
            " split_names: [train, test]}\n"
        )
        request.target_path.mkdir(parents=True, exist_ok=True)
        (request.target_path / "defs.yaml").write_text(
            f"type: {request.type_name}\n"
            "attributes:\n"
            f"  name: {request.target_path.name}\n"
            f"  source: {source}\n"
            '  # filter: "label IS NOT NULL"\n'
            f"{body}"
            "  shuffle: {seed: 0}\n"
        )


@dg.scaffold_with(_ComponentScaffolder)
class PermutationComponent(_PermutationComponentBase):
    """A filter, split and/or shuffle of a LanceDB table asset declared in YAML: the component
    form of `perm_assets.permutation_asset` (same specs, checks, run config)."""

    split: _SplitField = Field(
        default=None,
        description=(
            "How rows are divided, by kind (random, sequential, hash, calculated, stratified, "
            "group, time), e.g. {kind: random, ratios: [0.8, 0.2], seed: 42}; null: one split."
        ),
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        try:
            asset = permutation_asset(self.name, split=self.split, **self._common())
        except SpecError as exc:
            raise self._named(exc) from None
        return dg.Definitions(assets=[asset])


@dg.scaffold_with(_ComponentScaffolder)
class FoldsComponent(_PermutationComponentBase):
    """Cross-validation folds of a LanceDB table asset declared in YAML: the component form of
    `perm_assets.folds_asset` (consumers are partitioned by `perm_assets.fold_partitions`)."""

    folds: _FoldsField = Field(
        description=(
            "How rows are divided into folds, by kind (kfold, stratified_kfold, group_kfold, "
            "time_series), e.g. {kind: stratified_kfold, k: 5, label: label, seed: 0}."
        )
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        try:
            asset = folds_asset(self.name, folds=self.folds, **self._common())
        except SpecError as exc:
            raise self._named(exc) from None
        return dg.Definitions(assets=[asset])


def _yaml_file(context: dg.ComponentLoadContext) -> str:
    path = Path(context.path)
    for name in ("defs.yaml", "defs.yml", "component.yaml"):
        if (path / name).exists():
            return str(path / name)
    return str(path)


def yaml_assets(defs_module: ModuleType) -> list[dg.AssetsDefinition]:
    """The assets declared under ``defs_module``, a package with one folder per component (each
    with a ``defs.yaml``), loaded as `dg` loads a project's defs folder."""
    init = Path(defs_module.__file__ or "")
    # The directory the top-level package sits in: what dg calls the project root.
    root = init.parents[len(defs_module.__name__.split("."))]
    tree = dg.ComponentTree.from_module(defs_module=defs_module, project_root=root)
    with warnings.catch_warnings():
        # Dagster 1.13's YAML loader calls pydantic's deprecated parse_obj_as itself.
        warnings.filterwarnings("ignore", "`parse_obj_as` is deprecated", DeprecationWarning)
        # ... and flags its own loaders (of the defs __init__.py, of code references) preview/beta.
        warnings.filterwarnings("ignore", category=dg.PreviewWarning)
        warnings.filterwarnings("ignore", category=dg.BetaWarning)
        defs = tree.build_defs()
    return [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
