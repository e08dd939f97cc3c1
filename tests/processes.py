"""Child processes for the multi-process tests: own process group, bounded waits, always killed.

`process_group` starts a command in a new session so that everything it spawns (``dagster dev``
starts a webserver, a daemon, a code server and one worker per run) can be signalled at once,
and kills that group when the block exits, also on failure. The groups are addressed by the
child's own pid, never by a process name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_make_ui(
    *, cwd: Path, port: int, home: Path, log: Path, venv: Path, sigint_ignored: bool = False
) -> subprocess.Popen[bytes]:
    """``make ui`` on ``port`` with its own Dagster ``home``, leading a new process group.

    The home is a make variable: the Makefile's own ``export DAGSTER_HOME`` wins over the
    environment (the repo's .dagster_home may hold runs the daemon would launch). ``-o`` keeps
    make from reinstalling ``venv``. ``sigint_ignored``: started as a non-interactive shell
    starts a background job (``make ui &`` in a script, CI runners), with SIGINT ignored.
    """
    command = ["make", "-o", str(venv / ".installed"), "ui", f"VENV={venv}", f"UI_PORT={port}"]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*command, f"DAGSTER_HOME={home}"],
            cwd=cwd,
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_ignore_sigint if sigint_ignored else None,
        )


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited across exec, as from a shell


def webserver_answers(port: int) -> bool:
    """Whether a Dagster webserver answers ``/server_info`` on 127.0.0.1:``port``."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/server_info", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def child_env(**extra: str) -> dict[str, str]:
    """This environment plus ``extra``, with the repo importable (``tests`` is no package on
    the venv's path; ``perm_assets`` is, as an editable install)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def log_tail(log: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of ``log``, for failure messages."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text[-lines:]) or "(empty log)"


def wait_for(
    probe: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``probe`` until it is true; fail with ``what`` (and the log) on timeout or when
    ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if process is not None and process.poll() is not None:
            tail = f"\n{log}:\n{log_tail(log)}" if log else ""
            raise AssertionError(f"{what}: the process exited with {process.returncode}{tail}")
        if time.monotonic() > deadline:
            tail = f"\n{log}:\n{log_tail(log)}" if log else ""
            raise AssertionError(f"{what}: not within {timeout:.0f} s{tail}")
        time.sleep(interval)


def kill_group(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``process`` (graceful shutdown), SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the group is gone (and the leader was reaped)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    # Children of the leader (run workers, code servers) may outlive it: kill the whole group.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace)


@contextmanager
def process_group(
    command: Sequence[str], *, log: Path, cwd: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` as the leader of a new process group, output to ``log``; the whole
    group is killed when the block exits."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            kill_group(process)
