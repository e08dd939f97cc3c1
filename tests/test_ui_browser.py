"""The split table and class-balance chart seen in a real browser, and a re-split from the
launchpad.

``make ui`` (``dg dev``: webserver, daemon, code server) serves a copy of the project whose
``data/`` and Dagster home are under tmp_path (``perm_assets`` is linked, not copied, so ``dg``
finds its root module). Headless Chromium (Debian's ``chromium``, driven by Playwright for
Python; no browser download) then, as a person would:

1. opens the ``digits_splits`` asset page and finds the ``perm_assets/splits`` table (a row per
   split with the class counts) and, behind ``[Show Markdown]``, the ``perm_assets/balance``
   chart: an SVG image that the browser decoded (non-zero natural size);
2. opens the launchpad from the Materialize menu, changes the split seed in its YAML editor,
   launches, and waits for the run the daemon executes;
3. reloads the page: the table now holds other class counts, from the new seed.

Screenshots of each step stay in tmp_path (``asset_page.png``, ``balance_chart.png``,
``launchpad.png``, ``after_resplit.png``). Outside CI a machine without Chromium skips with
the command that installs it; in CI (``CI=true``) a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.processes import (
    HOST,
    REPO,
    child_env,
    free_port,
    kill_group,
    start_make_ui,
    wait_for,
    webserver_answers,
)

VENV = Path(sys.executable).parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ASSET = "digits_splits"
NEW_SEED = 4242

if CHROMIUM is None and os.environ.get("CI") != "true":
    pytest.skip(
        "needs Debian's chromium (apt-get install chromium); CI installs it",
        allow_module_level=True,
    )


def _project(tmp_path: Path) -> Path:
    """A copy of the project's top level whose ``data/`` is its own; the package is linked."""
    project = tmp_path / "project"
    (project / "deploy").mkdir(parents=True)
    for name in ["Makefile", "definitions.py", "pyproject.toml", "workspace.yaml"]:
        shutil.copy(REPO / name, project / name)
    shutil.copy(REPO / "deploy" / "dagster.sqlite.yaml", project / "deploy")
    (project / "perm_assets").symlink_to(REPO / "perm_assets", target_is_directory=True)
    return project


def _materialize_first(project: Path, home: Path) -> None:
    """The source and the split, once, so the page has a materialization to show."""
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.sqlite.yaml", home / "dagster.yaml")
    script = (
        "import dagster as dg, definitions\n"
        "job = definitions.defs.resolve_implicit_global_asset_job_def()\n"
        "result = job.execute_in_process(instance=dg.DagsterInstance.get(), "
        f"asset_selection=[dg.AssetKey('digits'), dg.AssetKey('{ASSET}')])\n"
        "assert result.success\n"
    )
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=project,
        env=child_env(DAGSTER_HOME=str(home), PYTHONPATH=str(project)),
        check=True,
        capture_output=True,
        timeout=180,
    )


def _open_asset_page(page: Any, base: str) -> None:
    page.goto(f"{base}/assets/{ASSET}", wait_until="networkidle")
    page.locator("tr", has_text="perm_assets/splits").first.wait_for(timeout=30_000)


def _splits_table(page: Any) -> list[list[str]]:
    """The cells of the ``perm_assets/splits`` table as the page shows them."""
    row = page.locator("tr", has_text="perm_assets/splits").first
    table = row.locator("table").first
    return [
        [cell.strip() for cell in line.split("\t")]
        for line in table.inner_text().strip().splitlines()
        if line.strip()
    ]


def _screenshot_of_table(page: Any, path: Path) -> None:
    """The page scrolled (it scrolls inside a panel) to the table, and the spec below it."""
    page.locator("tr", has_text="perm_assets/splits").first.scroll_into_view_if_needed()
    page.screenshot(path=str(path))


