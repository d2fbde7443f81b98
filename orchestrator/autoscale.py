"""Budgets a cluster grows into: ``--gpus`` above the GPUs that are up now, on a cluster whose
autoscaler can add nodes (KubeRay with ``enableInTreeAutoscaling``, the cluster launcher).

orch asks Ray's autoscaler for the budget with ``ray.autoscaler.sdk.request_resources`` (one
1-GPU bundle per GPU: the size the whole cluster must reach, not an addition), waits until the
GPUs are up, and then withdraws the request: from there on Tune's and Ray Train's own demand
keeps the nodes busy, and a request left behind by a killed driver would keep nodes up for
nothing. The request is the cluster's one request (a later ``request_resources`` replaces it).

What the autoscaler is doing is read from its report in the GCS: the JSON the v1 monitor writes
(``ray status`` reads the same), or ``get_cluster_status`` for autoscaler v2. A cluster with no
autoscaler, or with Ray's read-only one (a cluster started by hand with ``ray start``: its node
types are named after its nodes), is fixed: the budget is checked against what is up, as before.

The wait ends with a one-line error when
- the autoscaler saw the request and, for ``STALL_REPORTS`` fresh reports in a row, has no node
  launching or starting while the GPUs are still short: the cluster is at its maximum (or the
  cloud has no capacity: failed launches are named);
- ``wait_s`` passes first.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable

from orchestrator.errors import InputError

#: Fresh autoscaler reports in a row with nothing starting before a short cluster counts as full.
STALL_REPORTS = 3
#: --wait-for-resources default: cloud GPU nodes take minutes to boot and pull an image.
DEFAULT_WAIT_S = 600.0


class GrowthError(InputError):
    """The cluster did not grow to the budget; the message says why and what to do."""


@dataclass(frozen=True)
class Report:
    """One report of the cluster's autoscaler."""

    version: object  # changes with every report the autoscaler writes
    can_grow: bool  # False: Ray's read-only autoscaler (a fixed cluster)
    starting: int  # nodes being launched or starting
    failed: tuple[str, ...]  # node types (and why) whose launch failed
    requested_gpus: float  # GPUs of the request_resources bundles the autoscaler has seen


@dataclass(frozen=True)
class Waiting:
    """What ``on_wait`` is shown while the cluster grows."""

    want: float
    up: float
    starting: int
    elapsed_s: float


def _readonly(types: dict) -> bool:
    """Ray's read-only autoscaler names each node's type after the node (``node_<id>``)."""
    return bool(types) and all(t == f"node_{n}" for n, t in types.items())


def report_of_v1(raw: bytes | str) -> Report:
    """The v1 monitor's report (``__autoscaling_status`` in the GCS)."""
    st = json.loads(raw)
    r = st.get("autoscaler_report") or {}
    lm = st.get("load_metrics_report") or {}
    types = r.get("node_type_mapping") or {}
    return Report(
        version=st.get("time"),
        can_grow=bool(types) and not _readonly(types),
        starting=sum((r.get("pending_launches") or {}).values()) + len(r.get("pending_nodes") or []),
        failed=tuple(str(t) for _, t in (r.get("failed_nodes") or [])),
        requested_gpus=sum(float(b.get("GPU", 0)) * n for b, n in (lm.get("request_demand") or [])),
    )


def report_of_v2(status) -> Report:
    """Autoscaler v2's ``ClusterStatus``."""
    nodes = list(status.active_nodes) + list(status.idle_nodes)
    types = {n.node_id: n.ray_node_type_name for n in nodes if n.node_id}
    demand = status.resource_demands.cluster_constraint_demand
    return Report(
        version=status.stats.autoscaler_version,
        can_grow=bool(types) and not _readonly(types),
        starting=sum(r.count for r in status.pending_launches) + len(status.pending_nodes),
        failed=tuple(f"{r.ray_node_type_name} ({r.details})" if r.details else r.ray_node_type_name
                     for r in status.failed_launches),
        requested_gpus=sum(float(b.bundle.get("GPU", 0)) * b.count for d in demand for b in d.bundles_by_count),
    )


def read_report() -> Report | None:
    """The connected cluster's autoscaler report; None when no autoscaler reports."""
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status

        return report_of_v2(get_cluster_status(ray.get_runtime_context().gcs_address))
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return report_of_v1(raw) if raw else None


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def can_grow() -> bool:
    """The connected cluster has an autoscaler that can add nodes (one whose report cannot be
    read counts as none: the budget is then checked against what is up)."""
    try:
        r = read_report()
    except Exception:  # noqa: BLE001 - Ray's internals changed or the GCS is not reachable from here
        return False
    return r is not None and r.can_grow


def grow(want: float, *, wait_s: float, on_wait: Callable[[Waiting], None] | None = None,
         read: Callable[[], Report | None] = read_report, gpus: Callable[[], float] = cluster_gpus,
         request: Callable[[list], None] | None = None, poll_s: float = 1.0) -> float:
    """Ask the autoscaler for ``want`` GPUs and wait until they are up; returns the GPUs up.

    The caller checked that the cluster can grow (``can_grow``). Raises GrowthError when the
    autoscaler stops short of ``want`` or ``wait_s`` passes; the request is withdrawn however
    the wait ends (Ctrl-C included)."""
    if request is None:
        from ray.autoscaler.sdk import request_resources

        def request(bundles):
            request_resources(bundles=bundles)

    t0 = time.monotonic()
    request([{"GPU": 1}] * math.ceil(want - 1e-9))
    try:
        seen, stalled, last = False, 0, object()
        while True:
            up = gpus()
            if up >= want - 1e-9:
                return up
            r = read()
            elapsed = time.monotonic() - t0
            if on_wait is not None:
                on_wait(Waiting(want, up, r.starting if r else 0, elapsed))
            if r is not None and r.version != last:
                last = r.version
                seen = seen or r.requested_gpus >= want - 1e-9
                stalled = stalled + 1 if seen and r.starting == 0 else 0
                if stalled >= STALL_REPORTS:
                    failed = f"; failed launches: {', '.join(sorted(set(r.failed)))}" if r.failed else ""
                    raise GrowthError(
                        f"--gpus {want:g}: the autoscaler added what it could and stopped at {up:g} GPUs, its "
                        f"maximum{failed}; use --gpus {up:g} or fewer, or raise the node groups' maximum "
                        f"(`ray status` shows them)", param="--gpus")
            if elapsed >= wait_s:
                raise GrowthError(
                    f"--gpus {want:g}: {up:g} GPUs were up after waiting {wait_s:g} s for the autoscaler "
                    f"({r.starting if r else 0} nodes still starting); raise --wait-for-resources or lower --gpus",
                    param="--wait-for-resources", usage=False)
            time.sleep(poll_s)
    finally:
        try:
            request([])
        except Exception:  # noqa: BLE001 - the connection went: nothing is left to withdraw through it
            pass
