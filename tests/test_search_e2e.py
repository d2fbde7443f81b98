"""`orch search` end to end on real Ray (local), real Optuna, real MLflow and SQLite stores."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import space
from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def _search(args, home):
    res = CliRunner().invoke(main, ["search", "--json", *TINY, *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _mlflow(home):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def test_search_store_and_mlflow_agree(ray_session, home):
    out = _search(["--gpus", "0", "--trials", "4", "--epochs", "2"], home)
    assert out["status"] == "finished" and out["n_trials"] == 4
    assert set(out["best"]) >= {"alpha", "beta", "gamma", "val_top1", "flops_ratio", "trial_id"}

    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    assert len(trials) == 4 and len({t.trial_id for t in trials}) == 4
    assert all(t.status in ("finished", "stopped") for t in trials)
    # the paper point is proposed first, so it is among the first `concurrency` (2) trials started
    first = sorted(trials, key=lambda t: t.started_at)[:2]
    assert any((t.alpha, t.beta, t.gamma) == (1.2, 1.1, 1.15) for t in first)

    client = _mlflow(home)
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["best_trial_id"] == out["best"]["trial_id"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert all(r.info.status != "RUNNING" for r in children)
    by_run = {r.info.run_id: r for r in children}
    for t in trials:
        run = by_run[t.mlflow_run_id]
        assert run.data.params["network_key"] == t.network_key
        logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.step)]
        assert logged == pytest.approx([h["val_top1"] for h in t.history])
        want = "FINISHED" if t.status == "finished" else "KILLED"
        assert run.info.status == want
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "trials.csv" in artifacts

    shown = CliRunner().invoke(main, ["runs", "show", out["search_id"], "--json"])
    assert shown.exit_code == 0, shown.output
    entry = json.loads(shown.stdout)
    assert {t["trial_id"] for t in entry["trials"]} == {t.trial_id for t in trials}
    for t in entry["trials"]:
        assert {"alpha", "beta", "gamma", "status", "epochs_done", "val_top1"} <= set(t)
    listed = json.loads(CliRunner().invoke(main, ["runs", "list", "--json"]).stdout)
    assert listed[0]["id"] == out["search_id"] and listed[0]["kind"] == "search"
    assert {"id", "kind", "name", "status", "created_at"} <= set(listed[0])
    # the MLflow run id is accepted as well
    assert CliRunner().invoke(main, ["runs", "show", out["mlflow_run_id"]]).exit_code == 0


def test_same_network_is_trained_once_and_reused(ray_session, home):
    # With seed 2 TPE's (random) start-up proposals 2 and 6 round to the same network at base 32.
    out = _search(["--gpus", "0", "--trials", "7", "--epochs", "1", "--seed", "2"], home)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    reused = [t for t in trials if t.reused_from]
    assert len(reused) == 1
    original = next(t for t in trials if t.trial_id == reused[0].reused_from)
    assert original.network_key == reused[0].network_key
    # the same reports, the process it was trained in included (Tune stamps each result with the
    # reporting process's pid; the replay runs in either of two reused processes)
    assert reused[0].history == original.history and reused[0].train_s == 0.0
    assert out["summary"]["n_networks"] == len(trials) - 1
    client = _mlflow(home)
    assert client.get_run(reused[0].mlflow_run_id).data.tags["orch.reused_from"] == original.trial_id


def test_a_resumed_search_replays_networks_its_earlier_drivers_trained(ray_session):
    import ray

    from orchestrator.trainable import NetworkRegistry

    history = [{"epoch": 1, "val_top1": 0.5}]
    registry = NetworkRegistry.remote()
    ray.get(registry.seed.remote([("net-a", "t1", history)]))
    assert ray.get(registry.claim.remote("net-a", "t9")) == "t1"  # owned: t9 replays t1's reports
    assert ray.get(registry.result.remote("net-a")) == (True, history)
    assert ray.get(registry.claim.remote("net-b", "t9")) is None  # a new network: t9 trains it
    ray.kill(registry)


def test_grid_trains_each_distinct_network_once(ray_session, home):
    out = _search(["--gpus", "0", "--space", "grid", "--grid-step", "0.1", "--tolerance", "0.1", "--epochs", "1"],
                  home)
    cands, n_points = space.grid_candidates(0.1, 0.1, base_resolution=32, num_classes=10)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    keys = [t.network_key for t in trials]
    assert len(trials) == len(cands) < n_points
    assert sorted(keys) == sorted(c.key for c in cands)
    assert len(set(keys)) == len(keys)


def test_logical_gpus_bound_concurrency(ray_session, home):
    out = _search(["--gpus", "4", "--gpus-per-trial", "1", "--cpus-per-trial", "0.5", "--trials", "5",
                   "--epochs", "1", "--grace-epochs", "1"], home)
    assert out["summary"]["concurrency"] == 4
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    assert len(trials) == 5 and all(t.status == "finished" and t.ended_at for t in trials)  # none pending
    events = sorted([(t.started_at, 1) for t in trials] + [(t.ended_at, -1) for t in trials])
    running, peak = 0, 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert 2 <= peak <= 4


def _write_images(root: Path, n_train=12, n_val=6):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 40, (40, 48, 3)), 0, 255)
                Image.fromarray(arr.astype("uint8")).save(d / f"{i}.png")


def test_imagefolder_end_to_end(ray_session, home, tmp_path):
    root = tmp_path / "pets"
    _write_images(root)
    res = CliRunner().invoke(main, ["search", "--json", "--gpus", "0", "--dataset", f"imagefolder:{root}",
                                    "--base-resolution", "32", "--trials", "2", "--epochs", "2", "--batch-size", "8"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    assert len(trials) == 2 and all(t.epochs_done >= 1 for t in trials)
    assert all(t.val_top1 is not None for t in trials)
    assert store.get_search(out["search_id"]).config["num_classes"] == 2
