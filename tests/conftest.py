"""Shared fixtures: one real local Ray instance for the session (2 CPUs, 4 *logical* GPUs:
the only mock here is that no physical GPU exists; trials asking for one run on CPU)."""

import contextlib
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# `--compile on` in the tests' searches and scales: Dynamo's aot_eager backend (traced and
# partitioned like Inductor's graphs, no generated kernels: seconds on a CPU). tests/test_compile.py
# runs Inductor itself, in subprocesses.
os.environ.setdefault("ORCH_COMPILE_BACKEND", "aot_eager")

#: A tiny synthetic task at base 32 and one epoch keep a CPU search in CI to seconds per trial; no
#: confirmation phase unless a test is about it (then its own --confirm-top comes after TINY).
TINY = ["--synthetic-size", "128", "64", "--batch-size", "32", "--base-resolution", "32", "--confirm-top", "0"]


def error_line(res) -> str:
    """The one `Error: …` line of a failed CliRunner result (and no traceback)."""
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Trials' dataset tiers (workers/tiers.py) go to a folder of this test run, shared by its
    tests and their subprocesses, not to ~/.cache/orch."""
    d = tmp_path_factory.mktemp("tiers")
    os.environ["ORCH_DATA_CACHE"] = str(d)
    os.environ["ORCH_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("compiled"))  # likewise compiled graphs
    os.environ["ORCH_PREPARED_CACHE"] = str(tmp_path_factory.mktemp("prepared"))  # image folders' preparations
    os.environ["ORCH_SHARD_CACHE"] = str(tmp_path_factory.mktemp("shards"))  # nodes' copies of remote datasets
    yield d


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the in-process tests, with 4 fake GPUs. Its token is an owner-only file
    of its own, as orch's embedded instance has: left to itself, ray.init would write
    ~/.ray/auth_token (world-readable) into the home of whoever runs the tests, and a head
    started later with `ray start` would pick that token up."""
    import ray

    from orchestrator.cluster import _new_token, _reload_ray_auth

    token = _new_token(tmp_path_factory.mktemp("ray-session") / "ray-auth-token")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    _reload_ray_auth()
    try:
        ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)
    finally:  # the processes it started have it; later subprocesses of the tests do not inherit it
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_head(*args: str, env: dict, port: int | None = None):
    """`ray start --head` on 127.0.0.1 (``port``, default a free one) in a temp folder of its own,
    with ``args``; yields its address. Stopped by PID: every process that holds the folder open,
    the nodes an autoscaler started included (not `ray stop`: it stops every Ray on the machine)."""
    from orchestrator.cluster import _owned_processes

    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths allow a short folder only
    port = port or _free_port()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats", *args],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        for _ in range(5):
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


PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture
def createdb():
    """Fresh PostgreSQL databases on 127.0.0.1:5432, made and dropped with the client tools
    (as deploy/README.md's native recipe does); returns a factory of SQLAlchemy URLs."""
    names = []

    def make(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", name], check=True)
        names.append(name)
        return f"{PG}/{name}"

    yield make
    for name in names:
        subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force", "--if-exists", name], check=False)


@pytest.fixture
def mlflow_server(tmp_path, createdb):
    """A real tracking server on 127.0.0.1 with a PostgreSQL backend and proxied artifacts,
    started as deploy/README.md's native recipe says, and stopped by PID."""
    import urllib.request

    port = _free_port()
    d = tmp_path / "mlflow-server"
    d.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", createdb("orch_test_mlflow"),
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def private_postgres():
    """A PostgreSQL server of the test's own (initdb into a temporary folder, 127.0.0.1, a free
    port), so a test can stop and start it without touching the shared one; stopped by the PID
    in its postmaster.pid. As root, the server runs as the `postgres` user (it refuses root)."""
    import glob
    import shutil
    import tempfile

    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1] if glob.glob("/usr/lib/postgresql/*/bin") \
        else os.path.dirname(shutil.which("initdb") or "")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="orch-pg-", dir="/tmp")
    os.chmod(root, 0o777)
    data, port = os.path.join(root, "data"), _free_port()
    subprocess.run([*as_pg, f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    class Server:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

        def start(self):
            subprocess.run([*as_pg, f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
                            f"-p {port} -c listen_addresses=127.0.0.1 -k {root}", "start"],
                           check=True, stdout=subprocess.DEVNULL)

        def stop(self):
            subprocess.run([*as_pg, f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
                           check=True, stdout=subprocess.DEVNULL)

        def pid(self):
            try:
                with open(os.path.join(data, "postmaster.pid")) as f:
                    return int(f.readline())
            except (OSError, ValueError):
                return None

    server = Server()
    server.start()
    try:
        yield server
    finally:
        pid = server.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs (size in MB, optionally read-only) and unmount it after the test: a
    full disk and a read-only folder, for real. Needs the right to mount (root, as on this
    project's machines and CI)."""
    mounts = []

    def mount(size_mb: int, read_only: bool = False):
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        opts = f"size={size_mb}m" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        # This project's machines and CI run as root and can mount; elsewhere this fails loudly
        # rather than skipping, so the full-disk and read-only tests never silently vanish.
        assert done.returncode == 0, f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}"
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def no_search_recorded(home) -> None:
    """Nothing was written: no store yet, or one without searches."""
    from orchestrator.store import ResultsStore

    db = home / "orch.db"
    if db.exists():
        assert ResultsStore(f"sqlite:///{db}").list_searches() == []
