"""Real servers for the tests, started on 127.0.0.1 at a free port and always stopped.

- `moto_s3_server`: moto's standalone S3-compatible server (``moto[server]``, in the venv). It
  honours ``If-None-Match: *`` on PUT, which Lance's commits rely on (tests/test_object_store.py
  checks it), and it is started with IAM authentication on, so a wrong or unresolved credential
  is rejected instead of silently accepted.
- `postgres_server`: a throwaway PostgreSQL cluster (Debian's ``postgresql`` package; ``.ci/run``
  installs it when missing), password authentication over TCP.

Both are context managers with bounded waits. A server that cannot start raises
`ServerStartError` with the reason and the tail of its log: tests fail loudly, never skip.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

# Bounded waits for every call the tests make to the server.
_BOTO_CONFIG = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2})

HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A test server could not be started; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text[-lines:]) or "(empty log)"


def wait_until(
    probe: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    log: Path,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``probe`` until it is true; raise `ServerStartError` on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerStartError(
                f"{what} exited with code {process.returncode} before answering. "
                f"Log {log}:\n{_log_tail(log)}"
            )
        if probe():
            return
        time.sleep(0.1)
    raise ServerStartError(
        f"{what} did not answer within {timeout:.0f} s. Log {log}:\n{_log_tail(log)}"
    )


def _answers_as_moto(endpoint: str) -> Callable[[], bool]:
    """Probe: moto's own API answers (not merely something listening on the port)."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1) as response:
                return response.status == 200
        except OSError:  # refused, reset, timed out, HTTP errors
            return False

    return probe


