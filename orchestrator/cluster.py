"""Connecting to Ray: an embedded local instance by default, or a running cluster."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import InputError


class ClusterError(InputError):
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
    # An infeasible candidate's trial ends without a report (space.py): Tune's strict check
    # would fail the search on its empty final result. ASHA skips results without the metric,
    # OptunaSearch records them as pruned (with the constraint), and every report orch's
    # trainables make carries val_top1.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray Train polls its workers this often; the default 2 s adds up to 2 s to every report
    # and to the end of every job.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def connect(address: str | None = None, *, num_cpus: int | None = None, home: Path | None = None) -> ClusterInfo:
    """Connect (or reuse an initialised Ray). ``address`` may be ``auto``, ``host:port`` or
    ``ray://host:10001``; without one, an embedded local instance starts that stays on this
    machine (see ``local_only``), keeping its session folders and token in the state folder
    ``home`` (default: ORCH_HOME)."""
    import sys

    _quiet_env()
    fresh = "ray" not in sys.modules
    if not address and (fresh or not sys.modules["ray"].is_initialized()):
        from orchestrator.home import home_dir

        temp = local_only(home or home_dir())  # before Ray reads its settings
        if not fresh:  # Ray was imported already: have it read them again
            _reload_ray_auth()
    import ray

    started = False
    if address and not ray.is_initialized():
        _check_reachable(address)
        refused = _token_refused(address)
        if refused:  # at once: Ray itself retries for about 20 s, then says only "failed to connect"
            raise ClusterError(_token_message(address, refused))
    if not ray.is_initialized():
        kwargs = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True,
                      include_dashboard=False)
        try:
            if address:
                ray.init(address=address, **kwargs)
                private_token(None)
                warn_if_exposed(address)
            else:
                ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", _temp_dir=temp, **kwargs)
                started = True
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as e:
            where = address or "a local Ray instance"
            if address and _refused_for_token(e):
                raise ClusterError(_token_message(
                    address, "a token it does not accept" if _token_auth() else "no token")) from None
            raise ClusterError(f"cannot connect to Ray at {where}: {str(e).splitlines()[0]}") from None
    sigterm_as_ctrl_c(force=True)  # ray.init put in Ray's own handler, which just exits
    return _info_now(address, started)


def _info_now(address: str | None, started: bool) -> ClusterInfo:
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(float(res.get("CPU", 0)), float(res.get("GPU", 0)), address, started, max(1, nodes))


def grow_for(info: ClusterInfo, gpus: float | None, *, wait_s: float, on_wait=None, on_start=None) -> ClusterInfo:
    """The cluster with the ``--gpus`` budget up. As it is when it has the GPUs already, when no
    budget is given, or when it cannot grow (no --address: the embedded instance; a fixed cluster:
    ``gpu_budget`` then says it is too small). Else its autoscaler is asked for them and this
    waits (``orchestrator.autoscale.grow``): ``on_start(want, up)`` once, ``on_wait`` each second."""
    from orchestrator import autoscale

    if gpus is None or gpus <= info.gpus + 1e-9 or info.started_here or not info.address or not autoscale.can_grow():
        return info
    if on_start is not None:
        on_start(gpus, info.gpus)
    autoscale.grow(gpus, wait_s=wait_s, on_wait=on_wait)
    return _info_now(info.address, info.started_here)


# --------------------------------------------------------------------------- the embedded instance
#
# What orch starts on a workstation stays on it (measured with tests/test_local_only.py, every
# listening socket of every process of a running search and scale):
# - RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's own local-only mode (its default on macOS and
#   Windows): the node's address is 127.0.0.1 (`_node_ip_address` alone is turned into the
#   host's address), so the GCS, the raylet and object manager, every core worker, the dashboard
#   agent, the runtime-env agent and the metrics exporters bind 127.0.0.1 instead of all
#   interfaces. Set for this process and inherited by every Ray process it starts; never for
#   a driver of a real cluster (--address), where the node must be reachable.
# - include_dashboard=False: no dashboard head (the job API is not needed on a workstation).
# - Ray's temp/session folder is <state folder>/ray-local/tmp (ray-local owner-only) instead of
#   /tmp/ray (world-writable, shared by everyone); what dead drivers left is stopped and capped.
# - Token authentication stays on; the token is <state folder>/ray-auth-token, created 0600,
#   instead of ~/.ray/auth_token, which Ray creates world-readable.

#: Ray puts unix sockets in its session folder and their paths may not exceed 107 bytes:
#: "<temp>/session_<26-char date>_<pid, ≤7>/sockets/plasma_store" leaves 43 for <temp>.
RAY_TEMP_MAX = 43
#: Session folders of dead drivers kept (their logs), newest first; older ones are removed.
KEEP_SESSIONS = 3


def local_only(home: Path) -> str:
    """Prepare this process to start an embedded Ray instance that stays on this machine:
    loopback-only mode, a private temp folder (returned, for ``ray.init(_temp_dir=…)``), an
    owner-only token, and what a dead driver left there stopped and removed."""
    import os
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported already; Ray's address lookup reads it at call time
        constants.ENABLE_RAY_CLUSTER = False
    temp = ray_temp(home)
    reap_dead_sessions(temp)
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH") \
            and os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(_new_token(home / "ray-auth-token"))
    private_token(None)
    return temp


def _reload_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE and its token when first imported; after ``local_only`` changed
    them in a process that had imported Ray, it reads them again (as Ray's own
    ``_enable_token_auth`` does)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # pragma: no cover - a Ray without token auth
        pass


def _new_token(path: Path) -> Path:
    """The embedded instance's token file, created owner-only (never readable by others, not
    even for a moment) and whole: written under a private name, then linked into place, so an
    orch starting at the same moment never reads a half-written token (it uses the first)."""
    import os
    import secrets

    if path.exists():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # atomic, and fails if another orch got there first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path


def private_token(path: Path | None) -> None:
    """Make the token file Ray reads (``path``, else RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
    owner-only if it is ours and readable by others; says so once. Its content is never read."""
    import os
    import stat
    import sys

    path = path or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        st = path.stat()
    except OSError:
        return
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o600)
        print(f"orch: made the Ray token {path} owner-only (it was {stat.S_IMODE(st.st_mode):04o})",
              file=sys.stderr)


def ray_temp(home: Path) -> str:
    """Ray's temp folder for the embedded instance: <home>/ray-local/tmp. Ray makes its temp and
    session folders world-writable (0777) whenever it creates one, so the folder above it,
    ray-local, is owner-only: no one else can reach inside. Where the path is too long for
    Ray's unix sockets (RAY_TEMP_MAX), Ray is handed a short alias to it inside an owner-only
    /tmp/orch-<uid>: the sessions still live in the state folder."""
    import os
    import stat

    private = home / "ray-local"
    real = private / "tmp"
    try:
        private.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(private, 0o700)
        real.mkdir(exist_ok=True)
    except OSError as e:
        raise ClusterError(f"cannot create Ray's folder {real} ({e.strerror}); set ORCH_HOME to a writable folder") from None
    if len(str(real)) <= RAY_TEMP_MAX:
        return str(real)
    alias = _alias(real)
    base = alias.parent
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError as e:
        raise ClusterError(f"cannot create {base} ({e.strerror}) for Ray's sockets; set TMPDIR to a writable folder") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ClusterError(f"{base} is not a folder of yours (a link, or another user's); remove it, or set TMPDIR")
    os.chmod(base, 0o700)
    if not (alias.is_symlink() and os.readlink(alias) == str(real)):
        tmp = base / f".{alias.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(real)
        os.replace(tmp, alias)
    return str(alias)


def _alias(real: Path) -> Path:
    """The short name Ray is given for a state folder's ray-local/tmp whose path is too long."""
    import hashlib
    import os
    import tempfile

    return Path(tempfile.gettempdir()) / f"orch-{os.getuid()}" / hashlib.sha256(str(real).encode()).hexdigest()[:12]


def reap_state_folder(home: Path) -> list[int]:
    """``reap_dead_sessions`` for the embedded instances of a state folder, if it has any; what
    every orch command that opens the state folder does first."""
    real = home / "ray-local" / "tmp"
    if not real.is_dir():
        return []
    if len(str(real)) <= RAY_TEMP_MAX:
        return reap_dead_sessions(str(real))
    return reap_dead_sessions(str(_alias(real)))


def reap_dead_sessions(temp: str) -> list[int]:
    """Stop what embedded instances of dead orch drivers left running (a SIGKILLed driver's Ray
    processes: agents and workers outlive it) and keep only the newest KEEP_SESSIONS of their
    session folders. Instances of live drivers (concurrent orch processes) are left alone.
    Returns the pids stopped."""
    import os
    import shutil
    import signal

    killed = []
    for pid, owner in _owned_processes(temp):
        if owner != os.getpid() and not _alive(owner):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    dead = []
    for d in Path(temp).glob("session_*"):
        if d.is_symlink() or not d.is_dir():
            continue
        tail = d.name.rsplit("_", 1)[-1]
        if tail.isdigit() and int(tail) != os.getpid() and not _alive(int(tail)):
            dead.append(d)
    for d in sorted(dead, key=lambda p: p.name, reverse=True)[KEEP_SESSIONS:]:
        shutil.rmtree(d, ignore_errors=True)
    return killed


def _owned_processes(temp: str):
    """(pid, driver pid) of this user's processes of the embedded instances in ``temp``: each
    Ray process keeps its log files open in its session folder, session_<date>_<driver pid>
    (Ray renames its processes and gives its agents a filtered environment; the open logs stay)."""
    import os

    root = os.path.realpath(temp) + os.sep
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(root + "session_"):
                tail = target[len(root):].split(os.sep, 1)[0].rsplit("_", 1)[-1]
                if tail.isdigit():
                    yield int(entry), int(tail)
                    break


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def warn_if_exposed(address: str) -> None:
    """One line when the cluster orch connected to is not on this machine and this connection
    is not token-authenticated (anyone who can reach it can run code there). Changes nothing."""
    import ipaddress
    import socket
    import sys

    import ray

    gcs = address
    if address == "auto" and ray.is_initialized():  # the cluster Ray found: its own address
        try:
            gcs = ray.get_runtime_context().gcs_address or address
        except Exception:  # noqa: BLE001 - e.g. a Ray Client connection: judge the address given
            pass
    host = gcs.split("://")[-1].rpartition(":")[0] or gcs
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host.strip("[]"))).is_loopback
    except (OSError, ValueError):
        loopback = False
    if not loopback and not _token_auth():
        print(f"orch: warning: Ray at {gcs} is not on this machine and this connection is not token-"
              f"authenticated: anyone who can reach it can run code on it. Start the cluster with "
              f"RAY_AUTH_MODE=token (deploy/README.md) and set RAY_AUTH_MODE=token here", file=sys.stderr)


