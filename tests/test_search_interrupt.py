"""Ctrl-C on `orch search`: runs ended cleanly, the search marked interrupted, nothing RUNNING,
no process left."""

import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.store import ResultsStore
from tests.conftest import TINY
from tests.procnet import alive, descendants

pytestmark = pytest.mark.slow


def test_sigint_marks_search_interrupted_and_ends_runs(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "search", "--gpus", "0", "--trials", "30", "--epochs", "3",
         "--grace-epochs", "3", "--json", *TINY],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        reported = False
        while time.monotonic() < deadline and not reported:
            time.sleep(1.0)
            assert proc.poll() is None, proc.stderr.read()
            db = home / "orch.db"
            if db.exists():
                store = ResultsStore(f"sqlite:///{db}")
                searches = store.list_searches()
                reported = bool(searches) and any(t.epochs_done >= 1 for t in store.trials(searches[0].id))
                store.close()
        assert reported, "no trial reported in time"
        pids = descendants(proc.pid)  # the driver, Ray's processes, the trials
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    deadline = time.monotonic() + 15
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert alive(pids) == []  # nothing it started outlives it
    assert "continue it with: orch search --resume search-" in err

    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    (search,) = store.list_searches()
    assert search.status == "interrupted"
    trials = store.trials(search.id)
    assert trials and all(t.status != "running" for t in trials)
    assert len(trials) < 30

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("compound-scaling")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == len(trials) + 1
    assert all(r.info.status != "RUNNING" for r in runs)
    assert client.get_run(search.mlflow_run_id).info.status == "KILLED"
