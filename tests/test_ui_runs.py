"""`orch ui` (a real MLflow UI process on loopback, stopped with a real SIGINT) and `orch runs`
with scales. The store rows are written through the real ResultsStore."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import _free_port

ROW = dict(depth_mult=1.2, width_mult=1.1, resolution=40, network_key="k", params=4_000_000, gmacs=0.02,
           batch_size=32, lr=0.015, workers=1, status="finished", epochs_done=1)


@pytest.fixture
def scaled(home):
    st = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    st.create_search("s1", "one", {"epochs": 1})
    st.update_search("s1", status="finished")
    st.create_scale("scale-abc", search_id="s1", trial_id="t1",
                    config={"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "mode": "compound"},
                    plan=[{"name": "B0"}, {"name": "B1"}], mlflow_run_id="parent-run")
    st.upsert_scale_run("scale-abc", "B0", phi=0.0, **ROW, val_top1=0.4, mlflow_run_id="run-b0")
    st.upsert_scale_run("scale-abc", "B1", phi=1.0, **ROW, val_top1=0.5, mlflow_run_id="run-b1")
    st.update_scale("scale-abc", status="finished",
                    summary={"models": [{"name": "B0", "val_top1": 0.4}, {"name": "B1", "val_top1": 0.5}]})
    yield st
    st.close()


def test_runs_list_and_show_include_scales(scaled):
    res = CliRunner().invoke(main, ["runs", "list", "--json"])
    entries = json.loads(res.stdout)
    assert {(e["id"], e["kind"]) for e in entries} == {("s1", "search"), ("scale-abc", "scale")}
    scale = next(e for e in entries if e["kind"] == "scale")
    assert scale["best"]["name"] == "B1" and scale["search_id"] == "s1"
    res = CliRunner().invoke(main, ["runs", "show", "parent-run", "--json"])  # by the scale's MLflow run id
    shown = json.loads(res.stdout)
    assert shown["id"] == "scale-abc" and [m["name"] for m in shown["models"]] == ["B0", "B1"]
    res = CliRunner().invoke(main, ["runs", "show", "scale-abc"])
    assert res.exit_code == 0 and "B1" in res.output and "finished" in res.output
    res = CliRunner().invoke(main, ["runs", "show", "nothing-here"])
    assert res.exit_code == 2 and "no search or scale 'nothing-here'" in res.output


def in_a_terminal(args: list[str]) -> str:
    """What `orch ARGS` prints on a pseudo-terminal (stdout and stderr both on it)."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                         env=dict(os.environ, COLUMNS="100"))
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=60) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_the_family_chart_is_drawn_in_a_terminal_only(scaled):
    scaled.upsert_scale_run("scale-abc", "B1", phi=1.0, **(ROW | {"gmacs": 0.041}), val_top1=0.5, mlflow_run_id="run-b1")
    shown = in_a_terminal(["runs", "show", "scale-abc"])
    assert "scale-abc: val top-1 against GMACs" in shown and "GMACs (log)" in shown
    chart = shown.split("val top-1 against GMACs")[1]
    assert chart.count("●") == 2 + 2 and " B0" in chart and "B1 " in chart  # legend, a labelled point per member
    assert "official B0-B7 shape" in chart  # a compound plan gets the paper's family as reference
    assert "\x1b[" not in chart  # the chart itself has no colour codes
    as_json = in_a_terminal(["runs", "show", "scale-abc", "--json"])
    assert "GMACs (log)" not in as_json and json.loads(as_json)["id"] == "scale-abc"
    piped = CliRunner().invoke(main, ["runs", "show", "scale-abc"])  # not a terminal
    assert piped.exit_code == 0 and "B1" in piped.output and "GMACs (log)" not in piped.output


def test_the_official_shape_is_anchored_at_b0():
    from orchestrator.chart import OFFICIAL_TOP1, family_chart, official_shape

    xs, ys = official_shape(0.01, 0.5, up_to=0.03)
    assert xs[0] == pytest.approx(0.01) and ys[0] == pytest.approx(0.5)  # starts at the user's B0
    assert xs[-1] >= 0.03 > xs[-2] and ys == sorted(ys)  # up to the family's reach, rising
    err_ratio = (100 - OFFICIAL_TOP1[1]) / (100 - OFFICIAL_TOP1[0])
    assert ys[1] == pytest.approx(1 - 0.5 * err_ratio)  # B1's error is the official B1's share of B0's
    assert family_chart([{"name": "B0", "gmacs": 0.01, "val_top1": 0.5}], title="t", reference=True) is None
    assert family_chart([{"name": "B0", "gmacs": 0.01, "val_top1": None}, {"name": "B1", "gmacs": 0.02,
                                                                          "val_top1": 0.4}], title="t",
                        reference=True) is None  # members without an accuracy are left out


