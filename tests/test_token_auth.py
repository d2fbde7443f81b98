"""A token-authenticated Ray cluster, as the deploy recipes start one (`ray start --head` with
RAY_AUTH_MODE=token and a token): `orch` without the token fails with one line that says what to
set; with it, a search runs there. The head runs on 127.0.0.1 in a temp folder of its own and is
stopped by PID (its processes are found by the session folder they hold open)."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from orchestrator.cluster import _owned_processes
from tests.conftest import TINY, _free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def token_head():
    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths allow a short folder only
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", token
    finally:
        for _ in range(3):  # every process of this head, by PID (not `ray stop`: it stops every Ray here)
            pids = [pid for pid, _ in _owned_processes(temp)]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.5)
        shutil.rmtree(temp, ignore_errors=True)


def _orch(args, home, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    full |= {"ORCH_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(home)} | env  # no ~/.ray token
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=full, capture_output=True,
                          text=True, timeout=300)


def test_orch_on_a_token_authenticated_cluster(token_head, tmp_path):
    address, token = token_head
    search = ["search", "--address", address, "--gpus", "0", "--trials", "1", "--epochs", "1", *TINY, "--json"]

    # no token at all: one line that says what to set, before anything is recorded
    res = _orch(search, tmp_path / "a")
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "token" in errors[0] and "RAY_AUTH_TOKEN" in errors[0] and "RAY_AUTH_MODE=token" in errors[0]
    # a wrong token: the same
    res = _orch(search, tmp_path / "b", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert res.returncode == 2 and len(errors) == 1 and "RAY_AUTH_TOKEN" in errors[0], res.stderr[-3000:]

    # the cluster's token, as the recipes hand it over: the search runs there
    res = _orch(search, tmp_path / "c", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"status": "finished"' in res.stdout
