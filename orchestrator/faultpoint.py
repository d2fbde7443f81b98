"""Named moments where a driver can be made to die on purpose, for the fault tests and
``benchmarks/faults.py --aimed``: a crash at a chosen, risky moment instead of a random one.

``ORCH_KILL_AT=<point>[:<n>]`` makes this process SIGKILL itself the n-th time (default: the
first) it reaches ``point``. Unset (always, outside tests), ``reached`` is one dict lookup.

Points:
  trial-last-report  Tune handed the driver a trial's last epoch; nothing of it is recorded yet
  trial-ended        a trial's end is in the store, its MLflow run not yet ended
  confirm-trial-ended  the same, for a confirmation run (after the search phase)
  checkpoint         Tune registered a trial's checkpoint, before saving its own state
  resumed            a resumed driver reopened the search's runs, before Tune restores anything
  search-ended       a search's MLflow run ended, its final status not yet in the store
  model-reported     a scale recorded a model's epoch (store and MLflow)
  model-ended        a scale ended a model's MLflow run, its end not yet in the store
"""

from __future__ import annotations

import os
import signal

POINTS = ("trial-last-report", "trial-ended", "confirm-trial-ended", "checkpoint", "resumed", "search-ended", "model-reported", "model-ended")
_count: dict[str, int] = {}


def reached(point: str) -> None:
    want = os.environ.get("ORCH_KILL_AT")
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != point:
        return
    _count[point] = _count.get(point, 0) + 1
    if _count[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
