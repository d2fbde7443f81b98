"""Shared fixtures: one real local Ray instance for the session (2 CPUs, 4 *logical* GPUs:
the only mock here is that no physical GPU exists; trials asking for one run on CPU)."""

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

#: A tiny synthetic task and one epoch keep a CPU search in CI to seconds per trial.
TINY = ["--synthetic-size", "128", "64", "--batch-size", "32"]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("ORCH_HOME", str(h))
    monkeypatch.delenv("ORCH_DB_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return h
