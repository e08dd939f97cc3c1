"""Dagster steps on a Ray cluster: dagster-ray's executor, configured and checked for perm_assets.

``dg.Definitions(..., executor=ray_step_executor("http://ray-head:8265"))`` runs every step of a
run (a permutation or folds build, a training asset) as a **Ray job** whose entrypoint is
``dagster api execute_step``: the step's own Python process starts on a Ray worker node and
writes its events to the Dagster instance; the orchestrating process only submits and polls.
Asset code does not change.

Why dagster-ray's executor, and not its run launcher or Pipes client: the factory-made assets
are ordinary Dagster steps, and the executor moves exactly those onto the cluster, one Ray job
per step with its own resources (``op_tags={"dagster-ray/config": {"num_cpus": 4}}``). Pipes
would need each build rewritten as an external script reporting back; the run launcher moves
the whole run (orchestrator included) onto Ray, which the executor can be combined with but
does not need. Requirements of the executor: a persistent Dagster instance reachable from the
Ray nodes (PostgreSQL in a team; a shared ``DAGSTER_HOME`` on one machine), the same LanceDB URI
on every node, this project and the ``dagster`` command installed on the Ray nodes (the
entrypoint is ``dagster api execute_step``), and Ray's job server (the dashboard, port 8265):
``ray[default]``, not the minimal ``ray``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlparse

import dagster as dg

from perm_assets.errors import SpecError

RAY_EXTRA_HINT = "install the ray extra: pip install 'perm-assets[ray]'"

# A variable named in ``env_vars`` has its *value* copied from the orchestrator into the Ray
# job's runtime_env, which Ray keeps in its job table and shows in its dashboard. Secrets must
# reach the steps as the Ray nodes' own environment (KubeRay: envFrom a Secret) instead.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|(^|_)KEY(_|$)", re.IGNORECASE)


def ray_step_executor(
    address: str,
    *,
    num_cpus: float = 1,
    memory_bytes: int | None = None,
    env_vars: Sequence[str] = (),
    runtime_env: Mapping[str, Any] | None = None,
) -> dg.ExecutorDefinition:
    """dagster-ray's ``ray_executor``: each step a Ray job submitted to ``address``.

    Args:
        address: the Ray job server, ``http(s)://<head>:8265`` (the dashboard's address; not the
            ``ray://`` client port nor the GCS ``host:6379``).
        num_cpus: CPUs each step reserves. Above 0 so that Ray may place the step on a worker
            node: without a resource request Ray runs a job's entrypoint on the head node.
        memory_bytes: memory each step reserves (Ray schedules by it; it is not a limit).
        env_vars: names of non-secret variables copied from the orchestrator's environment into
            each step's (e.g. ``PERM_ASSETS_LANCEDB_URI``). Secret-looking names are refused,
            here and in ``runtime_env["env_vars"]``.
        runtime_env: Ray's runtime_env for every step (``env_vars``, ``pip``, ...); usually empty:
            the nodes' image has the project installed.
    """
    try:
        from dagster_ray import ray_executor
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise SpecError(
            f"ray_step_executor: dagster-ray is not installed; {RAY_EXTRA_HINT}"
        ) from exc
    _check_address(address)
    if not num_cpus > 0:
        raise SpecError(
            f"ray_step_executor: num_cpus {num_cpus!r} must be above 0; a step that reserves "
            "no CPU runs on the Ray head node"
        )
    if memory_bytes is not None and memory_bytes <= 0:
        raise SpecError(f"ray_step_executor: memory_bytes {memory_bytes!r} must be above 0 or None")
    for name in env_vars:
        if "=" in name or not name:
            raise SpecError(
                f"ray_step_executor: env_vars entry {name!r} must be a variable name; its value "
                "is copied from the orchestrator's environment (a literal KEY=VALUE would be "
                "stored in Ray's job table)"
            )
    _refuse_secret_names([*env_vars, *(runtime_env or {}).get("env_vars", {})])
    ray_config: dict[str, Any] = {
        "address": address,
        "num_cpus": float(num_cpus),
        "env_vars": list(env_vars),
        # A step never uses a Ray run launcher's client: the address above is the one checked.
        "inherit_job_submission_client_from_ray_run_launcher": False,
    }
    if memory_bytes is not None:
        ray_config["memory"] = memory_bytes
    if runtime_env:
        ray_config["runtime_env"] = dict(runtime_env)
    return _checked(ray_executor).configured({"ray": ray_config}, name="perm_assets_ray_steps")


def _refuse_secret_names(names: Sequence[str]) -> None:
    for name in names:
        if _SECRET_NAME.search(name):
            raise SpecError(
                f"ray_step_executor: env_vars entry {name!r} looks like a secret; values in "
                "env_vars are stored in the Ray job's runtime_env and shown in Ray's dashboard. "
                "Give the Ray nodes the variable from your secret store instead (KubeRay: envFrom "
                "a Secret); the steps inherit the nodes' environment"
            )


def _check_address(address: str) -> None:
    parsed = urlparse(address)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return
    if parsed.scheme == "ray":
        kind = "a Ray Client address (port 10001)"
    elif address.startswith("auto") or not parsed.scheme or parsed.hostname is None:
        kind = "not a URL (a GCS address such as host:6379, or 'auto')"
    else:
        kind = f"a {parsed.scheme}:// URL"
    raise SpecError(
        f"ray_step_executor: address {address!r} is {kind}; steps are submitted as Ray jobs to "
        "the cluster's job server, 'http://<head>:8265' (the Ray dashboard's address)"
    )


def _checked(executor: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """dagster-ray's ``executor`` (same config), built here with two fixes.

    - A run whose job server does not answer fails naming the address: Ray's own error
      ("Failed to connect to Ray at address: ...") says neither that it is the job server that
      was asked for nor where to look. Nothing is submitted or written.
    - An asset's ``dagster-ray/config`` tag wins over the executor's defaults (dagster-ray 0.4.8
      computes ``executor value or tag value``, so with a default ``num_cpus`` every per-asset
      request was ignored).
    """
    from dagster._core.execution.retries import RetryMode
    from dagster._core.executor.step_delegating import StepDelegatingExecutor
    from dagster_ray.configs import RayExecutionConfig
    from dagster_ray.core.executor import RayExecutorConfig, RayStepHandler
    from ray.job_submission import JobSubmissionClient

    class TagsFirstStepHandler(RayStepHandler):
        def launch_step(self, step_handler_context: Any) -> Any:
            step_key = self._get_step_key(step_handler_context)
            tags = RayExecutionConfig.from_tags({**step_handler_context.step_tags[step_key]})
            defaults = (self.num_cpus, self.num_gpus, self.memory)
            # RayStepHandler reads these attributes in launch_step; steps are launched one at a
            # time by the orchestrator's loop, so swapping them around the call is safe.
            self.num_cpus = tags.num_cpus if tags.num_cpus is not None else defaults[0]
            self.num_gpus = tags.num_gpus if tags.num_gpus is not None else defaults[1]
            self.memory = tags.memory if tags.memory is not None else defaults[2]
            try:
                yield from super().launch_step(step_handler_context)
            finally:
                self.num_cpus, self.num_gpus, self.memory = defaults

    def create(init_context: Any) -> Any:
        config = init_context.executor_config
        ray_config = RayExecutorConfig(**config["ray"])
        try:
            client = JobSubmissionClient(
                ray_config.address,
                metadata=ray_config.metadata,
                headers=ray_config.headers,
                cookies=ray_config.cookies,
            )
        except ConnectionError as exc:
            raise ConnectionError(
                f"ray_step_executor: no Ray job server answers at {ray_config.address!r} (the "
                "head's dashboard, port 8265, reachable from the process orchestrating the run); "
                f"no step was submitted. Ray said: {exc}"
            ) from exc
        handler = TagsFirstStepHandler(
            client=client,
            env_vars=ray_config.env_vars,
            runtime_env=ray_config.runtime_env,
            num_cpus=ray_config.num_cpus,
            num_gpus=ray_config.num_gpus,
            memory=ray_config.memory,
            resources=ray_config.resources,
        )
        return StepDelegatingExecutor(
            handler,
            retries=RetryMode.from_config(config["retries"]),  # pyright: ignore[reportArgumentType]
            max_concurrent=config.get("max_concurrent"),
            tag_concurrency_limits=config.get("tag_concurrency_limits"),
            should_verify_step=True,
        )

    return dg.ExecutorDefinition(
        name=executor.name,
        config_schema=cast(Any, executor.config_schema),
        requirements=executor.get_requirements,
        executor_creation_fn=create,
        description=executor.description,
    )
