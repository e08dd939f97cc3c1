"""`definitions.py` loads as a code location and wires what the README promises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import dagster as dg

import perm_assets
from perm_assets import LanceDBIOManager, LanceDBResource

ROOT = Path(__file__).resolve().parent.parent


def _load_definitions() -> dg.Definitions:
    spec = importlib.util.spec_from_file_location(
        "perm_assets_definitions", ROOT / "definitions.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    defs = module.defs
    assert isinstance(defs, dg.Definitions)
    return defs


def test_definitions_wire_the_demo_assets_and_resources() -> None:
    defs = _load_definitions()
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {
        "digits",
        "digits_inked",
        "digits_splits",
        "digits_classifier",
        "digits_folds",
        "digits_cv_model",
        "digits_cv_summary",
        "digit_batches",
        "digit_batches_splits",
        "lance_maintenance",
    }
    assert [s.name for s in defs.schedules or []] == ["refresh_digit_batches"]
    sensors = list(defs.sensors or [])
    assert [s.name for s in sensors] == ["perm_assets_automation"]
    assert sensors[0].default_status == dg.DefaultSensorStatus.RUNNING
    resources = defs.resources or {}
    assert isinstance(resources["lancedb"], LanceDBResource)
    assert isinstance(resources["io_manager"], LanceDBIOManager)
    # The embedded database sits beside definitions.py, whatever the working directory.
    assert Path(resources["lancedb"].uri) == ROOT / "data" / "lancedb"


def test_importing_definitions_touches_no_database() -> None:
    before = (ROOT / "data").exists() and sorted((ROOT / "data").rglob("*"))
    _load_definitions()
    after = (ROOT / "data").exists() and sorted((ROOT / "data").rglob("*"))
    assert before == after


def test_workspace_points_at_definitions() -> None:
    text = (ROOT / "workspace.yaml").read_text()
    assert "relative_path: definitions.py" in text
    assert "location_name: perm_assets" in text


def test_public_api_is_pinned() -> None:
    assert sorted(perm_assets.__all__) == [
        "CalculatedSplit",
        "FoldsComponent",
        "FoldsData",
        "FoldsSpec",
        "GroupKFold",
        "GroupSplit",
        "HashSplit",
        "KFold",
        "LanceDBIOManager",
        "LanceDBResource",
        "PermutationComponent",
        "PermutationData",
        "PermutationSpec",
        "PermutationView",
        "RandomSplit",
        "SequentialSplit",
        "Shuffle",
        "SpecError",
        "StratifiedKFold",
        "StratifiedSplit",
        "TableNotFoundError",
        "TimeSeriesFolds",
        "TimeSplit",
        "ViewLineage",
        "ViewRequest",
        "WriteMode",
        "build_permutation",
        "check_definitions",
        "fold_partitions",
        "folds_asset",
        "open_view",
        "permutation_asset",
        "permutation_data_version",
        "table_name",
    ]
    for name in perm_assets.__all__:
        assert getattr(perm_assets, name) is not None
