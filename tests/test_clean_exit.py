"""Clean exits: a training loop takes one batch, stops, and the interpreter exits with code 0.

A daemon read-ahead thread still inside a lancedb read while the interpreter finalizes crashed
one process in four at 100M rows (segmentation fault after ``break``). `BatchLoader` now
stops and joins its read-ahead threads in an exit handler. Each run is a real child process
(tests/exit_child.py) over a real 1M-row table built once for the module; the child fails with
code 3 when a read-ahead thread is still alive after perm_assets' exit handlers ran.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.exit_table import SPLITS, build
from tests.processes import REPO, child_env

ROWS = 1_000_000
CHILD = REPO / "tests" / "exit_child.py"
# 10 runs catch a crash of 1 run in 4 with probability 94%; `make bench` runs 20 at 10M rows
# (bench/bench_exit.py), where the crash was seen.
RUNS = {"keep": 10, "break": 2, "shard": 2, "dataloader": 2}


@pytest.fixture(scope="module")
def table_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("exit") / "lancedb")
    build(uri, ROWS)
    return uri


def run_child(uri: str, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), uri, SPLITS, mode],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=180,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("mode", list(RUNS))
def test_one_batch_then_exit_ends_with_code_0_every_time(table_uri: str, mode: str) -> None:
    # Two at a time: the machine has two cores, and a loaded machine is where timing bugs show.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_child(table_uri, mode), range(RUNS[mode])))
    for result in results:
        detail = f"exit code {result.returncode}; stderr:\n{result.stderr[-3000:]}"
        assert result.returncode == 0, detail
        assert "first batch: 1024 rows" in result.stdout, detail
        assert "Traceback" not in result.stderr, detail


def test_exit_child_names_a_thread_left_running(table_uri: str, tmp_path: Path) -> None:
    """The child's check can fail: a thread of that name left running gives exit code 3."""
    script = tmp_path / "left_running.py"
    script.write_text(
        CHILD.read_text().split("# ruff: noqa")[0]
        + "import time\n"
        + "threading.Thread(target=time.sleep, args=(60,), name='perm-assets-read-ahead',"
        + " daemon=True).start()\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 3, result.stderr
    assert "1 read-ahead thread(s) alive at exit" in result.stderr
