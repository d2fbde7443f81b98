"""Where results live: one state folder (``ORCH_HOME``, default ./orch-runs) holds the embedded
defaults: orch.db (results store), mlflow.db (tracking store), mlartifacts/, ray/ (Tune storage)."""

from __future__ import annotations

import os
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


def ensure_writable(home: Path) -> None:
    """Create the state folder; a clear error when it cannot be written."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".orch-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"state folder {home} is not writable ({e.strerror}); set ORCH_HOME to a writable folder") from None
