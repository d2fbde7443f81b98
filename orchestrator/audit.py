"""The record's one promise, stated once: the results store and MLflow tell the same story.

After a search or a scale has ended (a resumed one too), for every trial or model:

- the store's status and its MLflow run's agree (finished ↔ FINISHED, stopped/interrupted ↔
  KILLED, failed ↔ FAILED) and the run carries that status as its ``orch.status`` tag;
- no run of it is RUNNING, and a run no row names was marked discarded (a killed driver made
  it, Tune never saved its trial);
- every epoch metric's history in MLflow equals the store's: the same epochs, and at each the
  store's value (the last one logged, where an epoch was trained twice).

``disagreements`` returns what breaks it, one line each (empty: they agree). The fault tests
and ``benchmarks/faults.py`` run it after every resume.
"""

from __future__ import annotations

from orchestrator.status import MLFLOW_STATUS as STATUS, Status
from orchestrator.tracking import EPOCH_METRICS, same_value


def disagreements(store, tracker, *, search_id: str | None = None, scale_id: str | None = None) -> list[str]:
    """What the store and MLflow disagree on for one ended search or scale (see the module)."""
    if (search_id is None) == (scale_id is None):
        raise ValueError("give one of search_id, scale_id")
    if search_id is not None:
        record = store.get_search(search_id)
        units = [(f"trial {t.trial_id}", t) for t in store.trials(search_id)]
        tags = {"orch.search_id": search_id, "orch.kind": "trial"}
    else:
        record = store.get_scale(scale_id)
        units = [(f"model {r.model}", r) for r in store.scale_runs(scale_id)]
        tags = {"orch.scale_id": scale_id, "orch.kind": "model"}
    if record is None:
        return [f"no record of {search_id or scale_id} in the store"]
    what = search_id or scale_id
    out = _one(tracker, f"{what} (parent)", record.status, record.mlflow_run_id, None, None)
    named = set()
    for name, row in units:
        named.add(row.mlflow_run_id)
        out += _one(tracker, f"{what} {name}", row.status, row.mlflow_run_id, record.mlflow_run_id, row.history)
    for run in tracker.runs(tags):
        if run.run_id in named:
            continue
        if run.status == "RUNNING":
            out.append(f"{what}: run {run.run_id} ({run.tags.get('mlflow.runName')}) is RUNNING and no row names it")
        elif run.tags.get("orch.status") != Status.DISCARDED:
            out.append(f"{what}: run {run.run_id} has no row and is not marked discarded")
    return out


def _one(tracker, name: str, status: str, run_id: str | None, parent: str | None, history: list | None) -> list[str]:
    if status not in STATUS:
        return [f"{name}: the store says {status!r}, not an ended status"]
    if not run_id:
        return [f"{name}: the store names no MLflow run"]
    run = tracker.view(run_id)
    if run is None:
        return [f"{name}: MLflow has no run {run_id}"]
    out = []
    if run.status != STATUS[status]:
        out.append(f"{name}: the store says {status}, MLflow run {run_id} is {run.status}")
    if run.tags.get("orch.status") != status:
        out.append(f"{name}: the store says {status}, the run's orch.status tag {run.tags.get('orch.status')!r}")
    if parent is not None and run.parent != parent:
        out.append(f"{name}: run {run_id} is under {run.parent}, not the parent run {parent}")
    for key in EPOCH_METRICS if history is not None else ():
        want = {int(h["epoch"]): h[key] for h in history if key in h}
        have = tracker.metric_steps(run_id, key)
        if sorted(want) != sorted(have):
            out.append(f"{name}: {key} at epochs {sorted(have)} in MLflow, {sorted(want)} in the store")
        else:
            bad = [e for e in want if not same_value(have[e], want[e])]
            if bad:
                out.append(f"{name}: {key} differs at epochs {bad} (MLflow {[have[e] for e in bad]}, "
                           f"store {[want[e] for e in bad]})")
    return out
