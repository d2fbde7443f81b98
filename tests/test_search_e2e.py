"""`orch search` end to end on real Ray (local), real Optuna, real MLflow and SQLite stores."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import space
from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import TINY
from workers import prepared as fmt

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
    # At base 32 resolution cannot grow within 2x (γ = 1) and depth rounds up in steps, so with
    # seed 2 TPE's start-up proposals build some networks twice.
    out = _search(["--gpus", "0", "--trials", "7", "--epochs", "1", "--seed", "2"], home)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    reused = [t for t in trials if t.reused_from]
    assert reused
    client = _mlflow(home)
    for r in reused:
        original = next(t for t in trials if t.trial_id == r.reused_from)
        assert original.network_key == r.network_key and not original.reused_from
        # the same reports, the process it was trained in included (Tune stamps each result with
        # the reporting process's pid; the replay runs in either of two reused processes)
        assert r.history == original.history and r.train_s == 0.0
        assert client.get_run(r.mlflow_run_id).data.tags["orch.reused_from"] == original.trial_id
    assert out["summary"]["n_networks"] == len(trials) - len(reused) == len({t.network_key for t in trials})


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
    cands, n_points, _ = space.grid_candidates(0.1, 0.1, base_resolution=32, num_classes=10)
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
                                    "--base-resolution", "32", "--trials", "2", "--epochs", "2", "--batch-size", "8",
                                    "--confirm-top", "0"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    assert len(trials) == 2 and all(t.epochs_done >= 1 for t in trials)
    assert all(t.val_top1 is not None for t in trials)
    assert store.get_search(out["search_id"]).config["num_classes"] == 2
    # the folder was prepared for training, implicitly, once; the search keeps the folder's name
    assert "preparing it for training" in res.stderr
    assert store.get_search(out["search_id"]).config["dataset"] == f"imagefolder:{root}"
    from orchestrator import datasource

    spec = datasource.for_workers(f"imagefolder:{root}")
    prepared = Path(spec.removeprefix("prepared:"))
    assert prepared.parent == datasource.prepared_cache() and (prepared / "manifest.json").is_file()
    before = (prepared / "manifest.json").stat().st_mtime_ns
    def prepare(source, dest):
        from orchestrator.prepare import prepare as real

        return real(source, dest, workers=1)

    datasource._SCANS.clear(), datasource._FOR_WORKERS.clear()  # as a new command sees it
    assert datasource.for_workers(f"imagefolder:{root}", prepare=prepare) == spec  # unchanged: as it was
    assert (prepared / "manifest.json").stat().st_mtime_ns == before
    extra = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "added.png"
    shutil.copy(next((root / "train").rglob("*.png")), extra)
    datasource._SCANS.clear(), datasource._FOR_WORKERS.clear()
    changed = Path(datasource.for_workers(f"imagefolder:{root}", prepare=prepare).removeprefix("prepared:"))
    assert changed != prepared and changed.parent == prepared.parent  # a new preparation; the old one untouched
    assert (prepared / "manifest.json").stat().st_mtime_ns == before
    assert fmt.read_manifest(changed)["splits"]["train"]["count"] == len(list((root / "train").rglob("*.png"))) == 25


def test_infeasible_candidates_are_recorded_and_never_trained(ray_session, home):
    """A tolerance so tight that most widths step over it: those proposals are rows and runs
    marked infeasible, with the reason, never trained; Optuna was told through its constraint."""
    from orchestrator.audit import disagreements
    from orchestrator.tracking import Tracker

    out = _search(["--gpus", "0", "--trials", "6", "--epochs", "1", "--flops-tolerance", "0.01",
                   "--no-paper-point", "--seed", "3"], home)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    infeasible = [t for t in trials if t.status == "infeasible"]
    trained = [t for t in trials if t.status != "infeasible"]
    assert infeasible and trained, [(t.status, t.flops_ratio) for t in trials]
    for t in infeasible:
        assert t.epochs_done == 0 and t.history == [] and "not trained" in t.error
        assert abs(t.flops_ratio / 2 - 1) > 0.01
    assert all(abs(t.flops_ratio / 2 - 1) <= 0.01 + 1e-9 for t in trained)  # measured, as trained
    assert out["best"]["trial_id"] in {t.trial_id for t in trained}
    client = _mlflow(home)
    for t in infeasible:
        run = client.get_run(t.mlflow_run_id)
        assert run.info.status == "KILLED" and run.data.tags["orch.status"] == "infeasible"
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "compound-scaling")
    assert disagreements(store, tracker, search_id=out["search_id"]) == []


def test_same_seed_one_trial_at_a_time_gives_the_same_search(ray_session, home):
    """Reproducible: the same command and --seed, one trial at a time (2 CPUs per trial on this
    2-CPU cluster), proposes the same candidates in the same order, trains them to the same
    figures, and confirms and picks the same winner."""
    args = ["--gpus", "0", "--cpus-per-trial", "2", "--trials", "3", "--epochs", "1", "--seed", "5", "--no-paper-point",
            "--confirm-top", "1", "--confirm-seeds", "2"]
    first, second = _search(args, home), _search(args, home)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")

    def story(search_id):
        trials = sorted(store.trials(search_id), key=lambda t: (t.started_at, t.trial_id))
        return [(t.phase, t.seed, t.alpha, t.beta, t.gamma, t.network_key, t.val_top1) for t in trials]

    assert first["summary"]["concurrency"] == 1
    assert story(first["search_id"]) == story(second["search_id"])
    assert first["best"]["network_key"] == second["best"]["network_key"]
    a, b = first["summary"]["confirmation"], second["summary"]["confirmation"]
    assert [(c["network_key"], c["values"]) for c in a["candidates"]] == \
        [(c["network_key"], c["values"]) for c in b["candidates"]]
