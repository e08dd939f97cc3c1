"""`bench/bench.py` runs end to end on a tiny table and prints its ratio lines.

Speed is not asserted: a tiny table on a shared machine says nothing about it.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
ROWS = 20_000
RATIO_LINE = re.compile(r"^ratio (build|read)\s+rows=(\d+)\s.*?=\s*(\S+)", re.MULTILINE)


@pytest.mark.slow
def test_bench_runs_and_prints_ratios(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--rows",
            str(ROWS),
            "--repeat",
            "1",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    ratios = {
        kind: (int(rows), float(value)) for kind, rows, value in RATIO_LINE.findall(proc.stdout)
    }
    assert set(ratios) == {"build", "read"}, proc.stdout
    for kind, (rows, value) in ratios.items():
        assert rows == ROWS, f"{kind}: {rows}"
        assert math.isfinite(value) and value > 0, f"{kind} ratio {value}"
    assert "identical: True" in proc.stdout
    assert re.search(r"^memory rows=20000 ", proc.stdout, re.MULTILINE), proc.stdout
    assert (tmp_path / f"rows_{ROWS}" / "lancedb").is_dir()
