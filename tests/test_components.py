"""PermutationComponent / FoldsComponent: assets declared in YAML, checked by the specs, and
the repository as a dg project (`dg check defs`, `dg list defs`, `dg scaffold defs` in real
subprocesses, ~6 s each)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster.components.core.component_tree import ComponentTreeException

from perm_assets import (
    PermutationComponent,
    RandomSplit,
    Shuffle,
    folds_asset,
    permutation_asset,
)
from perm_assets.components import yaml_assets
from perm_assets.specs import KFold
from tests.conftest import Runner, row_ids, table_asset
from tests.processes import REPO, child_env

DG = Path(sys.executable).parent / "dg"
DIGITS_INKED_YAML = REPO / "perm_assets" / "demo" / "defs" / "digits_inked" / "defs.yaml"


@pytest.fixture
def defs_package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An importable, uniquely named package ``<name>.defs`` in tmp_path: (module, folder)."""
    name = f"yamlpkg_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name / "defs"
    folder.mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        yield f"{name}.defs", folder
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.split(".")[0] == name]:
            del sys.modules[module]


def _write(folder: Path, asset: str, body: str) -> Path:
    (folder / asset).mkdir()
    path = folder / asset / "defs.yaml"
    path.write_text(body)
    return path


def _load(module: str) -> list[dg.AssetsDefinition]:
    return yaml_assets(importlib.import_module(module))


def test_yaml_assets_build_the_same_rows_as_the_factories(
    defs_package: tuple[str, Path], run: Runner
) -> None:
    module, folder = defs_package
    _write(
        folder,
        "rows_splits",
        "type: perm_assets.PermutationComponent\n"
        "attributes:\n"
        "  name: rows_splits\n"
        "  source: rows\n"
        '  filter: "label != 0"\n'
        "  split: {kind: random, ratios: [0.7, 0.3], seed: 3, split_names: [train, test]}\n"
        "  shuffle: {seed: 5}\n"
        "  group_name: yaml\n"
        "  automation_condition: '{{ dg.AutomationCondition.eager() }}'\n",
    )
    _write(
        folder,
        "rows_folds",
        "type: perm_assets.FoldsComponent\n"
        "attributes:\n"
        "  name: rows_folds\n"
        "  source: rows\n"
        "  folds: {kind: kfold, k: 3, seed: 1}\n"
        "  label: label\n",
    )
    by_key = {a.key.to_user_string(): a for a in _load(module)}
    assert set(by_key) == {"rows_splits", "rows_folds"}
    splits, folds = by_key["rows_splits"], by_key["rows_folds"]
    assert splits.group_names_by_key[splits.key] == "yaml"
    assert splits.automation_conditions_by_key[splits.key] == dg.AutomationCondition.eager()
    assert dg.AssetKey("rows") in splits.dependency_keys

    rows = table_asset("rows", 500)
    by_code = permutation_asset(
        "code_splits",
        source=rows,
        filter="label != 0",
        split=RandomSplit(ratios=[0.7, 0.3], seed=3, split_names=["train", "test"]),
        shuffle=Shuffle(seed=5),
    )
    code_folds = folds_asset("code_folds", source=rows, folds=KFold(k=3, seed=1))
    run([rows, splits, folds, by_code, code_folds])

    # Same spec and base version: the same data version, and the same rows in the same order.
    assert run.data_version("rows_splits") == run.data_version("code_splits")
    assert run.data_version("rows_folds") == run.data_version("code_folds")
    db = run.resources["lancedb"]
    yaml_rows = db.open_table("rows_splits").to_arrow()
    code_rows = db.open_table("code_splits").to_arrow()
    for split in (0, 1):
        assert row_ids(yaml_rows, split) == row_ids(code_rows, split)
    assert len(row_ids(yaml_rows)) == 450  # label != 0 drops every tenth of 500 rows
    assert run.metadata("rows_folds")["perm_assets/k"] == 3
    # The YAML label hint: class counts per fold (label 0..9 of make_rows), rows unchanged.
    folds_table = run.metadata("rows_folds")["perm_assets/folds"]
    assert sum(r.data["label=3"] for r in folds_table.records) == 50
    assert "label=3" not in {
        c.name for c in run.metadata("code_folds")["perm_assets/folds"].schema.columns
    }


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "  split: {kind: random, ratios: [0.8, 0.3]}",
            "split.ratios [0.8, 0.3] sum to 1.1, above 1; they must sum to 1",
        ),
        (
            "  split: {kind: randm, ratios: [0.5, 0.5]}",
            "split.kind 'randm' is not a split kind; use one of: random, sequential, hash, "
            "calculated, stratified, group, time",
        ),
        (
            "  split: {kind: random, ratio: [0.8, 0.2]}",
            "split.ratio: unknown field of RandomSplit; its fields are split_names, ratios",
        ),
        ("  shuffle: {seed: -1}", "shuffle.seed -1: Input should be greater than or equal to 0"),
        ("  sourc: digits", "sourc"),
    ],
)
def test_a_yaml_mistake_names_the_file_line_field_and_what_is_allowed(
    defs_package: tuple[str, Path], line: str, expected: str
) -> None:
    module, folder = defs_package
    path = _write(
        folder,
        "bad",
        "type: perm_assets.PermutationComponent\n"
        "attributes:\n"
        "  name: bad\n"
        "  source: rows\n" + line + "\n",
    )
    with pytest.raises(ComponentTreeException) as info:  # Dagster wraps the error
        _load(module)
    text = "".join(_chain(info.value))
    assert expected in text
    assert f"{path}:5" in text  # the file and the line of the wrong attribute


