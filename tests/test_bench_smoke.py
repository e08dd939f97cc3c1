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
RATIO_LINE = re.compile(
    r"^ratio (build|read|folds|assign)\s+rows=(\d+)\s.*?=\s*(\S+)\s+\(target", re.MULTILINE
)
FOLDS_MEMORY_LINE = re.compile(r"^memory folds rows=(\d+)\s.*RSS growth: (.*)$", re.MULTILINE)
# One "<MiB> MiB (<share>x)" per folds variant; nan where the OS cannot reset the peak RSS.
GROWTH = re.compile(r" ([\d,]+\.\d|nan) MiB \((\d+\.\d+|nan)x\)")


def run_bench(data_dir: Path, *extra: str) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--rows",
            str(ROWS),
            "--repeat",
            "1",
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_bench_runs_and_prints_ratios(tmp_path: Path) -> None:
    stdout = run_bench(tmp_path)

    found = RATIO_LINE.findall(stdout)
    ratios = {kind: (int(rows), float(value)) for kind, rows, value in found}
    assert len(found) == len(ratios), f"a ratio line is repeated: {found}"
    assert set(ratios) == {"build", "read", "folds", "assign"}, stdout
    for kind, (rows, value) in ratios.items():
        assert rows == ROWS, f"{kind}: {rows}"
        assert math.isfinite(value) and value > 0, f"{kind} ratio {value}"
    assert "identical: True" in stdout
    assert "fold sizes project, assign and sklearn identical: True" in stdout
    assert re.search(r"^memory rows=20000 ", stdout, re.MULTILINE), stdout
    folds_memory = FOLDS_MEMORY_LINE.search(stdout)
    assert folds_memory is not None and int(folds_memory.group(1)) == ROWS, stdout
    growths = GROWTH.findall(folds_memory.group(2))
    assert len(growths) == 4, folds_memory.group(0)
    for mib, share in growths:
        for value in (float(mib.replace(",", "")), float(share)):
            assert math.isnan(value) or value >= 0, folds_memory.group(0)
    assert (tmp_path / f"rows_{ROWS}" / "lancedb").is_dir()
    assert (tmp_path / f"rows_{ROWS}" / "lancedb" / "bench_folds__train.lance").is_dir()


@pytest.mark.slow
def test_bench_no_folds_skips_the_folds_phase(tmp_path: Path) -> None:
    stdout = run_bench(tmp_path, "--no-folds")

    kinds = {kind for kind, _, _ in RATIO_LINE.findall(stdout)}
    assert kinds == {"build", "read"}, stdout
    assert " folds " not in stdout and "memory folds" not in stdout, stdout
    assert not (tmp_path / f"rows_{ROWS}" / "lancedb" / "bench_folds.lance").exists()