@pytest.mark.slow
def test_split_table_and_chart_in_the_browser_and_a_resplit_from_the_launchpad(
    tmp_path: Path,
) -> None:
    project = _project(tmp_path)
    home = tmp_path / "home"
    _materialize_first(project, home)
    port = free_port()
    base = f"http://{HOST}:{port}"
    log = tmp_path / "make_ui.log"
    make = start_make_ui(cwd=project, port=port, home=home, log=log, venv=VENV)
    try:
        wait_for(
            lambda: webserver_answers(port),
            timeout=120,
            what="make ui answering",
            process=make,
            log=log,
        )
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            # The first visit's "Join the Dagster community" dialog, whenever it shows up.
            skip = page.get_by_role("button", name="Skip")
            page.add_locator_handler(skip, lambda button: button.click())
            _check_in_browser(page, base, tmp_path, make)
            browser.close()
    finally:
        kill_group(make)


def _check_in_browser(page: Any, base: str, shots: Path, make: Any) -> None:
    # 1. The table: header, then one row per split with rows and per-class counts.
    _open_asset_page(page, base)
    before = _splits_table(page)
    _screenshot_of_table(page, shots / "asset_page.png")
    header = before[0]
    assert header[:4] == ["split", "rows", "share", "requested_share"], before
    assert "label=0" in header and "max_class_dev_rows" in header, header
    by_split = {line[0]: dict(zip(header, line, strict=True)) for line in before[1:]}
    assert set(by_split) == {"train", "test"}, before
    assert by_split["train"]["requested_share"] == "0.8"

    # The chart: a decoded SVG image in the markdown dialog.
    row = page.locator("tr", has_text="perm_assets/balance").first
    row.get_by_text("[Show Markdown]").click()
    image = page.locator("img[alt='class balance']").first
    image.wait_for()
    width, height, source = image.evaluate("e => [e.naturalWidth, e.naturalHeight, e.src]")
    assert width > 0 and height > 0 and source.startswith("data:image/svg+xml;base64,")
    page.screenshot(path=str(shots / "balance_chart.png"))
    page.get_by_role("button", name="Close").click()

    # 2. Re-split from the launchpad: a new split seed in its YAML editor, then Materialize.
    page.locator("button:has([aria-label='arrow_drop_down'])").first.click()
    page.get_by_role("menuitem", name="Open launchpad").click()
    editor = page.locator(".CodeMirror").first
    editor.wait_for()
    page.wait_for_function(
        "() => document.querySelector('.CodeMirror').CodeMirror.getValue().includes('seed: 42')"
    )
    text = editor.evaluate("e => e.CodeMirror.getValue()")
    assert "    seed: 42\n" in text, text  # the factory's default, scaffolded by the launchpad
    editor.evaluate(
        "(e, text) => e.CodeMirror.setValue(text)",
        text.replace("    seed: 42\n", f"    seed: {NEW_SEED}\n"),
    )
    page.get_by_text("No errors").wait_for()  # the launchpad validated the edited config
    page.screenshot(path=str(shots / "launchpad.png"))
    page.get_by_role("dialog").get_by_role("button", name="Materialize").click()

    # 3. The daemon runs it; the reloaded page shows the new seed's table.
    def resplit_shown() -> bool:
        _open_asset_page(page, base)
        row = page.locator("tr", has_text="perm_assets/run_config_overrides").first
        return f'"run": {NEW_SEED}' in row.inner_text()  # {"split.seed": {"default": 42, ...}}

    wait_for(resplit_shown, timeout=120, interval=3.0, what="the re-split run", process=make)
    after = _splits_table(page)
    _screenshot_of_table(page, shots / "after_resplit.png")
    assert after[0] == header
    assert after != before, "a new seed must change the per-class counts"
    # Same selection, same ratios: the split sizes are unchanged (random split: exact sizes).
    rows_after = {line[0]: line[1] for line in after[1:]}
    assert rows_after == {name: values["rows"] for name, values in by_split.items()}
