"""The demo pipeline: handwritten digits → a filtered subset and a shuffled train/test split
→ a classifier whose materialization records its accuracy and the exact table versions it read.

The data is scikit-learn's bundled copy of the UCI handwritten digits (1,797 8x8 images, no
download at run time). No ``from __future__ import annotations``: Dagster reads the asset
functions' annotations as objects.
"""

import time
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
from lancedb.permutation import Permutation

from perm_assets import (
    RandomSplit,
    Shuffle,
    StratifiedKFold,
    fold_partitions,
    folds_asset,
    permutation_asset,
)
from perm_assets.components import yaml_assets
from perm_assets.demo import defs as demo_defs
from perm_assets.views import PermutationView, iter_arrow

GROUP = "digits"
CV_GROUP = "digits_cv"
FOLDS = 5
PIXELS = 64
# Mean pixel intensity (0-16) below which an image is too faint to train on: ~5% of the set.
INK_FILTER = "ink >= 4.1"


@dg.asset(group_name=GROUP, kinds={"lancedb"})
def digits() -> pa.Table:
    """The 1,797 handwritten digits: ``image`` (64 float32 pixels, a vector column), ``label``
    (0-9), ``ink`` (mean pixel intensity) and a stable ``id``."""
    from sklearn.datasets import load_digits

    features, target = load_digits(return_X_y=True)
    pixels = np.ascontiguousarray(features, dtype=np.float32)
    images = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), PIXELS)
    return pa.table(
        {
            "id": pa.array(np.arange(len(pixels), dtype=np.int64)),
            "image": images,
            "label": pa.array(np.asarray(target, dtype=np.int64)),
            "ink": pa.array(pixels.mean(axis=1)),
        }
    )


# The assets declared in YAML, one folder each under perm_assets/demo/defs (dg components, e.g.
# defs/digits_inked/defs.yaml: the legible digits in table order, one split).
YAML_ASSETS = yaml_assets(demo_defs)
digits_inked = next(a for a in YAML_ASSETS if a.key == dg.AssetKey("digits_inked"))

digits_splits = permutation_asset(
    "digits_splits",
    source=digits,
    filter=INK_FILTER,
    split=RandomSplit(ratios=[0.8, 0.2], seed=42, split_names=["train", "test"]),
    shuffle=Shuffle(seed=7),
    group_name=GROUP,
    label="label",  # class balance per split in the UI (the random split itself ignores it)
    description="Legible digits, 80/20 train/test at random, training order shuffled.",
)


@dg.asset(
    group_name=GROUP,
    ins={
        "splits": dg.AssetIn(
            key=digits_splits.key,
            metadata={"split": ["train", "test"], "columns": ["image", "label"], "format": "arrow"},
        )
    },
)
def digits_classifier(
    context: dg.AssetExecutionContext, splits: dict[str, Permutation]
) -> dg.MaterializeResult:
    """A logistic-regression digit classifier trained on ``train`` and scored on ``test``."""
    return _fit_and_score(context, splits, train="train", test="test")


digits_folds = folds_asset(
    "digits_folds",
    source=digits,
    filter=INK_FILTER,
    folds=StratifiedKFold(k=FOLDS, label="label", seed=0),
    shuffle=Shuffle(seed=1),
    group_name=CV_GROUP,
    description=f"Legible digits in {FOLDS} stratified folds (each class within 1 row of 1/5).",
)


@dg.asset(
    group_name=CV_GROUP,
    partitions_def=fold_partitions(digits_folds),
    ins={
        "fold": dg.AssetIn(
            key=digits_folds.key,
            metadata={
                "split": ["train", "validation"],
                "columns": ["image", "label"],
                "format": "arrow",
            },
        )
    },
)
def digits_cv_model(
    context: dg.AssetExecutionContext, fold: dict[str, Permutation]
) -> dg.MaterializeResult:
    """The classifier trained on 4 folds and scored on the fifth: one partition per fold."""
    return _fit_and_score(context, fold, train="train", test="validation")


@dg.asset(group_name=CV_GROUP, deps=[digits_cv_model])
def digits_cv_summary(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Mean and spread of the per-fold accuracies, read from the fold models' materializations."""
    accuracies: dict[str, float] = {}
    for fold in fold_partitions(digits_folds).get_partition_keys():
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=digits_cv_model.key, asset_partitions=[fold]), limit=1
        ).records
        mat = records[0].asset_materialization if records else None
        if mat is None or "accuracy" not in mat.metadata:
            raise ValueError(
                f"asset 'digits_cv_summary': fold '{fold}' of 'digits_cv_model' has no "
                "materialization yet; materialize every partition of digits_cv_model first"
            )
        accuracies[fold] = float(mat.metadata["accuracy"].value)  # type: ignore[arg-type]
    values = np.array(list(accuracies.values()))
    context.log.info(f"cross-validated accuracy {values.mean():.4f} +/- {values.std():.4f}")
    return dg.MaterializeResult(
        metadata={
            "accuracy_mean": float(values.mean()),
            "accuracy_std": float(values.std()),
            "accuracy_min": float(values.min()),
            "accuracy_max": float(values.max()),
            "accuracy_by_fold": dg.MetadataValue.json(accuracies),
        }
    )


def _fit_and_score(
    context: dg.AssetExecutionContext, views: dict[str, Permutation], *, train: str, test: str
) -> dg.MaterializeResult:
    """Fit a logistic regression on ``views[train]``, score it on ``views[test]``, and record
    the accuracy with the exact tables, versions, splits and columns that were read."""
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    x_train, y_train = _features(views[train])
    x_test, y_test = _features(views[test])
    model = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    context.log.info(f"accuracy {accuracy:.4f} on {len(y_test)} {test} rows")
    metadata: dict[str, Any] = {
        "accuracy": accuracy,
        "train_rows": len(y_train),
        f"{test}_rows": len(y_test),
        "seconds": round(time.perf_counter() - started, 3),
    }
    for name, view in views.items():
        assert isinstance(view, PermutationView)
        metadata.update(
            {k.replace("lineage/", f"{name}/"): v for k, v in view.lineage_metadata().items()}
        )
    return dg.MaterializeResult(metadata=metadata)


def _features(view: Permutation) -> tuple[np.ndarray, np.ndarray]:
    """Images as an (n, 64) array scaled to [0, 1] and labels, read batch by batch."""
    images, labels = [], []
    for batch in iter_arrow(view, 1024):
        images.append(batch.column("image").flatten().to_numpy().reshape(-1, PIXELS))
        labels.append(batch.column("label").to_numpy())
    return np.concatenate(images) / 16.0, np.concatenate(labels)


ASSETS = [
    digits,
    *YAML_ASSETS,
    digits_splits,
    digits_classifier,
    digits_folds,
    digits_cv_model,
    digits_cv_summary,
]
