"""What a user declares: which rows (filter), how they are split, and in what order (shuffle).

Specs are frozen pydantic models, validated when they are built, so a bad ratio or a duplicate
split name fails at definition time, before any run. Everything is JSON-serialisable: the resolved
spec (random seeds filled in) is recorded with every materialization.
"""

from __future__ import annotations

import math
import secrets
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from perm_assets.errors import SpecError

# Tolerance for ratios that are meant to sum to 1 but were written as e.g. [0.7, 0.2, 0.1].
_RATIO_TOLERANCE = 1e-9
_MAX_SEED = 2**63 - 1


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        # pydantic's ValidationError is ~10 lines per problem with links; a spec mistake gets
        # one line naming the spec, the field, the value and what is allowed. A factory names
        # the asset too (`perm_assets.factories`). pydantic calls this for nested specs as well,
        # so an inner spec's SpecError reaches the outer one as a value error (see `explain`).
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = SpecError(f"{type(self).__name__}: {explain(exc)}")
            error.parts = problems(exc)
            raise error from None


# Tags of the discriminated unions: pydantic puts them in an error's location ("split.random").
_UNION_PARENTS = ("split", "folds")


def explain(exc: ValidationError) -> str:
    """pydantic's errors as one line, e.g. ``split.ratios [0.8, 0.3] sum to 1.1, above 1;
    they must sum to 1``; several problems joined by `` | ``."""
    return " | ".join(problems(exc))


def problems(exc: ValidationError) -> list[str]:
    """One ``field value: message`` entry per problem, nested specs' fields in full."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if len(loc) >= 2 and loc[-2] in _UNION_PARENTS:
            loc = loc[:-1]  # the union's tag, not a field
        where = ".".join(loc)
        nested = (err.get("ctx") or {}).get("error")
        if isinstance(nested, SpecError) and nested.parts:
            # A nested spec's own SpecError: its parts already name their fields.
            parts += [f"{where}.{part}" if where else part for part in nested.parts]
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        shown = f" {err.get('input')!r}"
        if err["type"] in ("model_type", "missing", "value_error", "extra_forbidden"):
            shown = ""  # our validators name the value themselves
        parts.append(f"{where}{shown}: {message}" if where else message)
    return parts


class _Names(_Spec):
    split_names: list[str] | None = Field(
        default=None,
        description=(
            "One unique, non-empty name per split, e.g. ['train', 'test']. Defaults to "
            "'split_0', 'split_1', ... Downstream assets ask for splits by name or index."
        ),
    )

    @property
    def num_splits(self) -> int:
        raise NotImplementedError

    def names(self) -> list[str]:
        """The split names, defaulted to ``split_<i>``."""
        return list(self.split_names or [f"split_{i}" for i in range(self.num_splits)])

    @model_validator(mode="after")
    def _check_names(self) -> Self:
        if self.split_names is None:
            return self
        if len(self.split_names) != self.num_splits:
            raise ValueError(
                f"split_names {self.split_names} has {len(self.split_names)} names but the split "
                f"makes {self.num_splits} splits; give exactly one name per split"
            )
        dupes = sorted({n for n in self.split_names if self.split_names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"split_names {self.split_names} repeats {dupes}; names must be unique"
            )
        if any(not n.strip() for n in self.split_names):
            raise ValueError(f"split_names {self.split_names} has an empty name")
        return self


class _Sized(_Names):
    """Sizes given as exactly one of ratios, counts or fixed."""

    ratios: list[float] | None = Field(
        default=None,
        description=(
            "Fraction of the rows in each split, e.g. [0.8, 0.2]: the first split gets 80% of "
            "the rows. Each in (0, 1]; they must sum to 1 unless allow_discard is set."
        ),
    )
    counts: list[int] | None = Field(
        default=None,
        description="Exact rows in each split, e.g. [1000, 200]; the rest are left out.",
    )
    fixed: int | None = Field(
        default=None,
        description=(
            "Number of equal splits (>= 2). Sizes differ by at most one row and every row is "
            "kept (lancedb's own `fixed` drops the remainder; this is sent as equal ratios)."
        ),
    )
    allow_discard: bool = Field(
        default=False,
        description=(
            "Accept ratios that sum below 1, i.e. deliberately leave a random share of the rows "
            "out of every split. Off by default so that no rows are dropped silently."
        ),
    )

    @property
    def num_splits(self) -> int:
        if self.ratios is not None:
            return len(self.ratios)
        if self.counts is not None:
            return len(self.counts)
        assert self.fixed is not None  # guaranteed by _check_sizes
        return self.fixed

    @model_validator(mode="before")
    @classmethod
    def _check_sizes(cls, data: object) -> object:
        if isinstance(data, dict):
            given = [k for k in ("ratios", "counts", "fixed") if data.get(k) is not None]
            if len(given) != 1:
                raise ValueError(
                    f"give exactly one of ratios, counts or fixed (got {given or 'none'}); "
                    "e.g. ratios=[0.8, 0.2]"
                )
        return data

    @model_validator(mode="after")
    def _check_values(self) -> Self:
        if self.ratios is not None:
            check_ratios(self.ratios, allow_discard=self.allow_discard)
        if self.counts is not None and (not self.counts or any(c < 1 for c in self.counts)):
            raise ValueError(f"counts {self.counts} must be one or more whole numbers >= 1")
        if self.fixed is not None and self.fixed < 2:
            raise ValueError(f"fixed={self.fixed} makes fewer than 2 splits; use fixed >= 2")
        return self

    def builder_sizes(self) -> tuple[list[float] | None, list[int] | None]:
        """``(ratios, counts)`` for lancedb's builder; ``fixed`` is sent as equal ratios."""
        if self.counts is not None:
            return None, list(self.counts)
        if self.ratios is not None:
            return list(self.ratios), None
        assert self.fixed is not None
        return [1.0 / self.fixed] * self.fixed, None