def test_ui_serves_on_loopback_and_prints_the_comparison(scaled, home):
    port = _free_port()
    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while len(lines) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-2000:]
            if line:
                lines.append(line.strip())
        assert lines[0].startswith(f"MLflow UI on http://127.0.0.1:{port}") and "scale scale-abc" in lines[0]
        base = f"http://127.0.0.1:{port}/#/experiments/"
        assert lines[1].startswith(base) and lines[1].endswith("/runs?workflowType=machine_learning"
                                                              "&viewStateShareKey=scale-abc")
        assert lines[2] == lines[1] + "&compareRunsMode=CHART"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                                    f"?experiment_name=compound-scaling", timeout=10) as r:
            assert json.loads(r.read())["experiment"]["name"] == "compound-scaling"
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops the UI and its server
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3)


def test_ui_with_a_tracking_server_only_prints_the_url(scaled, mlflow_server):
    from mlflow.tracking import MlflowClient

    res = CliRunner().invoke(main, ["ui", "--tracking-uri", mlflow_server])
    assert res.exit_code == 0, res.output
    table, charts = res.output.split()
    assert table.startswith(f"{mlflow_server}/#/experiments/") and "viewStateShareKey=scale-abc" in table
    assert charts == table + "&compareRunsMode=CHART"
    # the view it names is saved on the server, once (a view changed in the UI is kept)
    exp = MlflowClient(mlflow_server).get_experiment_by_name("compound-scaling")
    saved = json.loads(exp.tags["mlflow.sharedViewState.scale-abc"])
    assert json.loads(saved["state"])["searchFilter"].endswith("= 'scale-abc' and tags.`orch.kind` = 'model'")
    MlflowClient(mlflow_server).set_experiment_tag(exp.experiment_id, "mlflow.sharedViewState.scale-abc", "{}")
    assert CliRunner().invoke(main, ["ui", "--tracking-uri", mlflow_server]).exit_code == 0
    exp = MlflowClient(mlflow_server).get_experiment_by_name("compound-scaling")
    assert exp.tags["mlflow.sharedViewState.scale-abc"] == "{}"


def test_ui_unknown_scale_and_taken_port(scaled, home):
    import socket

    res = CliRunner().invoke(main, ["ui", "--scale", "scale-nope"])
    assert res.exit_code == 2 and "no scale 'scale-nope'" in res.output
    res = CliRunner().invoke(main, ["ui", "--scale", "../x"])
    assert res.exit_code == 2 and "is not an id" in res.output
    with socket.socket() as busy:  # something else holds the port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(main, ["ui", "--port", str(port)])
    assert res.exit_code == 1 and "did not start" in res.output and "--port" in res.output
    assert "Traceback" not in res.output


def test_ui_opens_the_scale_in_its_own_experiment(scaled, mlflow_server):
    """A scale recorded under --experiment X: `orch ui --scale` saves its view and points into X
    (unless --experiment is given)."""
    from mlflow.tracking import MlflowClient

    scaled.create_scale("scale-def", search_id="s1", trial_id="t1",
                        config={"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "experiment": "pets-family"},
                        plan=[{"name": "B0"}], mlflow_run_id="parent-2")
    res = CliRunner().invoke(main, ["ui", "--scale", "scale-def", "--tracking-uri", mlflow_server])
    assert res.exit_code == 0, res.output
    exp = MlflowClient(mlflow_server).get_experiment_by_name("pets-family")
    assert f"/#/experiments/{exp.experiment_id}/runs?" in res.output.split()[0]
    assert "mlflow.sharedViewState.scale-def" in exp.tags
    res = CliRunner().invoke(main, ["ui", "--scale", "scale-def", "--tracking-uri", mlflow_server,
                                    "--experiment", "compound-scaling"])
    default = MlflowClient(mlflow_server).get_experiment_by_name("compound-scaling")
    assert res.exit_code == 0 and f"/#/experiments/{default.experiment_id}/runs?" in res.output