def _stop(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """Terminate ``process``; kill it when it does not exit within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


# ------------------------------------------------------------------------------------- S3 (moto)


@dataclass(frozen=True)
class S3Server:
    """How to reach a running moto S3 server with the one IAM key that it accepts."""

    endpoint: str
    bucket: str
    region: str
    access_key_id: str
    secret_access_key: str
    recording: Path

    def storage_options(self) -> dict[str, str]:
        """Lance/object_store storage options for this server (plain values, secrets included)."""
        return {
            "endpoint": self.endpoint,
            "region": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "allow_http": "true",
        }

    def client(self, *, secret_access_key: str | None = None) -> Any:
        """A boto3 S3 client for this server (boto3 ships no type information)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
            config=_BOTO_CONFIG,
        )

    @contextmanager
    def recorded_requests(self) -> Iterator[list[dict[str, Any]]]:
        """Record the requests the server receives inside the block (moto's request recorder).

        The list is filled when the block exits: each entry has ``method``, ``url`` and
        ``headers`` (names lower-cased).
        """
        self._recorder("reset-recording")
        self._recorder("start-recording")
        entries: list[dict[str, Any]] = []
        try:
            yield entries
        finally:
            self._recorder("stop-recording")
            for line in self.recording.read_text().splitlines():
                entry = json.loads(line)
                entries.append(
                    {
                        "method": entry["method"],
                        "url": entry["url"],
                        "headers": {k.lower(): v for k, v in entry["headers"].items()},
                    }
                )

    def _recorder(self, action: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/recorder/{action}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


# The server lets this many requests through unauthenticated: the three IAM calls that create the
# test's user, its policy and its access key. Every later request must be signed with that key.
_UNAUTHENTICATED_SETUP_CALLS = 3
_S3_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


@contextmanager
def moto_s3_server(
    workdir: Path, *, bucket: str = "perm-assets", timeout: float = 30.0
) -> Iterator[S3Server]:
    """Start ``moto_server`` from this venv on 127.0.0.1, with IAM auth and a bucket.

    The server is terminated when the block exits, also when the block or the setup fails.
    """
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        raise ServerStartError(
            f"{binary} does not exist: install the dev extras (pip install -e '.[dev]', which "
            "brings moto[server])"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    recording = workdir / "moto_requests.jsonl"
    log = workdir / "moto_server.log"
    env = {
        **os.environ,
        "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNAUTHENTICATED_SETUP_CALLS),
        "MOTO_RECORDER_FILEPATH": str(recording),
    }
    region = "us-east-1"
    with ExitStack() as stack:
        log_file = stack.enter_context(log.open("wb"))
        process = subprocess.Popen(
            [str(binary), "-H", HOST, "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        stack.callback(_stop, process)
        wait_until(
            _answers_as_moto(endpoint),
            timeout=timeout,
            what=f"moto_server on {endpoint}",
            log=log,
            process=process,
        )
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
            config=_BOTO_CONFIG,
        )
        iam.create_user(UserName="perm-assets-tests")
        iam.put_user_policy(
            UserName="perm-assets-tests", PolicyName="s3", PolicyDocument=json.dumps(_S3_POLICY)
        )
        key = iam.create_access_key(UserName="perm-assets-tests")["AccessKey"]
        server = S3Server(
            endpoint=endpoint,
            bucket=bucket,
            region=region,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
            recording=recording,
        )
        server.client().create_bucket(Bucket=bucket)
        yield server


# ------------------------------------------------------------------------------------ PostgreSQL


@dataclass(frozen=True)
class PostgresServer:
    """How to reach a running PostgreSQL server over TCP (password authentication)."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self) -> str:
        """SQLAlchemy URL with psycopg2 (SQLAlchemy 2.1 maps postgresql:// to psycopg 3)."""
        return (
            f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/"
            f"{self.database}"
        )


def postgres_bin_dir() -> Path:
    """Where initdb and pg_ctl live: ``$PG_BIN``, the newest /usr/lib/postgresql/*/bin, or PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    on_path = shutil.which("initdb")
    candidates += [str(Path(on_path).parent)] if on_path else []
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise ServerStartError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $PG_BIN, "
        "/usr/lib/postgresql/*/bin or PATH. Install them: apt-get install -y postgresql "
        "(.ci/run does this when they are missing)."
    )


def _as_postgres_user(command: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as the ``postgres`` OS user then."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser is not None:
        return [runuser, "-u", "postgres", "--", *command]
    return ["su", "postgres", "-c", shlex.join(command)]


def _run(
    command: list[str], *, what: str, timeout: float, cwd: Path, log: Path | None = None
) -> None:
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        extra = f"\nServer log {log}:\n{_log_tail(log)}" if log else ""
        raise ServerStartError(f"{what} did not finish within {timeout:.0f} s{extra}") from exc
    if done.returncode != 0:
        extra = f"\nServer log {log}:\n{_log_tail(log)}" if log else ""
        raise ServerStartError(
            f"{what} failed (exit {done.returncode}): {' '.join(command)}\n"
            f"{done.stdout}{done.stderr}{extra}"
        )


@contextmanager
def postgres_server(
    *, database: str = "dagster", user: str = "postgres", timeout: float = 60.0
) -> Iterator[PostgresServer]:
    """Create a throwaway cluster, start it on 127.0.0.1 at a free port, create ``database``.

    The data directory is a fresh temporary directory (under the system temp dir, which the
    ``postgres`` user can reach, unlike pytest's root-only tmp_path when run as root), with
    fsync off. The server is stopped and the directory removed when the block exits.
    """
    bindir = postgres_bin_dir()
    base = Path(tempfile.mkdtemp(prefix="perm-assets-pg-"))
    data, log, pwfile = base / "data", base / "server.log", base / "pwfile"
    password = os.urandom(12).hex()
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()
    started = False
    try:
        _run(
            _as_postgres_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    user,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            ),
            what="initdb",
            timeout=timeout,
            cwd=base,
        )
        options = f"-c listen_addresses={HOST} -p {port} -k {base} -c fsync=off"
        started = True  # from here on, try to stop it whatever happens
        _run(
            _as_postgres_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ]
            ),
            what=f"PostgreSQL start on {HOST}:{port}",
            timeout=timeout + 10,
            cwd=base,
            log=log,
        )
        _run(
            _as_postgres_user(
                [str(bindir / "createdb"), "-h", str(base), "-p", str(port), "-U", user, database]
            ),
            what=f"createdb {database}",
            timeout=timeout,
            cwd=base,
            log=log,
        )
        yield PostgresServer(host=HOST, port=port, user=user, password=password, database=database)
    finally:
        try:
            if started:
                _stop_postgres(bindir, data, base, log)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _stop_postgres(bindir: Path, data: Path, base: Path, log: Path) -> None:
    """``pg_ctl stop -m fast``; if that fails, kill the postmaster this cluster recorded."""
    pidfile = data / "postmaster.pid"
    if not pidfile.exists():
        return
    stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"]
    try:
        _run(_as_postgres_user(stop), what="PostgreSQL stop", timeout=40, cwd=base, log=log)
    except ServerStartError:
        if pidfile.exists():  # our own server, by the pid it wrote
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        raise