def _token_message(address: str, sent: str) -> str:
    return (f"Ray at {address} refused this driver: it uses token authentication and this driver sent {sent}; "
            f"set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file "
            f"holding it; deploy/README.md says where each recipe keeps it)")


def _token_refused(address: str) -> str | None:
    """Ask the head's GCS once, with what this driver would send, whether it lets this driver in:
    None if it does (or the question cannot be asked: ``auto``, a ``ray://`` client address),
    else what was sent ("no token", "a token it does not accept")."""
    if address == "auto" or "://" in address:
        return None
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata: tuple = ()
    if _token_auth():
        try:  # the header Ray's own client interceptor adds (Ray is pinned; see pyproject.toml)
            from ray._private.authentication.grpc_authentication_client_interceptor import (
                _get_authentication_metadata_tuple,
            )

            metadata = tuple(_get_authentication_metadata_tuple())
        except Exception:  # noqa: BLE001 - token mode with no token found: nothing to send
            metadata = ()
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return "a token it does not accept" if metadata else "no token"
    return None


def _refused_for_token(e: BaseException) -> bool:
    """Whether connecting failed on the cluster's token check (a missing or wrong token)."""
    import ray

    text = str(e).lower()
    return isinstance(e, ray.exceptions.AuthenticationError) or "authentication token" in text \
        or "unauthenticated" in text


