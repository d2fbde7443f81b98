"""Budgets an autoscaling cluster grows into (orchestrator/autoscale.py).

The cluster is Ray's own local autoscaling test cluster: `ray start --head --autoscaling-config`
with the fake multi-node provider (RAY_FAKE_CLUSTER=1), whose real v1 autoscaler adds and removes
worker nodes, each a real raylet on this machine with a fake GPU resource (no GPU exists here;
torch trains on the CPU). The head has no GPU; a node group "gpu" of 1-GPU nodes may grow to 2.
The cluster uses token authentication, as deploy/ starts one. The head runs on 127.0.0.1 in a
temp folder of its own and is stopped by PID, with every node the autoscaler started (they hold
that folder open)."""

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from orchestrator import autoscale
from tests.conftest import TINY, _free_port, started_head

pytestmark = pytest.mark.slow

MAX_GPU_NODES = 2


def _config(gcs: str) -> dict:
    return {
        "cluster_name": "orch-test", "max_workers": MAX_GPU_NODES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": MAX_GPU_NODES}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,  # the nodes stay while the test runs
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


#: The cluster is token-authenticated, as deploy/ starts one; every process here sends the token.
TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return env | TOKEN | extra


@pytest.fixture
def autoscaling_head(tmp_path):
    port = _free_port()
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(_config(f"127.0.0.1:{port}")))
    env = _env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0")
    with started_head("--num-cpus=2", "--num-gpus=0", f"--autoscaling-config={config}", env=env, port=port) as address:
        yield address


def _orch(args, home):
    env = _env(ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                          text=True, timeout=400)


def error_line(res) -> str:
    """The one `Error: …` line of a failed `orch` process."""
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def _cluster(address: str) -> dict:
    """What the GCS says, from a process of its own: the GPU nodes alive, and the autoscaler's
    current request_resources demand."""
    code = (
        "import json, ray\n"
        "from orchestrator import autoscale\n"
        f"ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR')\n"
        "print(json.dumps({'gpu_nodes': sorted(n['NodeID'] for n in ray.nodes() if n['Alive'] "
        "and n['Resources'].get('GPU')), 'requested': autoscale.read_report().requested_gpus}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _requested_after_withdrawal(address: str) -> float:
    """The demand the autoscaler reports once it has read the withdrawal (a report or two later)."""
    for _ in range(10):
        requested = _cluster(address)["requested"]
        if not requested:
            return requested
        time.sleep(1)
    return requested


def test_a_budget_above_the_gpus_up_grows_the_cluster(autoscaling_head, tmp_path):
    address = autoscaling_head
    storage = tmp_path / "shared"  # every fake node is on this machine
    common = ["--address", address, "--storage", str(storage), "--json"]
    assert _cluster(address)["gpu_nodes"] == []

    # The wait ends before the nodes are up: one line that says what to raise; the request is withdrawn
    res = _orch(["search", "--gpus", "2", "--wait-for-resources", "0", "--trials", "1", "--epochs", "1", *TINY,
                 *common], tmp_path / "a")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "--wait-for-resources" in error_line(res) and "--gpus 2" in error_line(res)
    assert _requested_after_withdrawal(address) == 0

    # The search: 2 GPUs asked with none up; the autoscaler adds the nodes and the trials run there
    res = _orch(["search", "--gpus", "2", "--trials", "2", "--epochs", "1", *TINY, *common], tmp_path / "b")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "asking the cluster's autoscaler for 2 GPUs (0 up now)" in res.stderr
    out = json.loads(res.stdout)
    assert out["status"] == "finished" and out["n_trials"] == 2
    gpu_nodes = _cluster(address)["gpu_nodes"]
    assert len(gpu_nodes) == MAX_GPU_NODES
    from orchestrator.store import ResultsStore

    store = ResultsStore(f"sqlite:///{tmp_path / 'b' / 'orch.db'}")
    trials = store.trials(out["search_id"])
    nodes = {h["node_id"] for t in trials for h in t.history}
    store.close()
    assert nodes and nodes <= set(gpu_nodes), (nodes, gpu_nodes)  # the head has no GPU: it ran none
    assert _requested_after_withdrawal(address) == 0

    # Above what the autoscaler may add: it adds nothing more, and the wait ends in one line
    res = _orch(["search", "--gpus", "3", "--trials", "1", "--epochs", "1", *TINY, *common], tmp_path / "c")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "stopped at 2 GPUs, its maximum" in error_line(res) and "--gpus 2 or fewer" in error_line(res)
    assert _requested_after_withdrawal(address) == 0
    # a scale's budget grows the same way (and stops at the same maximum)
    res = _orch(["scale", "--from-run", out["search_id"], "--phis", "1", "--no-baseline", "--epochs", "1",
                 "--gpus", "3", *common], tmp_path / "b")
    assert res.returncode == 2 and "asking the cluster's autoscaler for 3 GPUs (2 up now)" in res.stderr
    assert "stopped at 2 GPUs, its maximum" in error_line(res)
    assert _requested_after_withdrawal(address) == 0


# --------------------------------------------------------------------------- the wait, on reports
# Reports as Ray 2.60's v1 monitor wrote them on the cluster above (trimmed to what is read).

def _v1(types: dict, launches: dict | None = None, pending: list | None = None, demand: list | None = None,
        at: float = 1.0) -> str:
    return json.dumps({"time": at, "autoscaler_report": {
        "active_nodes": {}, "pending_nodes": pending or [], "pending_launches": launches or {}, "failed_nodes": [],
        "node_type_mapping": types, "legacy": True}, "load_metrics_report": {"request_demand": demand or []}})


def test_reports_tell_a_fixed_cluster_from_one_that_grows():
    head = "30a534be71677121e264c2d74492ec691c3dabf1f5877a588f7d0fd8"
    fixed = autoscale.report_of_v1(_v1({head: f"node_{head}"}))  # `ray start` by hand: read-only
    assert not fixed.can_grow
    grows = autoscale.report_of_v1(_v1({head: "ray.head.default"}, launches={"gpu": 2},
                                       demand=[[{"GPU": 1}, 3]]))
    assert grows.can_grow and grows.starting == 2 and grows.requested_gpus == 3


def test_the_wait_ends_when_the_autoscaler_stops_short():
    reports = iter(autoscale.report_of_v1(_v1({"h": "head"}, demand=[[{"GPU": 1}, 4]], at=i)) for i in range(100))
    calls = []
    with pytest.raises(autoscale.GrowthError, match="stopped at 2 GPUs"):
        autoscale.grow(4, wait_s=60, read=lambda: next(reports), gpus=lambda: 2.0, request=calls.append, poll_s=0)
    assert calls == [[{"GPU": 1}] * 4, []]  # asked, then withdrawn


def test_nodes_still_starting_are_waited_for_until_the_deadline():
    calls = []
    report = autoscale.report_of_v1(_v1({"h": "head"}, pending=[["ip", "gpu", "setting-up"]], demand=[[{"GPU": 1}, 2]]))
    with pytest.raises(autoscale.GrowthError, match="1 nodes still starting") as e:
        autoscale.grow(1.5, wait_s=0.05, read=lambda: report, gpus=lambda: 0.0, request=calls.append, poll_s=0.01)
    assert e.value.param == "--wait-for-resources" and not e.value.usage
    assert calls == [[{"GPU": 1}] * 2, []]