def test_an_automation_condition_that_is_no_condition_names_the_yaml_file(
    defs_package: tuple[str, Path],
) -> None:
    module, folder = defs_package
    path = _write(
        folder,
        "self_source",
        "type: perm_assets.PermutationComponent\n"
        "attributes:\n"
        "  name: self_source\n"
        "  source: rows\n"
        "  automation_condition: 'eager'\n",
    )
    with pytest.raises(ComponentTreeException) as info:
        _load(module)
    text = "".join(_chain(info.value))
    assert f"{path}: automation_condition 'eager' is not an AutomationCondition" in text


def _chain(exc: BaseException | None) -> Iterator[str]:
    while exc is not None:
        yield f"{exc}\n"
        exc = exc.__cause__ or exc.__context__


# ------------------------------------------------------------------- dg in a subprocess
def _dg(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """``dg <args>`` in ``cwd`` with an empty Dagster instance in ``home`` (never the repo's)."""
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(DG), *args],
        cwd=cwd,
        env=child_env(PYTHONPATH=str(cwd), NO_COLOR="1", DAGSTER_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository's dg project (code, pyproject, definitions) in tmp_path."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "definitions.py", "workspace.yaml"):
        shutil.copy(REPO / name, copy / name)
    shutil.copytree(
        REPO / "perm_assets", copy / "perm_assets", ignore=shutil.ignore_patterns("__pycache__")
    )
    return copy


@pytest.mark.slow
def test_dg_lists_and_checks_the_demo_with_its_yaml_asset(tmp_path: Path) -> None:
    listed = _dg("list", "defs", "--json", cwd=REPO, home=tmp_path / "home")
    assert listed.returncode == 0, listed.stderr
    assets = {a["asset_key"]: a for a in json.loads(listed.stdout)["assets"]}
    assert "digits_inked" in assets and "digits_splits" in assets
    assert assets["digits_inked"]["group_name"] == "digits"

    checked = _dg("check", "defs", cwd=REPO, home=tmp_path / "home")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All component YAML validated successfully." in checked.stdout
    assert "All definitions loaded successfully." in checked.stdout


@pytest.mark.slow
def test_dg_lists_the_components_outside_this_project(tmp_path: Path) -> None:
    """The ``dagster_dg_cli.registry_modules`` entry point: any environment with perm-assets
    installed lists (and can scaffold) the components, not only this repository's [tool.dg]."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    listed = _dg("list", "components", "--json", cwd=outside, home=tmp_path / "home")
    assert listed.returncode == 0, listed.stderr
    keys = {item["key"] for item in json.loads(listed.stdout)["items"]}
    assert {
        "perm_assets.components.PermutationComponent",
        "perm_assets.components.FoldsComponent",
    } <= keys


@pytest.mark.slow
def test_dg_scaffold_adds_an_asset_that_dg_list_defs_loads(project: Path) -> None:
    scaffolded = _dg(
        "scaffold", "defs", "perm_assets.PermutationComponent", "digits_halves",
        "--source", "digits", cwd=project, home=project.parent / "home",
    )  # fmt: skip
    assert scaffolded.returncode == 0, scaffolded.stdout + scaffolded.stderr
    text = (project / "perm_assets/demo/defs/digits_halves/defs.yaml").read_text()
    assert "type: perm_assets.PermutationComponent" in text
    assert "name: digits_halves" in text and "source: digits" in text

    listed = _dg("list", "defs", "--json", cwd=project, home=project.parent / "home")
    assert listed.returncode == 0, listed.stderr
    assert "digits_halves" in {a["asset_key"] for a in json.loads(listed.stdout)["assets"]}


@pytest.mark.slow
def test_dg_check_defs_fails_on_a_broken_yaml_naming_file_field_and_allowed(
    project: Path,
) -> None:
    yaml = project / DIGITS_INKED_YAML.relative_to(REPO)
    original = yaml.read_text()
    yaml.write_text(original + "  split: {kind: randm, ratios: [0.5, 0.5]}\n")
    wrong_kind = _dg("check", "defs", cwd=project, home=project.parent / "home")
    assert wrong_kind.returncode == 1
    out = wrong_kind.stdout + wrong_kind.stderr
    assert f"{yaml}:" in out and "attributes.split.kind" in out
    assert "'randm' is not one of ['random', 'sequential', 'hash'" in out

    yaml.write_text(original + "  split: {kind: random, ratios: [0.8, 0.3]}\n")
    bad_ratio = _dg("check", "defs", cwd=project, home=project.parent / "home")
    assert bad_ratio.returncode == 1
    out = bad_ratio.stdout + bad_ratio.stderr
    assert f"attributes.split at {yaml}:" in out
    assert "split.ratios [0.8, 0.3] sum to 1.1, above 1; they must sum to 1" in out


def test_the_component_schema_is_the_factory_arguments() -> None:
    schema = PermutationComponent.model_json_schema()
    assert schema["required"] == ["name", "source"]
    assert schema["properties"]["split"]["properties"]["kind"]["enum"][0] == "random"
    assert "sourc" not in schema["propertyNames"]["enum"]
    assert "split" in schema["propertyNames"]["enum"]
