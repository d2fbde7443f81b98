"""A real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``: a head and a node
on 127.0.0.1, each a real raylet, stopped by PID): `orch search --address` runs its trials on the
GPU node, and a trial whose node is lost is retried from its checkpoint once a node is back.
The GPUs are logical (declared, not physical): the one stand-in."""

import json
import os
import subprocess
import sys
import time

import pytest

from orchestrator.store import ResultsStore
from tests.conftest import TINY

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        yield c
    finally:
        c.shutdown()


def _orch(args, home, **kw):
    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_multi_node_search_runs_on_the_gpu_node_and_survives_losing_it(cluster, tmp_path):
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    home = tmp_path / "home"

    # without shared storage a multi-node cluster is refused before anything starts
    p = _orch(["search", "--address", cluster.address, "--gpus", "2", "--trials", "2", "--epochs", "1", *TINY], home)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 2 and "pass --storage" in err, err[-2000:]

    storage = tmp_path / "shared"
    p = _orch(["search", "--address", cluster.address, "--storage", str(storage), "--gpus", "2", "--trials", "2",
               "--epochs", "3", "--grace-epochs", "3", "--max-failures", "2", "--json", *TINY,
               "--synthetic-size", "256", "64"], home)
    store = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until a trial reported an epoch from the GPU node
            time.sleep(0.5)
            assert p.poll() is None, p.stderr.read()[-3000:]
            if not (home / "orch.db").exists():
                continue
            store = store or ResultsStore(f"sqlite:///{home / 'orch.db'}")
            searches = store.list_searches()
            trials = store.trials(searches[0].id) if searches else []
            if any(t.epochs_done >= 1 for t in trials):
                break
        else:
            pytest.fail("no trial reported in time")
        cluster.remove_node(gpu_node, allow_graceful=False)  # the GPU node is lost mid-trial
        time.sleep(2)
        new_node = cluster.add_node(num_cpus=2, num_gpus=2)  # ... and a node comes back
        out, err = p.communicate(timeout=400)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["status"] == "finished" and result["n_trials"] == 2
    trials = store.trials(result["search_id"])
    assert len(trials) == 2 and all(t.status == "finished" and t.epochs_done == 3 for t in trials)
    nodes = {h["node_id"] for t in trials for h in t.history}
    # every epoch ran on a GPU node (the head has none), some on the lost one, some on the new one
    assert nodes <= {gpu_node.node_id, new_node.node_id}
    assert gpu_node.node_id in nodes and new_node.node_id in nodes
    store.close()
