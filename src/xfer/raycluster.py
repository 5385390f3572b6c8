"""Connecting to Ray: a cluster when one is given, otherwise a local instance.

The address comes from the config (``cluster.address``) or ``RAY_ADDRESS``; with
neither, Ray starts on this machine (the local single-node mode). A dashboard address
(``http://<head>:8265``, the job API's, which `jobs/submit.sh` takes) is refused with
one line saying to submit the command as a job: a driver cannot connect to it, and
submitting belongs to `jobs/submit.sh` (working dir, runtime env, token) alone.
``ray://`` and ``host:port`` addresses connect. Every worker and
actor gets ``TF_USE_LEGACY_KERAS=1`` through the runtime env: Ray sets it on train
workers itself, but too late to take effect (docs/design.md, decision 1).

Credentials are not put in the runtime env (it is visible in Ray's dashboard and
state API): on a cluster they come from the job's own environment or the node's
role; a local instance started here inherits this process's environment.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from xfer import console
from xfer.errors import XferError

# Worker failures a training run recovers from when cluster.max_failures is not set:
# on a cluster (a node can go away under it), and on this machine.
CLUSTER_MAX_FAILURES = 3
LOCAL_MAX_FAILURES = 0

if TYPE_CHECKING:
    from xfer.config import ClusterConfig

# Non-secret variables worth forwarding to every worker.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "XFER_S3_MAX_ATTEMPTS",
    "TF_CPP_MIN_LOG_LEVEL",
    "XFER_VERBOSE",
)


def worker_env(extra: dict[str, str] | None = None, use_gpu: bool = True) -> dict[str, str]:
    # Ray Train's print patch would send each worker line twice (print and logger).
    env = {"TF_USE_LEGACY_KERAS": "1", "PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not use_gpu:
        # Processes that were given no GPU must not probe for one (and log errors).
        env["CUDA_VISIBLE_DEVICES"] = ""
    for key in FORWARDED_ENV:
        if os.environ.get(key):
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


def runtime_env(extra: dict[str, str] | None = None, use_gpu: bool = True) -> dict[str, Any]:
    return {"env_vars": worker_env(extra, use_gpu)}


def ray_address(address: str | None = None) -> str | None:
    """The Ray address in effect: ``address`` (cluster.address), else RAY_ADDRESS,
    else None (a local instance). A dashboard (http/https) address is an XferError."""
    found = address or os.environ.get("RAY_ADDRESS") or None
    if found and found.lower().startswith(("http://", "https://")):
        where = "cluster.address" if address else "RAY_ADDRESS"
        raise XferError(
            f"{where}={found} is the Ray dashboard (job API), which a driver cannot connect to: "
            "submit through it with `jobs/submit.sh <the same xfer arguments>` (to resume a run: "
            "jobs/submit.sh train --config <config> output.run_id=<id>), or give a ray:// or "
            "host:port address"
        )
    return found


def max_failures(cluster: ClusterConfig) -> int:
    """``cluster.max_failures``, or its default: 3 with a cluster address, 0 locally."""
    if cluster.max_failures is not None:
        return cluster.max_failures
    local = ray_address(cluster.address) in (None, "local")
    return LOCAL_MAX_FAILURES if local else CLUSTER_MAX_FAILURES


def is_local(started: bool, address: str | None) -> bool:
    """A Ray instance this process started on this machine (not a cluster's)."""
    return started and not ray_address(address)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to (or start) Ray once per process; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # ray.init replaces the SIGTERM handler with its own (sys.exit); keep the
    # command's, which stops what the command started and reports it.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _init(address, num_cpus)
    finally:
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    console.quiet_ray_output()
    return True


def _init(address: str | None, num_cpus: int | None) -> None:
    import ray

    address = ray_address(address)
    kwargs: dict[str, Any] = {
        "runtime_env": runtime_env(),
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": "WARNING" if console.verbose() else "ERROR",
    }
    if address:
        # Under `ray job submit` the job has its own runtime env (jobs/runtime_env.yaml);
        # combine it with ours instead of failing on the keys both set.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # The dashboard also serves the state API that Ray Train's clean-up uses;
        # it listens on 127.0.0.1 only.
        # address="local": a new instance, never an attach to some other cluster that
        # happens to run on this machine.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **kwargs,
        )


