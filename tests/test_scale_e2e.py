"""`orch scale` end to end: real Ray Train jobs (local Ray), a real `mlflow server` on loopback,
the real SQLite results store. The only stand-in: no physical GPU, so jobs run on CPU (gloo)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.browser import page_text
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def _invoke(args):
    res = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip(), res.output
    return json.loads(res.stdout)


def _search(extra=()):
    return _invoke(["search", "--gpus", "0", "--trials", "2", "--epochs", "1", *TINY, *extra])


def test_search_and_scale_on_postgresql_and_a_tracking_server(ray_session, home, mlflow_server, createdb):
    """deploy/README.md's native recipe, for real: PostgreSQL results store (`orch db upgrade`
    first), an `mlflow server` with a PostgreSQL backend on loopback; a search and a scale."""
    from mlflow.tracking import MlflowClient

    db_url = createdb("orch_test_results")
    res = CliRunner().invoke(main, ["db", "upgrade", "--db-url", db_url])
    assert res.exit_code == 0 and "-> " in res.output, res.output
    tracking = ["--tracking-uri", mlflow_server, "--db-url", db_url]
    search = _search(tracking)
    scale_args = ["scale", "--from-run", search["search_id"], "--phis", "1", "--gpus", "0", *tracking]
    out = _invoke(scale_args)
    assert out["status"] == "finished" and out["search_id"] == search["search_id"]
    assert [m["name"] for m in out["models"]] == ["B0", "B1"]
    for m in out["models"]:
        assert {"name", "phi", "resolution", "params_m", "gmacs", "val_top1", "mlflow_run_id"} <= set(m)
        assert m["status"] == "finished" and 0.0 <= m["val_top1"] <= 1.0
    again = CliRunner().invoke(main, scale_args)  # the same scale again: nothing retrained; the human view
    assert again.exit_code == 0, again.output
    assert f"next: orch ui --scale {out['scale_id']}" in again.stdout and "val_top1 against GMACs" in again.stdout
    assert "GMACs (log)" not in again.stdout  # not a terminal: no chart

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("compound-scaling")
    runs = client.search_runs([exp.experiment_id])
    kinds = {}
    for r in runs:
        kinds.setdefault(r.data.tags.get("orch.kind"), []).append(r)
    assert len(kinds["search"]) == 1 and len(kinds["scale"]) == 1  # one parent per search and per scale
    parent = kinds["scale"][0]
    assert parent.info.run_id == out["mlflow_run_id"]
    assert parent.data.tags["orch.search_id"] == search["search_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["B0", "B1"]
    keys = [set(r.data.metrics) for r in children]
    assert keys[0] == keys[1] and {"val_top1", "val_top1_final", "gmacs", "params_m", "images_per_s", "train_s"} <= keys[0]
    params = [set(r.data.params) for r in children]
    assert params[0] == params[1] and {"phi", "alpha", "beta", "gamma", "depth_mult", "width_mult", "resolution",
                                       "batch_size", "lr"} <= params[0]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"plan.json", "family.png"} <= arts
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("orch.kind") in ("scale", "model"))
    assert all(r.info.status != "RUNNING" for r in runs)  # nothing left RUNNING

    # the same command again: nothing retrained, the same scale, parent and child runs
    again = _invoke(scale_args)
    assert again["scale_id"] == out["scale_id"] and again["mlflow_run_id"] == out["mlflow_run_id"]
    assert again["summary"]["trained_now"] == [] and again["summary"]["done_before"] == ["B0", "B1"]
    assert [m["mlflow_run_id"] for m in again["models"]] == [m["mlflow_run_id"] for m in out["models"]]
    runs2 = client.search_runs([exp.experiment_id])
    assert len(runs2) == len(runs) and all(r.info.status != "RUNNING" for r in runs2)
    store = ResultsStore(db_url)  # the results are in PostgreSQL, one row per trial and per model
    assert len(store.trials(search["search_id"])) == 2 and len(store.scale_runs(out["scale_id"])) == 2
    b1 = next(r for r in store.scale_runs(out["scale_id"]) if r.model == "B1")
    assert b1.network_key == search["best"]["network_key"]  # B1 is the network the search trained
    store.close()

    # What a person sees: `orch ui` prints the family's URLs on the server; Chromium renders them.
    res = CliRunner().invoke(main, ["ui", "--scale", out["scale_id"], *tracking])
    assert res.exit_code == 0, res.output
    table, charts = res.output.split()
    columns = ("val_top1", "ema_val_top1", "gmacs", "params_m", "phi", "resolution")
    page = page_text(table, expect=(" B1 ", "matching runs", *(f" {c} " for c in columns)))
    assert "Tool calls" not in page and "Usage" not in page, page[:3000]  # not the GenAI overview
    assert "orch family " + out["scale_id"] in page, page[:3000]  # the saved view is the one shown
    for column in columns:
        assert f" {column} " in page, (column, page[:3000])
    rows = re.findall(r"\| (B\d|search-\S+|scale-\S+|trial\S*) \|", page)
    assert rows == ["B0", "B1"] and "| 2 | matching runs" in page, page[:3000]  # the family only, B0 first
    plots = page_text(charts, expect=("Family: accuracy against GMACs", "gmacs vs. val_top1"))
    assert "Family: accuracy against GMACs" in plots and "gmacs vs. val_top1" in plots, plots[:3000]
    assert "Tool calls" not in plots


def test_two_data_parallel_cpu_workers_both_take_part(ray_session, home):
    """Compiled too (`--compile on`, the tests' CPU backend): the search's trials, and the job
    inheriting the option, train compiled on both ranks; the option and the seconds are recorded."""
    from mlflow.tracking import MlflowClient

    search = _search(["--compile", "on"])
    out = _invoke(["scale", "--from-run", search["search_id"], "--phis", "1", "--no-baseline", "--gpus", "0",
                   "--workers-per-job", "2"])
    assert out["status"] == "finished"
    (model,) = out["models"]
    assert model["workers"] == 2
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    (row,) = store.scale_runs(out["scale_id"])
    for epoch in row.history:
        ranks = epoch["ranks"]
        assert sorted(r["rank"] for r in ranks) == [0, 1]
        assert len({r["pid"] for r in ranks}) == 2  # two worker processes
        assert all(r["samples"] > 0 for r in ranks)  # each trained on its share of every batch
    # the global batch is the per-worker batch on each of the two ranks
    assert sum(r["samples"] for r in row.history[0]["ranks"]) == 2 * row.history[0]["ranks"][0]["samples"]

    assert store.get_search(search["search_id"]).config["compile"] == "on"
    assert store.get_scale(out["scale_id"]).config["compile"] == "on"  # inherited from the search
    trials = store.trials(search["search_id"])
    assert trials and all(t.history[0]["compiled"] == 1.0 and t.history[0]["compile_s"] > 0 for t in trials)
    assert row.history[0]["compiled"] == 1.0 and row.history[0]["compile_s"] > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    for run_id in [t.mlflow_run_id for t in trials] + [row.mlflow_run_id]:
        run = client.get_run(run_id)
        assert run.data.params["compile"] == "on" and run.data.metrics["compile_s"] > 0


def test_interrupted_scale_reruns_only_what_is_missing(ray_session, home):
    """Ctrl-C (a real SIGINT to a real `orch scale` process) after B0 finished: every run ends,
    the scale is `interrupted`; the same command again reports B0 and trains only B1, in B1's
    own MLflow run."""
    from mlflow.tracking import MlflowClient

    search = _search()
    # --cpus-per-worker 2: one job at a time on 2 CPUs, B0 first
    args = ["scale", "--from-run", search["search_id"], "--phis", "1", "--epochs", "2", "--gpus", "0",
            "--cpus-per-worker", "2"]
    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(1.0)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            scales = store.list_scales()
            rows = {r.model: r for r in store.scale_runs(scales[0].id)} if scales else {}
            if "B0" in rows and rows["B0"].status == "finished":
                break
        else:
            pytest.fail("B0 did not finish in time")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    (sc,) = store.list_scales()
    assert sc.status == "interrupted"
    rows = {r.model: r for r in store.scale_runs(sc.id)}
    assert rows["B0"].status == "finished" and rows["B1"].status in ("interrupted", "pending")
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert all(r.info.status != "RUNNING" for r in client.search_runs([client.get_experiment_by_name("compound-scaling").experiment_id]))
    assert client.get_run(sc.mlflow_run_id).info.status == "KILLED"
    b1_run = rows["B1"].mlflow_run_id

    out = _invoke([*args])
    assert out["scale_id"] == sc.id and out["status"] == "finished"
    assert out["summary"]["done_before"] == ["B0"] and out["summary"]["trained_now"] == ["B1"]
    rows2 = {r.model: r for r in store.scale_runs(sc.id)}
    assert rows2["B0"].started_at == rows["B0"].started_at  # not retrained
    assert rows2["B1"].status == "finished" and rows2["B1"].epochs_done == 2
    if b1_run:  # B1 had started: its run was continued, not duplicated
        assert rows2["B1"].mlflow_run_id == b1_run
    children = client.search_runs([client.get_experiment_by_name("compound-scaling").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{sc.mlflow_run_id}'")
    assert sorted(r.info.run_name for r in children) == ["B0", "B1"]
    assert all(r.info.status == "FINISHED" for r in children)
    store.close()
