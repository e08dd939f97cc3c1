"""Clean exits at scale: "take one batch, stop, exit" in real child processes, counting crashes.

Issue 11 asks for 20 runs at 10M rows or more with 0 crashes (a read-ahead thread inside a
lancedb read while the interpreter finalized crashed 1 run in 4 at 100M rows). The suite
(tests/test_clean_exit.py) runs the same child script over 1M rows; this script runs it over
``--rows`` (default 10M) in a temporary folder it removes, two children at a time (a loaded
machine is where timing bugs show), and prints one line per mode:

    mode        runs  exit 0  crashes  other  s/run
    keep          20      20        0      0    3.1

"crashes" are deaths by a signal (negative return codes, e.g. -11 for SIGSEGV); "other" any
other non-zero code (3: a read-ahead thread was still alive at exit). Exits 1 unless every
run exited with code 0.

    python bench/bench_exit.py [--rows 10000000] [--runs 20] [--dir /big/disk]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = REPO / "tests" / "exit_child.py"
TABLE = REPO / "tests" / "exit_table.py"
SPLITS = "exit_splits"  # tests/exit_table.py's permutation asset
MODES = ("keep", "break", "shard", "dataloader")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _child(uri: str, mode: str) -> int:
    done = subprocess.run(
        [sys.executable, str(CHILD), uri, SPLITS, mode],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        print(f"  {mode}: exit code {done.returncode}: {done.stderr[-400:]}", file=sys.stderr)
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=20, help="runs of the `keep` mode")
    parser.add_argument("--dir", default=None, help="where to put the table (removed after)")
    args = parser.parse_args()
    runs = {"keep": args.runs, "break": 4, "shard": 4, "dataloader": 4}
    folder = Path(tempfile.mkdtemp(prefix="bench_exit_", dir=args.dir))
    try:
        uri = str(folder / "lancedb")
        started = time.perf_counter()
        subprocess.run([sys.executable, str(TABLE), uri, str(args.rows)], env=_env(), check=True)
        print(
            f"clean exits over {args.rows:,} rows (table built in "
            f"{time.perf_counter() - started:.1f} s), two children at a time"
        )
        print(f"{'mode':<11} {'runs':>5} {'exit 0':>7} {'crashes':>8} {'other':>6} {'s/run':>6}")
        failed = 0
        for mode in MODES:
            started = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                codes = list(pool.map(lambda _, m=mode: _child(uri, m), range(runs[mode])))
            took = (time.perf_counter() - started) * 2 / len(codes)
            ok = sum(code == 0 for code in codes)
            crashes = sum(code < 0 for code in codes)
            failed += len(codes) - ok
            print(
                f"{mode:<11} {len(codes):>5} {ok:>7} {crashes:>8} {len(codes) - ok - crashes:>6}"
                f" {took:>6.1f}",
                flush=True,
            )
        return 1 if failed else 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
