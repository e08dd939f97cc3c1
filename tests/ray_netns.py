"""Run a Python script against a real Ray cluster inside a fresh loopback-only network namespace.

Ray advertises the machine's external address even with ``--node-ip-address=127.0.0.1`` (ray
issues 26293 / 59110), so here Ray never runs in the root network namespace: `run_on_ray`
starts ``unshare --net --pid --fork --mount-proc --kill-child`` in which only ``lo`` exists.
The PID namespace makes the cleanup exact: every process in it is this harness's, so the
cluster is stopped by process id (`_stop_cluster`; never ``ray stop``, which matches by name),
and when the namespace's first process dies the kernel kills every process left in it,
whatever happened.

Inside, this module (run as ``--inner``) starts a Ray head (0 CPUs by default, so tasks run
only on the workers) and ``workers`` worker nodes (``ray start --address``, 1 CPU each, each a
real raylet process), optionally moto's S3 server (`tests.servers.moto_s3_server`, started
inside the namespace too), then runs the script with:

- ``RAY_ADDRESS=127.0.0.1:<port>``, ``RAY_NETNS_NODES`` (head + workers) and
  ``RAY_NETNS_TEMP_DIR`` (Ray's temp dir: logs in ``session_latest/logs``);
- with ``s3=True``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
  ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP`` and ``RAY_NETNS_S3_BUCKET``. The Ray nodes are
  started with the same environment, so workers take credentials from their environment and
  nothing secret has to travel in task arguments.

The script's stdout and stderr come back in `RayRun`; by convention its last stdout line is
JSON (`RayRun.json`). Harness messages (and Ray's logs on a start failure) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# Exit codes of the harness itself (a script's own code is passed through).
EXIT_SETUP_FAILED = 97
EXIT_SCRIPT_TIMEOUT = 98
# Per-node object store: small, five people share this machine's memory.
_OBJECT_STORE_BYTES = 150 * 1024 * 1024
_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    # Keep idle worker processes. Ray keeps one idle worker per CPU and kills the others after
    # 1 s idle; on these 1-CPU nodes, Ray Data's next stage usually found its worker killed or
    # not yet returned and started a new process, which imported perm_assets again (then with
    # dagster and lancedb: ~4 s on 2 loaded cores): most of a small Ray build. The one-worker
    # test took 300 s for its nine builds, 60 s with these (a multi-CPU node keeps that many
    # workers anyway).
    "RAY_num_workers_soft_limit": "4",
    "RAY_idle_worker_killing_time_threshold_ms": "120000",
}
FAST_NODE_DEATH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}
"""``env`` for `run_on_ray` in tests that kill a node: Ray's GCS declares a node dead after its
health checks fail about period x threshold times (Ray's defaults: tens of seconds), and only
then are its tasks and lost blocks run elsewhere. A timeout loose enough for 2 loaded cores."""


@dataclass(frozen=True)
class RayRun:
    """What a script run on the namespaced cluster returned."""

    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The last non-empty stdout line, parsed as JSON."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        if not lines:
            raise AssertionError(f"no stdout from the script; stderr:\n{self.stderr[-4000:]}")
        return json.loads(lines[-1])

    def check(self) -> RayRun:
        """This run, or an AssertionError with the script's output when it failed."""
        if self.returncode != 0:
            raise AssertionError(
                f"script exited with {self.returncode}\nstdout:\n{self.stdout[-4000:]}\n"
                f"stderr:\n{self.stderr[-8000:]}"
            )
        return self


def run_on_ray(
    script: str | Path,
    *args: str,
    workers: int = 1,
    head_cpus: int = 0,
    s3: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
) -> RayRun:
    """Run ``python script *args`` with ``RAY_ADDRESS`` set to a fresh Ray cluster (head +
    ``workers`` worker nodes, and a moto S3 server when ``s3``) inside a loopback-only network
    namespace; everything is stopped when the script ends, fails or times out.

    ``env`` is added to the environment of the Ray nodes and of the script. ``timeout`` bounds
    the script alone (cluster start and stop have their own bounded waits).
    """
    spec = {
        "script": str(Path(script).resolve()),
        "args": list(args),
        "workers": workers,
        "head_cpus": head_cpus,
        "s3": s3,
        "timeout": timeout,
    }
    child_env = {**os.environ, **(env or {}), **_RAY_ENV}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(REPO), child_env.get("PYTHONPATH", "")] if p
    )
    command = [
        "unshare",
        "--net",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "--",
        "sh",
        "-c",
        'ip link set lo up && exec "$0" "$@"',
        sys.executable,
        str(Path(__file__).resolve()),
        "--inner",
        json.dumps(spec),
    ]
    try:
        done = subprocess.run(
            command,
            env=child_env,
            cwd=str(REPO),
            capture_output=True,
            text=True,
            timeout=timeout + 120.0,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # --kill-child: the namespace dies with unshare
        raise AssertionError(
            f"the namespaced Ray run did not end within {timeout + 120:.0f} s; stderr:\n"
            f"{_text(exc.stderr)[-4000:]}"
        ) from exc
    return RayRun(done.returncode, done.stdout, done.stderr)


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# ------------------------------------------------------------------ inside the namespace


def _say(message: str) -> None:
    print(f"[ray_netns] {message}", file=sys.stderr, flush=True)  # noqa: T201 - the test's log


def _ray_start(args: list[list[str]], env: dict[str, str], timeout: float = 120.0) -> None:
    """``ray start`` for each argument list (concurrently when several); raise with the output
    of any that failed."""
    binary = str(Path(sys.executable).with_name("ray"))
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [binary, "start", *arguments],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for arguments in args
    ]
    failures = []
    for arguments, process in zip(args, processes, strict=True):
        try:
            output, _ = process.communicate(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            failures.append(
                f"ray start {' '.join(arguments)}: no answer in {timeout:.0f} s\n{output}"
            )
            continue
        if process.returncode != 0:
            failures.append(
                f"ray start {' '.join(arguments)} exited {process.returncode}:\n{output}"
            )
    if failures:
        raise RuntimeError("\n".join(failures))


def _log_tails(temp_dir: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of each of Ray's ``*.err`` logs (and of the raylets' and GCS's
    ``*.out`` when ``lines`` > 15: what a hang needs)."""
    parts = []
    patterns = ["*.err"] + (["raylet*.out", "gcs_server.out"] if lines > 15 else [])
    logs = sorted({log for p in patterns for log in temp_dir.glob(f"session_latest/logs/{p}")})
    for log in logs:
        kept = [  # not the periodic state and object store dumps (their lines start with
            # no timestamp)
            ln
            for ln in log.read_text(errors="replace").splitlines()
            if "[state-dump]" not in ln and (ln.startswith("[") or log.suffix == ".err")
        ]
        if kept:
            parts.append(f"--- {log.name}\n" + "\n".join(kept[-lines:]))
    return "\n".join(parts)


def dump_stacks_on_sigusr1() -> None:
    """For scripts run by `run_on_ray`: on SIGUSR1 (sent by the harness when the script runs
    out of time) print every thread's stack to stderr."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _namespace_processes() -> list[int]:
    """Every other process in this PID namespace: all started by this harness."""
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def _stop_cluster() -> None:
    """Stop Ray (and anything else left, e.g. a worker's child) by process id: SIGTERM, then
    SIGKILL after a grace period. Faster than ``ray stop --force`` (which takes ~25 s on a
    loaded machine and matches processes by name) and exact: in this PID namespace every
    process is this harness's. Should the harness itself die, the kernel kills them all when
    the namespace's first process exits."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in _namespace_processes():
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:  # reap our children; others are re-parented to us (we are PID 1) and reaped here
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            if not _namespace_processes():
                return
            time.sleep(0.1)
    _say(f"processes left after SIGKILL: {_namespace_processes()}")


def connect() -> Any:
    """For scripts run by `run_on_ray`: ``ray.init`` on ``RAY_ADDRESS`` and wait until every
    node of the cluster is alive (a worker's ``ray start`` can return before the GCS lists it).
    Returns the ``ray`` module."""
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.ERROR)
    nodes = int(os.environ["RAY_NETNS_NODES"])
    deadline = time.monotonic() + 60.0
    while sum(bool(node["Alive"]) for node in ray.nodes()) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only some of {nodes} Ray nodes are alive: {ray.nodes()}")
        time.sleep(0.2)
    return ray


def _inner(spec: dict[str, Any]) -> int:
    # The temp dir's path ends up in Unix socket paths (at most 107 bytes): keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
    env = {**os.environ}
    code = EXIT_SETUP_FAILED
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, temp_dir, True)
        try:
            if spec["s3"]:
                sys.path.insert(0, str(REPO))
                from tests.servers import moto_s3_server

                server = stack.enter_context(moto_s3_server(temp_dir / "moto"))
                env.update(
                    AWS_ACCESS_KEY_ID=server.access_key_id,
                    AWS_SECRET_ACCESS_KEY=server.secret_access_key,
                    AWS_REGION=server.region,
                    AWS_DEFAULT_REGION=server.region,
                    AWS_ENDPOINT_URL=server.endpoint,
                    AWS_ALLOW_HTTP="true",
                    RAY_NETNS_S3_BUCKET=server.bucket,
                )
            port = 6379  # free: this network namespace is new
            address = f"{HOST}:{port}"
            stack.callback(_stop_cluster)  # registered before starting: also after a failure
            started = time.monotonic()
            common = [
                f"--node-ip-address={HOST}",
                f"--object-store-memory={_OBJECT_STORE_BYTES}",
                "--disable-usage-stats",
            ]
            _ray_start(
                [
                    [
                        "--head",
                        f"--port={port}",
                        f"--num-cpus={spec['head_cpus']}",
                        f"--temp-dir={temp_dir}",
                        "--include-dashboard=false",
                        *common,
                    ]
                ],
                env,
            )
            for _ in range(spec["workers"]):
                # One at a time: concurrent `ray start`s on a loaded machine time out waiting
                # for their node info ("Failed to get node info: Deadline Exceeded").
                _ray_start([[f"--address={address}", "--num-cpus=1", *common]], env)
            nodes = 1 + spec["workers"]
            _say(f"cluster at {address}: {nodes} nodes in {time.monotonic() - started:.1f} s")
        except Exception as exc:
            _say(f"setup failed: {exc}\n{_log_tails(temp_dir)}")
            return EXIT_SETUP_FAILED
        env.update(
            RAY_ADDRESS=address, RAY_NETNS_NODES=str(nodes), RAY_NETNS_TEMP_DIR=str(temp_dir)
        )
        script = subprocess.Popen([sys.executable, spec["script"], *spec["args"]], env=env)
        try:
            code = script.wait(timeout=spec["timeout"])
        except subprocess.TimeoutExpired:
            # A hang is otherwise silent: Ray's logs say what the cluster did, then scripts
            # that call `dump_stacks_on_sigusr1` print where each of their threads waits (last:
            # the test shows the end of stderr).
            _say(f"script timed out after {spec['timeout']} s; Ray's logs:")
            _say(_log_tails(temp_dir, lines=40))
            _say("the script's threads:")
            script.send_signal(signal.SIGUSR1)
            time.sleep(3.0)
            script.kill()
            script.wait()
            code = EXIT_SCRIPT_TIMEOUT
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inner", required=True, help="JSON spec (internal)")
    sys.exit(_inner(json.loads(parser.parse_args().inner)))


if __name__ == "__main__":
    main()
