"""``make ui`` stops cleanly: webserver, daemon and code server all gone within 10 s of a
SIGTERM to make, or of Ctrl-C (SIGINT to the terminal's process group).

Real processes: ``make ui`` on a free port with a temporary DAGSTER_HOME, the venv of this
interpreter (``-o`` keeps make from reinstalling it). ~20 s per case.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import (
    HOST,
    REPO,
    free_port,
    kill_group,
    log_tail,
    start_make_ui,
    wait_for,
    webserver_answers,
)

VENV = Path(sys.executable).parent.parent
STOP_WITHIN = 10.0


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _names(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:90].decode())
    return out


def _steal() -> float:
    """Seconds of CPU time the hypervisor has taken from this machine since boot (all CPUs):
    a throttled VM cannot meet a wall-clock bound."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def _where(pids: list[int]) -> str:
    """Each process's state, kernel wait channel and (py-spy, when installed) Python stacks:
    what a failure needs to say why a process did not stop."""
    spy = VENV / "bin" / "py-spy"
    parts = []
    for pid in pids:
        with contextlib.suppress(OSError):
            state = next(
                line
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("State:")
            )
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            parts.append(f"--- {pid} {state} wchan={wchan} {_names([pid])}")
            if spy.exists():
                dump = subprocess.run(
                    [str(spy), "dump", "--pid", str(pid)],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    check=False,
                )
                parts.append("\n".join((dump.stdout + dump.stderr).splitlines()[:40]))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.serial  # a 10 s bound: not beside another worker's test
@pytest.mark.parametrize("how", ["sigterm_to_make", "ctrl_c"])
@pytest.mark.parametrize("launched", ["in_a_terminal", "in_the_background_by_a_script"])
def test_make_ui_stops_every_process_within_10_s(tmp_path: Path, how: str, launched: str) -> None:
    # In the background of a non-interactive shell (CI runners, `make ui &` in a script) make
    # starts with SIGINT ignored; dagster dev maps SIGTERM to SIGINT's disposition, so dg dev
    # ignored both until `make ui` reset them (perm_assets/ui.py): CI saw every process alive.
    port = free_port()
    log = tmp_path / "make_ui.log"
    make = start_make_ui(
        cwd=REPO,
        port=port,
        home=tmp_path / "home",
        log=log,
        venv=VENV,
        sigint_ignored=launched == "in_the_background_by_a_script",
    )
    try:
        wait_for(
            lambda: webserver_answers(port),
            timeout=120,
            what=f"make ui answering on {HOST}:{port}",
            process=make,
            log=log,
        )
        running = _names(_group(make.pid))
        # make, dg dev, dagster dev, webserver, daemon, code server (and its gRPC server).
        assert any("dagster_webserver" in n for n in running), running
        assert any("dagster._daemon" in n for n in running), running
        assert any("code-server" in n or "api grpc" in n for n in running), running

        steal = _steal()
        started = time.monotonic()
        if how == "sigterm_to_make":
            make.send_signal(signal.SIGTERM)
        else:
            os.killpg(make.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
        deadline = started + STOP_WITHIN
        while (make.poll() is None or _group(make.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        took = time.monotonic() - started
        left = _names(_group(make.pid))
        assert make.poll() is not None and not left, (
            f"still running {took:.1f} s after {how}: {left}\n{log_tail(log)}\n"
            f"CPU time stolen by the hypervisor meanwhile: {_steal() - steal:.1f} s\n"
            f"{_where(_group(make.pid))}"
        )
        assert not webserver_answers(port)
    finally:
        kill_group(make)
