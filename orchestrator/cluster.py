"""Connecting to Ray: an embedded local instance by default, or a running cluster."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path


class ClusterError(Exception):
    """The cluster cannot run what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class ClusterInfo:
    cpus: float
    gpus: float
    address: str | None  # None: the embedded local instance
    started_here: bool
    nodes: int = 1


def _quiet_env() -> None:
    # Tune's own CSV/JSON/TensorBoard loggers write every result to disk; orch writes results
    # to its store and MLflow from the driver, so those are pure overhead.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray Train polls its workers this often; the default 2 s adds up to 2 s to every report
    # and to the end of every job.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def connect(address: str | None = None, *, num_cpus: int | None = None) -> ClusterInfo:
    """Connect (or reuse an initialised Ray). The local instance binds to 127.0.0.1 and has no
    dashboard; ``address`` may be ``auto``, ``host:port`` or ``ray://host:10001``."""
    _quiet_env()
    import ray

    started = False
    if address and not ray.is_initialized():
        _check_reachable(address)
    if not ray.is_initialized():
        kwargs = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True,
                      include_dashboard=False)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
                started = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or "a local Ray instance"
            raise ClusterError(f"cannot connect to Ray at {where}: {str(e).splitlines()[0]}") from None
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(float(res.get("CPU", 0)), float(res.get("GPU", 0)), address, started, max(1, nodes))


#: How long an unreachable head may keep `orch` waiting (ray.init itself retries for minutes).
CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """A bounded TCP check of ``host:port`` / ``ray://host:port`` before handing it to Ray."""
    import socket
    from urllib.parse import urlparse

    if address == "auto" or address.startswith("local"):
        return
    hostport = urlparse(address).netloc if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"cannot parse Ray address {address!r}; use auto, host:port or ray://host:10001")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ClusterError(f"cannot reach Ray at {address} ({reason} within {CONNECT_TIMEOUT_S:g}s); is the head "
                           f"running? `ray start --head` prints the address to use") from None


def resolve_storage(info: ClusterInfo, storage: str | None, default: "os.PathLike") -> str:
    """Where Tune/Train write checkpoints: ``storage`` (a path every node mounts, or a URI such
    as ``s3://bucket/prefix``), or the state folder, which only a one-machine cluster can use."""
    if storage:
        if "://" in storage:
            return storage
        path = Path(storage).expanduser().resolve()
        _check_writable(path)
        return str(path)
    if info.nodes > 1 or (info.address or "").startswith("ray://"):
        where = f"{info.nodes} nodes" if info.nodes > 1 else f"a remote cluster ({info.address})"
        raise ClusterError(
            f"this is {where}: trials elsewhere cannot write checkpoints to {default} on this machine; "
            f"pass --storage with a path every node mounts (NFS) or a bucket URI (s3://bucket/orch)"
        )
    return str(Path(default).resolve())


def _check_writable(path: Path) -> None:
    """--storage must be writable here too: the driver writes the experiment's state there."""
    from orchestrator.home import ensure_writable

    try:
        ensure_writable(path, what="--storage", fix="pass a writable --storage")
    except PermissionError as e:
        raise ClusterError(str(e)) from None


def shutdown(info: ClusterInfo | None) -> None:
    import ray

    if ray.is_initialized() and (info is None or info.started_here):
        ray.shutdown()


def gpu_budget(info: ClusterInfo, gpus: float | None) -> float:
    """``--gpus``, checked against the cluster; None means every GPU it has."""
    budget = info.gpus if gpus is None else gpus
    if budget > info.gpus + 1e-9:
        raise ClusterError(
            f"--gpus {budget:g} asks for more GPUs than the cluster has ({info.gpus:g}); "
            f"use --gpus {info.gpus:g} or fewer (0 runs on CPU)"
        )
    return budget


def plan_resources(info: ClusterInfo, *, gpus: float | None, gpus_per_trial: float | None,
                   cpus_per_trial: float) -> tuple[float, float, int]:
    """(gpus per trial, cpus per trial, concurrency) from the budget, checked against the cluster.

    ``gpus`` None means every GPU the cluster has; 0 runs on CPU.
    """
    budget = gpu_budget(info, gpus)
    if cpus_per_trial > info.cpus + 1e-9:
        raise ClusterError(
            f"--cpus-per-trial {cpus_per_trial:g} is more than the cluster's {info.cpus:g} CPUs; lower it"
        )
    if budget > 0:
        gpt = 1.0 if gpus_per_trial is None else gpus_per_trial
        if gpt > budget + 1e-9:
            raise ClusterError(f"--gpus-per-trial {gpt:g} is above the --gpus budget {budget:g}; lower it or raise --gpus")
        if gpt <= 0:
            raise ClusterError("--gpus-per-trial must be above 0 when GPUs are used; use --gpus 0 for CPU")
        concurrency = int(math.floor(budget / gpt + 1e-9))
    else:
        if gpus_per_trial:
            raise ClusterError("--gpus-per-trial needs a GPU budget; drop it or set --gpus")
        gpt = 0.0
        concurrency = max(1, int(math.floor(info.cpus / cpus_per_trial + 1e-9)))
    concurrency = min(concurrency, max(1, int(math.floor(info.cpus / cpus_per_trial + 1e-9))))
    return gpt, cpus_per_trial, concurrency


@dataclass(frozen=True)
class JobResources:
    workers: int  # data-parallel workers per job
    use_gpu: bool
    per_worker: dict  # Ray resources of one worker
    concurrency: int  # jobs at once


def plan_job_resources(info: ClusterInfo, *, gpus: float | None, workers: int, cpus_per_worker: float,
                       gpu_workers_asked: bool = False) -> JobResources:
    """Resources of the scale's Ray Train jobs, checked against the cluster.

    With a GPU budget (``gpus``; None means every GPU the cluster has) each job runs ``workers``
    workers of one GPU each, ``budget // workers`` jobs at once; with no GPUs each job runs
    ``workers`` CPU workers (gloo), as many jobs at once as the CPUs allow.
    """
    budget = gpu_budget(info, gpus)
    if 0 < budget < 1:
        raise ClusterError(f"--gpus {budget:g}: a Ray Train worker takes a whole GPU; use --gpus 1 or more, or 0 for CPU")
    if budget < 1 and gpu_workers_asked:
        raise ClusterError("--gpus-per-job needs GPUs, and this cluster (or --gpus) has none; use --workers-per-job")
    need = workers * cpus_per_worker
    if need > info.cpus + 1e-9:
        raise ClusterError(f"a job needs {need:g} CPUs ({workers} workers x --cpus-per-worker {cpus_per_worker:g}) "
                           f"but the cluster has {info.cpus:g}; use fewer workers per job or lower --cpus-per-worker")
    by_cpu = max(1, int(info.cpus // need))
    if budget >= 1:
        if workers > budget + 1e-9:
            raise ClusterError(f"--gpus-per-job {workers} is above the --gpus budget {budget:g}; "
                               f"lower it or raise --gpus")
        return JobResources(workers, True, {"CPU": cpus_per_worker, "GPU": 1}, min(int(budget // workers), by_cpu))
    return JobResources(workers, False, {"CPU": cpus_per_worker}, by_cpu)


def on_driver_node() -> dict:
    """Ray ``.options(...)`` that pin an actor or task to the driver's node. orch's small
    coordinators (the search's network registry, the scale's progress board and job tasks)
    must not live on a GPU node that may be lost or scaled away."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}