def _token_auth() -> bool:
    """Whether this driver's connection sends a token (Ray decides it at ray.init: RAY_AUTH_MODE,
    or a token found where Ray looks)."""
    import os

    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return get_authentication_mode() == AuthenticationMode.TOKEN
    except ImportError:  # pragma: no cover - a Ray without token auth
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


#: How long an unreachable head may keep `orch` waiting (ray.init itself retries for minutes).
CONNECT_TIMEOUT_S = 5.0


def _as_ctrl_c(signum, frame) -> None:
    import signal

    signal.raise_signal(signal.SIGINT)


def sigterm_as_ctrl_c(force: bool = False) -> None:
    """SIGTERM (a scheduler's stop, `kill`) ends a command the way Ctrl-C does: runs ended, the
    local Ray instance and any server orch started shut down, nothing left running. ``force``:
    also over a handler someone else installed (Ray's, which exits on the spot)."""
    import signal

    try:
        if force or signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _as_ctrl_c)
    except ValueError:  # not the main thread
        pass


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


def beyond_this_machine(nodes: int, address: str | None) -> str | None:
    """How to name a cluster whose trials may run off this machine ('3 nodes', 'a remote cluster
    (ray://…)'), or None for this machine alone: what lies only here is out of their reach."""
    if nodes > 1:
        return f"{nodes} nodes"
    if (address or "").startswith("ray://"):
        return f"a remote cluster ({address})"
    return None


