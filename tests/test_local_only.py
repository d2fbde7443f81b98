"""What orch starts on a workstation stays on it: every listening socket of every process of a
real search and a real scale is on loopback, Ray's state is private, and nothing outlives the
driver (Ctrl-C, SIGTERM; a SIGKILLed driver's leftovers are stopped by the next command).
Listeners are read from /proc (tests/procnet.py), while the command runs."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.faults import spawn
from orchestrator import cluster
from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import TINY, error_line
from tests.procnet import alive, command, descendants, is_loopback, listeners


def watch(p: subprocess.Popen) -> tuple[set, set]:
    """Every listener of the process tree, sampled until the command ends; and every pid seen."""
    seen, pids = set(), set()
    while p.poll() is None:
        tree = descendants(p.pid)
        pids |= set(tree)
        seen |= listeners(tree)
        time.sleep(0.3)
    return seen, pids


def gone(pids, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.3)
    return [(pid, command(pid)[:60]) for pid in alive(pids)]


def env_for(home: Path) -> dict:
    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(k, None)
    return env


def assert_local(seen: set, pids: set, home: Path, out: Path, driver: int, since: float) -> None:
    commands = " ".join(c for _, _, c in seen)
    assert "gcs_server" in commands and "raylet" in commands, seen  # Ray's servers were seen listening
    exposed = sorted(s for s in seen if not is_loopback(s[0]))
    assert not exposed, exposed
    assert gone(pids) == []  # nothing it started outlives it
    token = home / "ray-auth-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text() not in Path(f"{out}.out").read_text() + Path(f"{out}.err").read_text()
    private = home / "ray-local"  # Ray's own folders inside are 0777 (Ray's doing); no one else reaches them
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert [d for d in (private / "tmp").glob("session_*") if not d.is_symlink()]  # its sessions live here
    shared = [d for d in Path("/tmp/ray").glob(f"session_*_{driver}") if d.stat().st_mtime >= since]
    assert not shared  # and none in the shared /tmp/ray


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    # pytest's folders are long: Ray is handed the short alias of <home>/ray-local/tmp (unix sockets)
    home = tmp_path_factory.mktemp("local-only") / "home"
    log = home.parent / "search"
    since = time.time()
    p = spawn(["search", "--gpus", "0", "--trials", "2", "--epochs", "2", "--grace-epochs", "2", "--json", *TINY],
              env_for(home), log)
    seen, pids = watch(p)
    assert p.returncode == 0, Path(f"{log}.err").read_text()[-3000:]
    return home, log, seen, pids, json.loads(Path(f"{log}.out").read_text()), p.pid, since


@pytest.mark.slow
def test_a_search_listens_on_loopback_only_and_keeps_its_state_private(searched):
    home, log, seen, pids, out, driver, since = searched
    assert out["status"] == "finished"
    assert len(str(home / "ray-local" / "tmp")) > cluster.RAY_TEMP_MAX  # the alias path was exercised
    assert_local(seen, pids, home, log, driver, since)


@pytest.mark.slow
def test_a_scale_listens_on_loopback_only(searched):
    home, _, _, _, out, _, _ = searched
    log = home.parent / "scale"
    since = time.time()
    p = spawn(["scale", "--from-run", out["search_id"], "--phis", "1", "--no-baseline", "--epochs", "1", "--json"],
              env_for(home), log)
    seen, pids = watch(p)
    assert p.returncode == 0, Path(f"{log}.err").read_text()[-3000:]
    assert_local(seen, pids, home, log, p.pid, since)


def _running_search(home: Path, log: Path):
    """`orch search` with a trial that has reported, and its process tree by then."""
    p = spawn(["search", "--gpus", "0", "--trials", "2", "--epochs", "4", "--grace-epochs", "4", "--json", *TINY],
              env_for(home), log)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert p.poll() is None, Path(f"{log}.err").read_text()[-3000:]
        if (home / "orch.db").exists():
            store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
            searches = store.list_searches()
            trials = store.trials(searches[0].id) if searches else []
            store.close()
            if any(t.epochs_done >= 1 for t in trials):
                return p, set(descendants(p.pid)), searches[0].id
        time.sleep(0.5)
    pytest.fail("no trial reported")


@pytest.mark.slow
def test_a_sigtermed_driver_leaves_nothing_running(tmp_path):
    """SIGTERM is Ctrl-C (tests/test_search_interrupt.py sends SIGINT and checks the same)."""
    from orchestrator.audit import disagreements
    from orchestrator.tracking import Tracker

    home = tmp_path / "home"
    p, pids, search_id = _running_search(home, tmp_path / "search")
    assert len(pids) > 3  # Ray's processes, trials included
    p.send_signal(signal.SIGTERM)  # to the driver only, as a scheduler's stop or `kill` would
    p.wait(timeout=120)
    assert gone(pids) == []
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    assert store.get_search(search_id).status == "interrupted"
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "compound-scaling")
    assert disagreements(store, tracker, search_id=search_id) == []  # every run ended as recorded
    store.close()


@pytest.mark.slow
def test_a_sigkilled_drivers_ray_is_stopped_by_the_next_command(tmp_path):
    home = tmp_path / "home"
    p, pids, _ = _running_search(home, tmp_path / "search")
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(3)
    left = alive(pids)
    assert left, "nothing outlived the SIGKILL: this test proves nothing"  # Ray's agents do (measured)
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "runs", "list"], env=env_for(home),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert gone(left) == []


def test_sessions_of_dead_drivers_are_stopped_and_capped(tmp_path):
    temp = tmp_path / "t"
    dead = []
    for _ in range(cluster.KEEP_SESSIONS + 3):  # pids of processes that have ended
        q = subprocess.Popen(["true"])
        q.wait()
        dead.append(q.pid)
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = [f"session_2026-11-{10 + i:02d}_00-00-00_000000_{pid}" for i, pid in enumerate(dead)]
        for name in names:
            (temp / name / "logs").mkdir(parents=True)
        (temp / f"session_2026-11-01_00-00-00_000000_{live.pid}" / "logs").mkdir(parents=True)
        # a leftover of a dead driver: a process with a log open in that driver's session folder
        leftover = subprocess.Popen(["sleep", "60"], stdout=open(temp / names[-1] / "logs" / "agent.out", "w"))
        assert cluster.reap_dead_sessions(str(temp)) == [leftover.pid]
        leftover.wait(timeout=10)
        kept = sorted(d.name for d in temp.glob("session_*"))
        assert kept == sorted(names[-cluster.KEEP_SESSIONS:] + [f"session_2026-11-01_00-00-00_000000_{live.pid}"])
        assert live.poll() is None  # a live driver's session is left alone
    finally:
        live.kill()


def test_a_readable_ray_token_is_made_owner_only_and_never_printed(tmp_path, monkeypatch, capsys):
    token = tmp_path / "auth_token"
    token.write_text("s3cr3t-t0ken-value")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    cluster.private_token(None)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    err = capsys.readouterr().err
    assert str(token) in err and "0644" in err and "s3cr3t" not in err
    cluster.private_token(None)  # already owner-only: nothing to say
    assert capsys.readouterr().err == ""


def test_an_unauthenticated_remote_cluster_gets_one_warning(monkeypatch, capsys):
    # A cluster on another machine cannot exist here: the decision is checked on its inputs.
    monkeypatch.setattr(cluster, "_token_auth", lambda: False)
    capsys.readouterr()
    cluster.warn_if_exposed("192.0.2.10:6379")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "192.0.2.10:6379" in err and "RAY_AUTH_MODE=token" in err
    cluster.warn_if_exposed("127.0.0.1:6379")  # on this machine: nothing to say
    monkeypatch.setattr(cluster, "_token_auth", lambda: True)
    cluster.warn_if_exposed("192.0.2.10:6379")  # authenticated: nothing to say
    assert capsys.readouterr().err == ""


def test_orch_ui_needs_expose_for_a_non_loopback_host(home):
    res = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--expose" in error_line(res) and "no authentication" in error_line(res)
