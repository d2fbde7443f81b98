"""A token-authenticated Ray cluster, as the deploy recipes start one (`ray start --head` with
RAY_AUTH_MODE=token and a token): `orch` without the token fails with one line that says what to
set; with it, a search runs there. The head runs on 127.0.0.1 in a temp folder of its own and is
stopped by PID (its processes are found by the session folder they hold open)."""

import os
import secrets
import subprocess
import sys

import pytest

from tests.conftest import TINY, started_head

pytestmark = pytest.mark.slow


@pytest.fixture
def token_head():
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    with started_head("--num-cpus=2", "--num-gpus=0", env=env) as address:
        yield address, token


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

    # a fixed cluster (started by hand: Ray's read-only autoscaler) is not asked to grow: a budget
    # above its GPUs is refused at once, as before autoscaling budgets
    res = _orch([*search[:3], "--gpus", "1", *search[5:]], tmp_path / "d", RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN=token)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert "more GPUs than the cluster has (0)" in errors[0] and "no autoscaler" in errors[0]
