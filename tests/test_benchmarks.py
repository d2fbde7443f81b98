"""The benchmark scripts run at their smallest size (--quick) and print their figures last.
They measure; these tests check that they run end to end and report, not how fast anything is."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> list[str]:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return [line for line in res.stdout.splitlines() if line.strip()]


def test_train_throughput_quick():
    lines = _run("train_throughput.py")
    assert re.search(r"^B0 +64 +8 orch eager +[\d,.]+ ", "\n".join(lines), re.M)
    assert re.match(r"full trial path .* ÷ bare step, B0: \d+\.\d{3}", lines[-1])


def test_overhead_quick():
    lines = _run("overhead.py")
    m = re.match(r"efficiency = train_s / \(concurrency x wall\) = (\d+\.\d+)", lines[-1])
    assert m and 0.0 < float(m.group(1)) <= 1.0


def test_bookkeeping_quick():
    lines = _run("bookkeeping.py")
    row = next(line for line in lines if re.match(r"^\s+10\s+10\s", line))  # 10 trials, 10 rows in the store
    assert float(row.split()[4]) >= 1.0  # wall ÷ ideal: the wall can't beat the ideal
    assert lines[-1].startswith("at 10 trials wall ÷ ideal = ")



# benchmarks/faults.py --quick is not run here: in one clean-clone CI run of seven it ended with
# 1 of 2 trials recorded (not reproduced in 13 runs since; issue #5 stays open for it). Its kill
# and resume paths run deterministically in tests/test_faults.py.
