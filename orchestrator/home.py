"""Where results live: one state folder (``ORCH_HOME``, default ./orch-runs) holds the embedded
defaults: orch.db (results store), mlflow.db (tracking store), mlartifacts/, ray/ (Tune storage)."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path

DEFAULT_HOME = "orch-runs"


def home_dir(value: str | None = None) -> Path:
    return Path(value or os.environ.get("ORCH_HOME") or DEFAULT_HOME).expanduser().resolve()


def default_db_url(home: Path) -> str:
    return f"sqlite:///{home / 'orch.db'}"


def default_tracking_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def artifact_root(home: Path) -> Path:
    return home / "mlartifacts"


def ray_storage(home: Path) -> Path:
    return home / "ray"


def ensure_writable(home: Path, what: str = "state folder", fix: str = "set ORCH_HOME to a writable folder") -> None:
    """Create the folder (the state folder by default); a clear error when it cannot be written."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".orch-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # one per process: drivers start at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{what} {home} is not writable ({e.strerror}); {fix}") from None


def driver_token() -> str:
    """``host:pid`` of this process, stored with a running search or scale."""
    return f"{socket.gethostname()}:{os.getpid()}"


def driver_alive(driver: str | None) -> bool:
    """Whether ``host:pid`` names a live process on this host (another orch driver)."""
    if not driver or ":" not in driver:
        return False
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def confined(path: str, roots: list[str | None]) -> bool:
    """Whether ``path`` lies inside one of ``roots`` once links are followed (a URI: equals or
    lies under a root URI). Tune and Train restore pickled state from experiment folders, so orch
    only loads them from places the user named: the state folder or the configured storage."""
    if "://" in path:
        return any(r and "://" in r and (path == r or path.startswith(r.rstrip("/") + "/")) for r in roots)
    real = Path(path).expanduser().resolve()
    for root in roots:
        if root and "://" not in root:
            base = Path(root).expanduser().resolve()
            if real == base or base in real.parents:
                return True
    return False


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive lock on ``path`` (created if missing) between processes of this machine:
    what two `orch` processes must not do at once to a new SQLite file (create its schema)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