def resolve_storage(info: ClusterInfo, storage: str | None, default: "os.PathLike") -> str:
    """Where Tune/Train write checkpoints: ``storage`` (a path every node mounts, or a URI such
    as ``s3://bucket/prefix``), or the state folder, which only a one-machine cluster can use."""
    if storage:
        if "://" in storage:
            return storage
        path = Path(storage).expanduser().resolve()
        _check_writable(path)
        return str(path)
    where = beyond_this_machine(info.nodes, info.address)
    if where is not None:
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
            f"--gpus {budget:g} asks for more GPUs than the cluster has ({info.gpus:g}) and it has no "
            f"autoscaler that can add nodes; use --gpus {info.gpus:g} or fewer (0 runs on CPU)"
        )
    return budget


#: Proxy trials packed per GPU by default, where measured: B0-sized trials at 128 px, batch 64,
#: eager, on an H200 (benchmarks/compile_gpu.py, README "Packed proxy trials"): 1, 2, 4 and 8
#: per GPU trained 1,847, 3,384, 6,986 and 7,013 images/s together; 4 fill the GPU.
PACK_MEASURED = (128, 4)


def default_gpus_per_trial(base_resolution: int) -> float:
    """``--gpus-per-trial`` when not given: as many trials per GPU as keep the pixels in flight at
    the measured saturation point (4 trials at 128 px), 1 to 8, a power of two: 8 below 91 px,
    4 up to 128, 2 up to 181, 1 above (a B0 trial at 224 px fills most of a GPU on its own)."""
    res, per_gpu = PACK_MEASURED
    k = max(1, min(8, per_gpu * (res / max(1, base_resolution)) ** 2))
    return 1.0 / 2 ** int(math.floor(math.log2(k) + 1e-9))


def plan_resources(info: ClusterInfo, *, gpus: float | None, gpus_per_trial: float | None,
                   cpus_per_trial: float, base_resolution: int | None = None) -> tuple[float, float, int]:
    """(gpus per trial, cpus per trial, concurrency) from the budget, checked against the cluster.

    ``gpus`` None means every GPU the cluster has; 0 runs on CPU. ``gpus_per_trial`` None: packed
    by ``base_resolution`` (``default_gpus_per_trial``), 1 when that is not given.
    """
    budget = gpu_budget(info, gpus)
    if cpus_per_trial > info.cpus + 1e-9:
        raise ClusterError(
            f"--cpus-per-trial {cpus_per_trial:g} is more than the cluster's {info.cpus:g} CPUs; lower it"
        )
    if budget > 0:
        if gpus_per_trial is not None:
            gpt = gpus_per_trial
        else:
            gpt = min(budget, default_gpus_per_trial(base_resolution)) if base_resolution else 1.0
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