def check_ratios(ratios: list[float], *, allow_discard: bool) -> None:
    """Reject empty, NaN, non-positive or over-full ratios, and under-full ones unless allowed."""
    if not ratios:
        raise ValueError("ratios is empty; give one fraction per split, e.g. [0.8, 0.2]")
    bad = [r for r in ratios if not math.isfinite(r) or r <= 0 or r > 1]
    if bad:
        raise ValueError(f"ratios {ratios} has {bad}; every ratio must be a number in (0, 1]")
    total = math.fsum(ratios)
    if total > 1 + _RATIO_TOLERANCE:
        raise ValueError(f"ratios {ratios} sum to {total:g}, above 1; they must sum to 1")
    if total < 1 - _RATIO_TOLERANCE and not allow_discard:
        raise ValueError(
            f"ratios {ratios} sum to {total:g}, below 1, so {1 - total:.0%} of the rows would be "
            "dropped silently; make them sum to 1 or set allow_discard=True"
        )


class RandomSplit(_Sized):
    """Rows assigned to splits at random: ``ratios=[0.8, 0.2]`` puts 80% of rows in the first."""

    kind: Literal["random"] = "random"
    seed: int | None = Field(
        default=None,
        ge=0,
        le=_MAX_SEED,
        description=(
            "Seed of the assignment. None draws a fresh seed on every materialization; the seed "
            "used is recorded in the materialization's spec, so any run can be reproduced."
        ),
    )
    clump_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Assign (and, with a shuffle, order) rows in contiguous clumps of this many rows: "
            "fewer, larger reads at the cost of randomness. None: row by row."
        ),
    )


class SequentialSplit(_Sized):
    """Rows assigned in table order: ``ratios=[0.7, 0.3]`` puts the first 70% in split 0."""

    kind: Literal["sequential"] = "sequential"


class HashSplit(_Names):
    """Rows assigned by a hash of ``columns``: a row keeps its split when rows are added.

    ``weights=[8, 2]`` with ``discard_weight=0`` sends about 80% of rows to split 0; with
    ``discard_weight=10`` about half of all rows are left out of every split.
    """

    kind: Literal["hash"] = "hash"
    columns: list[str] = Field(
        min_length=1, description="Columns whose values are hashed, e.g. ['user_id']."
    )
    weights: list[int] = Field(
        min_length=1, description="Relative size of each split, e.g. [8, 1, 1]; each >= 1."
    )
    discard_weight: int = Field(
        default=0,
        ge=0,
        description="Relative share of rows left out of every split (0 keeps all rows).",
    )

    @property
    def num_splits(self) -> int:
        return len(self.weights)

    @model_validator(mode="after")
    def _check_weights(self) -> Self:
        if any(w < 1 for w in self.weights):
            raise ValueError(f"weights {self.weights} must all be whole numbers >= 1")
        return self


