"""The demo pipeline end to end on a temporary LanceDB: digits → subset, split → classifier."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from perm_assets import LanceDBResource
from perm_assets.demo import ASSETS
from perm_assets.views import ViewRequest, open_view, read_arrow
from tests.conftest import Runner


def test_demo_pipeline_trains_on_exactly_the_versions_it_records(
    run: Runner, db: LanceDBResource
) -> None:
    from perm_assets.demo.assets import digits, digits_classifier, digits_inked, digits_splits

    run(ASSETS, selection=[digits, digits_inked, digits_splits, digits_classifier])

    digits = run.metadata("digits")
    assert digits["dagster/row_count"] == 1797
    inked = run.metadata("digits_inked")
    splits = run.metadata("digits_splits")
    assert splits["rows/train"] + splits["rows/test"] == inked["dagster/row_count"]
    assert 0.05 < 1 - inked["dagster/row_count"] / 1797 < 0.10  # the filter drops ~6% faint

    classifier = run.metadata("digits_classifier")
    # A logistic regression on 8x8 digits scores ~0.96; far below would mean wrong rows.
    assert classifier["accuracy"] > 0.9
    assert classifier["train_rows"] == splits["rows/train"]
    assert classifier["test_rows"] == splits["rows/test"]
    for split in ("train", "test"):
        assert classifier[f"{split}/table_version"] == splits["lance/version"]
        assert classifier[f"{split}/base_version"] == digits["lance/version"]
        assert classifier[f"{split}/split"] == split
        assert classifier[f"{split}/columns"] == "image, label"

    # Train and test are disjoint, and together exactly the legible digits.
    ids = {
        split: read_arrow(
            open_view(
                db,
                asset="digits_splits",
                table="digits_splits",
                version=splits["lance/version"],
                request=ViewRequest(split=split, columns=["id", "ink"]),
            )
        )
        for split in ("train", "test")
    }
    train, test = (set(ids[s].column("id").to_pylist()) for s in ("train", "test"))
    assert not train & test
    inks = np.concatenate([ids[s].column("ink").to_numpy() for s in ("train", "test")])
    assert inks.min() >= 4.1
    base = db.open_table("digits", version=digits["lance/version"]).to_arrow()
    legible = base.filter(base.column("ink").to_numpy() >= 4.1).column("id").to_pylist()
    assert train | test == set(legible)


def test_demo_cross_validation_trains_each_fold_without_leakage(run: Runner) -> None:
    from perm_assets.demo.assets import digits, digits_cv_model, digits_cv_summary, digits_folds

    assets = [digits, digits_folds, digits_cv_model, digits_cv_summary]
    result = run(assets, selection=[digits, digits_folds])
    assert all(e.passed for e in result.get_asset_check_evaluations())
    folds = run.metadata("digits_folds")
    total = folds["dagster/row_count"]
    accuracies = {}
    for i in range(5):
        run(assets, selection=[digits_cv_model], partition_key=f"fold_{i}")
        model = run.metadata("digits_cv_model")
        # Each fold trains on the other four and validates on its own: nothing else, no overlap.
        assert model["validation_rows"] == folds[f"rows/fold_{i}"]
        assert (
            model["train_rows"] == folds[f"train_rows/fold_{i}"] == total - model["validation_rows"]
        )
        assert model["train/split"] == f"fold_{i}/train"
        assert model["validation/split"] == f"fold_{i}/validation"
        assert model["train/table_version"] == folds["lance/train_version"]
        accuracies[f"fold_{i}"] = model["accuracy"]
    run(assets, selection=[digits_cv_summary])
    summary = run.metadata("digits_cv_summary")
    assert summary["accuracy_by_fold"] == accuracies
    assert summary["accuracy_mean"] == pytest.approx(float(np.mean(list(accuracies.values()))))
    assert summary["accuracy_mean"] > 0.9


def test_demo_refresh_adds_rows_without_moving_any_and_maintenance_runs(run: Runner) -> None:
    from perm_assets.demo.refresh import digit_batches, digit_batches_splits, lance_maintenance

    assets = [digit_batches, digit_batches_splits, lance_maintenance]
    run(assets, selection=[digit_batches, digit_batches_splits])
    result = run(assets, selection=[digit_batches, digit_batches_splits])
    splits = run.metadata("digit_batches_splits")
    assert splits["dagster/row_count"] == 600
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}
    stable = check["no_row_moved_between_splits"]
    figures: dict[str, Any] = {k: v.value for k, v in stable.metadata.items()}
    assert stable.passed and figures["rows_moved_between_splits"] == 0
    assert figures["keys_compared"] == 300
    assert figures["rows_added/train"] + figures["rows_added/test"] == 300

    run(assets, selection=[lance_maintenance])
    maintenance = run.metadata("lance_maintenance")
    # Two permutation versions, both within keep=3: nothing to retire yet.
    assert maintenance["pins_retired"] == 0
    assert maintenance["pins_kept"] > 0


def test_make_run_runner_prints_a_readable_summary_and_no_warnings(tmp_path) -> None:
    """``make run``'s in-process runner, in a real process on a copy of definitions.py (its
    database lands beside the copy) and a fresh Dagster home."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "definitions.py", tmp_path / "definitions.py")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(root / "deploy" / "dagster.sqlite.yaml", home / "dagster.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "perm_assets.demo.run", str(tmp_path / "definitions.py")],
        env={**__import__("os").environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in ("Warning", "DEBUG", "superseded", "deprecated"):
        assert noise not in output, output
    assert (tmp_path / "data" / "lancedb" / "digits_splits.lance").is_dir()
    lines = done.stdout.splitlines()
    folds = [line for line in lines if line.strip().startswith("digits_cv_model[fold_")]
    assert len(folds) == 5, done.stdout
    for line in folds:
        accuracy = line.split("accuracy ")[1].split(",")[0]
        assert len(accuracy.split(".")[1]) == 3 and float(accuracy) > 0.9, line
    maintenance = next(line for line in lines if line.strip().startswith("lance_maintenance"))
    assert "pins kept" in maintenance and "versions removed" in maintenance, maintenance