def _shortfall(need_cpu: float, need_gpu: float) -> str:
    import ray

    have = ray.cluster_resources()
    problems = []
    if need_cpu > have.get("CPU", 0):
        problems.append(f"{need_cpu:g} CPUs, the cluster has {have.get('CPU', 0):g}")
    if need_gpu > have.get("GPU", 0):
        problems.append(f"{need_gpu:g} GPUs, the cluster has {have.get('GPU', 0):g}")
    return "; ".join(problems)


def check_capacity(
    need_cpu: float, need_gpu: float, keys: str, local: bool, wait_seconds: float | None = None
) -> None:
    """Can this Ray cluster ever run what the config asks for?

    ``keys`` names the settings that decide ``need_*`` (for the message). On a local
    instance a shortfall can never be made up: a ConfigError now, instead of a job
    that waits forever on resources. On a cluster an autoscaler may add nodes: with
    ``wait_seconds`` it waits that long for them (saying so every 30 s), then fails
    naming the keys; without, it warns and goes on.
    """
    import time

    from xfer.errors import ConfigError

    needs = _shortfall(need_cpu, need_gpu)
    if not needs:
        return
    if local:
        raise ConfigError(f"this machine cannot run the job: it needs {needs} (set by {keys})")
    if wait_seconds is None:
        print(
            f"{console.TAG} warning: waiting for resources (autoscaling?): needs {needs} ({keys})"
        )
        return
    deadline = time.monotonic() + wait_seconds
    while needs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConfigError(
                f"the cluster did not provide the resources within {wait_seconds:.0f}s: "
                f"the job needs {needs} (set by {keys}; the wait by score.resource_wait_seconds)"
            )
        print(
            f"{console.TAG} waiting up to {remaining:.0f}s more for resources (autoscaling?): "
            f"needs {needs} ({keys})",
            flush=True,
        )
        time.sleep(min(30.0, max(remaining, 0.1)))
        needs = _shortfall(need_cpu, need_gpu)


def run_tasks(
    fn: Any,
    calls: list[tuple[Any, ...]],
    desc: str,
    num_cpus: float = 1,
    max_in_flight: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` for each call as Ray tasks, with a progress bar; results in order.

    ``max_in_flight`` bounds how many run at once (default: as many as Ray schedules).
    Each task rides out a store that is away as long as this process does
    (:mod:`xfer.store.retry`), whatever environment its worker process was started with.
    """
    import ray

    from xfer.console import Progress
    from xfer.store.retry import budget_seconds

    remote = ray.remote(num_cpus=num_cpus, max_retries=2)(_within_budget).options(
        name=getattr(fn, "__name__", "task")
    )
    seconds = budget_seconds()
    limit = max_in_flight or len(calls)
    index: dict[Any, int] = {}
    results: list[Any] = [None] * len(calls)
    pending: list[Any] = []
    with Progress(desc, len(calls), unit="task") as bar:
        for i, args in enumerate(calls):
            if len(pending) >= limit:
                pending = _collect(ray, pending, index, results, bar)
            ref = remote.remote(seconds, fn, *args)
            index[ref] = i
            pending.append(ref)
        while pending:
            pending = _collect(ray, pending, index, results, bar)
    return results


def _within_budget(seconds: float, fn: Any, *args: Any) -> Any:
    from xfer.store.retry import budget

    with budget(seconds):
        return fn(*args)


def _collect(
    ray: Any, pending: list[Any], index: dict[Any, int], results: list[Any], bar: Any
) -> list[Any]:
    done, rest = ray.wait(pending, num_returns=1)
    for ref in done:
        results[index[ref]] = ray.get(ref)
        bar.update()
    return rest