class CalculatedSplit(_Names):
    """Rows assigned by a SQL expression returning the split index, e.g. ``"year % 5"``.

    ``num_splits`` (or ``split_names``) says how many splits the expression makes; a row whose
    value falls outside ``0 .. num_splits - 1`` fails the materialization instead of being
    kept in a split nobody asked for.
    """

    kind: Literal["calculated"] = "calculated"
    expression: str = Field(
        min_length=1, description="SQL expression giving each row's split index, e.g. 'id % 3'."
    )
    splits: int | None = Field(
        default=None,
        ge=1,
        description="Number of splits the expression makes; defaults to len(split_names).",
    )

    @property
    def num_splits(self) -> int:
        if self.splits is not None:
            return self.splits
        return len(self.split_names or [])

    @model_validator(mode="before")
    @classmethod
    def _need_count(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("splits") is None and not data.get("split_names"):
            raise ValueError(
                "a calculated split needs `splits` (how many) or `split_names`, so that values "
                "outside the range can be caught"
            )
        return data

    @model_validator(mode="after")
    def _check_expression(self) -> Self:
        check_sql_fragment(self.expression, what="expression")
        return self


class _Ratios(_Names):
    """Sizes as ratios that sum to 1: a leakage-safe split keeps every filtered row."""

    ratios: list[float] = Field(
        min_length=2,
        description="Fraction of the rows in each split, e.g. [0.8, 0.2]; they must sum to 1.",
    )

    @property
    def num_splits(self) -> int:
        return len(self.ratios)

    @model_validator(mode="after")
    def _check_ratios(self) -> Self:
        check_ratios(self.ratios, allow_discard=False)
        return self


class StratifiedSplit(_Ratios):
    """Random split that keeps each class's proportions: with ``ratios=[0.8, 0.2]`` a class of
    101 rows puts 80 or 81 rows in the first split (every class within 1 row of its share)."""

    kind: Literal["stratified"] = "stratified"
    label: str = Field(min_length=1, description="Column holding the class label, e.g. 'label'.")
    seed: int | None = Field(
        default=None, ge=0, le=_MAX_SEED, description="Seed; None draws one per run (recorded)."
    )


class GroupSplit(_Ratios):
    """Random split in which all rows sharing ``group`` (a patient, user, session) land in one
    split; sizes are as close to ``ratios`` as the group sizes allow. With ``label`` it also
    keeps class proportions as far as the groups allow (a stratified group split)."""

    kind: Literal["group"] = "group"
    group: str = Field(min_length=1, description="Column holding the group key, e.g. 'user_id'.")
    label: str | None = Field(
        default=None, description="Class label column to stratify on as well; None: don't."
    )
    seed: int | None = Field(
        default=None, ge=0, le=_MAX_SEED, description="Seed; None draws one per run (recorded)."
    )


class TimeSplit(_Ratios):
    """Split by an orderable column: every row of split ``i`` is earlier than every row of split
    ``i + 1`` (``ratios=[0.8, 0.2]``: the oldest 80% train, the newest 20% test). Rows with equal
    values never straddle a boundary, so sizes can be off by the size of a tie."""

    kind: Literal["time"] = "time"
    column: str = Field(min_length=1, description="Orderable column, e.g. 'event_time'.")


Split = Annotated[
    RandomSplit
    | SequentialSplit
    | HashSplit
    | CalculatedSplit
    | StratifiedSplit
    | GroupSplit
    | TimeSplit,
    Field(discriminator="kind"),
]
SPLIT_KINDS: dict[str, type[_Spec]] = {
    cls.model_fields["kind"].default: cls for cls in get_args(get_args(Split)[0])
}
"""Each split kind's ``kind`` value and spec class, from the `Split` union."""
CUSTOM_SPLITS = (StratifiedSplit, GroupSplit, TimeSplit)
"""Split kinds lancedb's builder lacks: assigned in numpy over the needed columns only."""


class Shuffle(_Spec):
    """The order rows are read in, within each split."""

    seed: int | None = Field(
        default=None,
        ge=0,
        le=_MAX_SEED,
        description="Seed of the shuffle; None draws a fresh one per materialization (recorded).",
    )
    clump_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Shuffle contiguous clumps of this many rows instead of single rows: much faster "
            "reads, less random order. lancedb 0.40 only clumps when the random split has the "
            "same clump_size."
        ),
    )


