"""`orch … --json` run as a user runs it (a subprocess in the repository root, its own state
folder), for the benchmarks that measure whole commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def orch_env(home: Path) -> dict:
    """This process's environment with ORCH_HOME at ``home`` and no cluster address or telemetry."""
    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    return env


def orch(args: list[str], env: dict) -> dict:
    """The JSON `orch ARGS --json` prints; a failure ends the benchmark with orch's last words."""
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"orch {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)