class PermutationSpec(_Spec):
    """Which rows of a table (filter), split how (split), in what order (shuffle)."""

    filter: str | None = Field(
        default=None,
        description='SQL predicate selecting the rows, e.g. "label != 0 AND quality > 0.5".',
    )
    split: Split | None = Field(
        default=None, description="How rows are divided; None keeps one split of all rows."
    )
    shuffle: Shuffle | None = Field(
        default=None, description="Row order; None keeps table order (or the split's order)."
    )

    @model_validator(mode="after")
    def _check_filter(self) -> Self:
        if self.filter is not None:
            check_sql_fragment(self.filter, what="filter")
        return self

    def split_names(self) -> list[str]:
        """Name of every split in index order (``['split_0']`` when there is no split)."""
        return self.split.names() if self.split is not None else ["split_0"]

    def resolve_seeds(self) -> PermutationSpec:
        """This spec with every unset random seed drawn now, so the result can be reproduced."""
        update: dict[str, object] = {}
        if isinstance(self.split, RandomSplit | StratifiedSplit | GroupSplit) and (
            self.split.seed is None
        ):
            update["split"] = self.split.model_copy(update={"seed": _draw_seed()})
        if self.shuffle is not None and self.shuffle.seed is None:
            update["shuffle"] = self.shuffle.model_copy(update={"seed": _draw_seed()})
        return self.model_copy(update=update) if update else self


class _Folds(_Spec):
    k: int = Field(
        ge=2, description="Number of folds (>= 2); each row is validated in exactly one fold."
    )

    def names(self) -> list[str]:
        """``fold_0`` ... ``fold_{k-1}``: the validation splits, also the partition keys."""
        return [f"fold_{i}" for i in range(self.k)]


class _RandomFolds(_Folds):
    shuffle: bool = Field(
        default=True,
        description=(
            "Assign rows to folds at random (seeded). False: contiguous folds in table order, as "
            "scikit-learn's KFold(shuffle=False)."
        ),
    )
    seed: int | None = Field(
        default=None, ge=0, le=_MAX_SEED, description="Seed; None draws one per run (recorded)."
    )


class KFold(_RandomFolds):
    """k folds whose sizes differ by at most one row (scikit-learn's KFold)."""

    kind: Literal["kfold"] = "kfold"


class StratifiedKFold(_RandomFolds):
    """k folds in which each class's count is within 1 of its exact share (scikit-learn's
    StratifiedKFold): 103 rows of a class over 5 folds give 20 or 21 per fold."""

    kind: Literal["stratified_kfold"] = "stratified_kfold"
    label: str = Field(min_length=1, description="Column holding the class label.")
    on_small_class: Literal["warn", "error"] = Field(
        default="warn",
        description=(
            "A class with fewer than k rows cannot be in every fold: 'warn' (scikit-learn's "
            "choice, logged and recorded) or 'error' (fail the run)."
        ),
    )


class GroupKFold(_RandomFolds):
    """k folds in which every group (patient, user, ...) is validated in exactly one fold; fold
    sizes as balanced as the group sizes allow. Fewer groups than k is an error."""

    kind: Literal["group_kfold"] = "group_kfold"
    group: str = Field(min_length=1, description="Column holding the group key.")


class TimeSeriesFolds(_Folds):
    """Expanding-window folds over an orderable column (scikit-learn's TimeSeriesSplit): fold
    ``i`` trains on everything before its validation block (minus ``gap`` rows), so training
    rows always precede validation rows and each training set contains the previous one."""

    kind: Literal["time_series"] = "time_series"
    column: str = Field(min_length=1, description="Orderable column, e.g. 'event_time'.")
    gap: int = Field(default=0, ge=0, description="Rows left out between train and validation.")
    test_size: int | None = Field(
        default=None, ge=1, description="Rows per validation block; None: n // (k + 1)."
    )
    max_train_size: int | None = Field(
        default=None, ge=1, description="Keep only the latest this many training rows; None: all."
    )


Folds = Annotated[
    KFold | StratifiedKFold | GroupKFold | TimeSeriesFolds, Field(discriminator="kind")
]
FOLDS_KINDS: dict[str, type[_Spec]] = {
    cls.model_fields["kind"].default: cls for cls in get_args(get_args(Folds)[0])
}
"""Each folds kind's ``kind`` value and spec class, from the `Folds` union."""


class FoldsSpec(_Spec):
    """Cross-validation folds of the rows a filter selects, and the order rows are read in."""

    filter: str | None = Field(
        default=None, description="SQL predicate selecting the rows, applied before folding."
    )
    folds: Folds = Field(description="How rows are divided into folds.")
    shuffle: Shuffle | None = Field(
        default=None,
        description=(
            "Read order within every validation fold and training set; None: table order. "
            "A k-fold training set is read fold block by fold block, starting with the fold "
            "after its own (each block in this order)."
        ),
    )

    @model_validator(mode="after")
    def _check_filter(self) -> Self:
        if self.filter is not None:
            check_sql_fragment(self.filter, what="filter")
        return self

    def split_names(self) -> list[str]:
        """The validation folds: ``fold_0`` ... ``fold_{k-1}``."""
        return self.folds.names()

    def resolve_seeds(self) -> FoldsSpec:
        """This spec with every unset random seed drawn now."""
        update: dict[str, object] = {}
        folds = self.folds
        if isinstance(folds, _RandomFolds) and folds.shuffle and folds.seed is None:
            update["folds"] = folds.model_copy(update={"seed": _draw_seed()})
        if self.shuffle is not None and self.shuffle.seed is None:
            update["shuffle"] = self.shuffle.model_copy(update={"seed": _draw_seed()})
        return self.model_copy(update=update) if update else self


def key_columns(
    part: Split | KFold | StratifiedKFold | GroupKFold | TimeSeriesFolds | None,
) -> list[str]:
    """The column a split or folds kind stratifies, groups or orders by (none for the rest):
    what its assignment and its checks read besides row ids."""
    if isinstance(part, StratifiedSplit | StratifiedKFold):
        return [part.label]
    if isinstance(part, GroupSplit | GroupKFold):
        return [part.group]
    if isinstance(part, TimeSplit | TimeSeriesFolds):
        return [part.column]
    return []


def _draw_seed() -> int:
    return secrets.randbelow(2**31)


def check_sql_fragment(sql: str, *, what: str) -> None:
    """Reject what lancedb would silently cut short: a ``;``, a comment, unbalanced
    parentheses (outside quotes). lancedb parses the first expression and ignores the rest, so
    the whole text is also handed to it in parentheses at run time (`perm_assets.tables.where`),
    which turns any trailing text (``LIMIT 1``, ``ORDER BY id``, a typo) into a parse error."""
    if not sql.strip():
        raise ValueError(f"{what} is empty; give a SQL expression or leave it unset")
    quote: str | None = None
    depth = 0
    for i, char in enumerate(sql):
        if quote:
            if char == quote:
                quote = None
            continue
        if char in ("'", '"', "`"):
            quote = char
        elif char == ";":
            raise ValueError(
                f"{what} {sql!r} contains ';': only a single SQL expression is allowed "
                "(lancedb would silently ignore everything after the ';')"
            )
        elif sql.startswith(("--", "/*"), i):
            raise ValueError(
                f"{what} {sql!r} contains an SQL comment ({sql[i : i + 2]}); write the expression "
                "alone (lancedb would drop what the comment hides without a word)"
            )
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(
                    f"{what} {sql!r} closes a parenthesis it never opened (at character {i}); "
                    "give one expression with balanced parentheses"
                )
    if quote:
        raise ValueError(f"{what} {sql!r} leaves a {quote} quote open")
    if depth:
        raise ValueError(f"{what} {sql!r} leaves {depth} parenthesis(es) open")
