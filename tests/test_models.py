"""The trained family as MLflow models (#16): each member logged with its weights, signature and
code; loaded in a fresh process that has torch and mlflow but not orch, it gives the accuracy
the scale recorded; registered under one name with aliases, without duplicates on a second try."""

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import TINY, error_line

pytestmark = pytest.mark.slow

#: A fresh interpreter without orch: no site processing (so no editable-install hook), only the
#: environment's site-packages on the path, run from an empty folder.
FRESH = """
import importlib.util, json, sys
sys.path.append({site!r})
assert importlib.util.find_spec("orchestrator") is None and importlib.util.find_spec("workers") is None
import mlflow, torch
mlflow.set_tracking_uri({tracking!r})
x, y = torch.load({val!r})
out = {{}}
for uri in {uris!r}:
    model = mlflow.pytorch.load_model(uri, map_location="cpu").eval()
    with torch.no_grad():
        out[uri] = (model(x).argmax(1) == y).float().mean().item()
print(json.dumps(out))
"""


def _fresh(code: str, cwd) -> dict:
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW"))})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_members_are_mlflow_models_that_load_anywhere_and_register_once(ray_session, home, tmp_path):
    from workers import data as data_mod
    from workers.train import _normalize

    res = CliRunner().invoke(main, ["search", "--json", "--gpus", "0", "--trials", "2", "--epochs", "1", *TINY],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    search_id = json.loads(res.stdout)["search_id"]

    # a name MLflow refuses: one line, before anything trains
    res = CliRunner().invoke(main, ["scale", "--from-run", search_id, "--phis", "1", "--gpus", "0",
                                    "--register", "pets/family"])
    assert res.exit_code == 2 and "--register" in error_line(res) and "'/'" in error_line(res)

    res = CliRunner().invoke(main, ["scale", "--json", "--from-run", search_id, "--phis", "1", "--epochs", "1",
                                    "--gpus", "0", "--register", "family"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    models = {m["name"]: m for m in out["models"]}
    assert set(models) == {"B0", "B1"} and all(m["model_uri"].startswith("models:/") for m in models.values())
    assert [(r["model"], r["alias"], r["created"]) for r in out["registered"]] == [("B0", "b0", True), ("B1", "b1", True)]

    # both the weights and their moving average were evaluated every epoch, and recorded; the
    # logged model holds the better of the two at the end, and says which
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    for name, m in models.items():
        assert m["ema_val_top1"] is not None and m["weights"] in ("raw", "ema")
        better = "ema" if m["ema_val_top1"] > m["val_top1"] else "raw"
        assert m["weights"] == better and m["model_val_top1"] == max(m["val_top1"], m["ema_val_top1"])
        assert [x.step for x in client.get_metric_history(m["mlflow_run_id"], "ema_val_top1")] == [1]
        tags = client.get_logged_model(m["model_uri"].removeprefix("models:/")).tags
        assert tags["orch.weights"] == m["weights"] and float(tags["orch.val_top1"]) == m["model_val_top1"]

    # `orch runs show` names each member's model, in the table and in --json
    res = CliRunner().invoke(main, ["runs", "show", out["scale_id"]], catch_exceptions=False)
    assert models["B1"]["model_uri"] in res.output
    res = CliRunner().invoke(main, ["runs", "show", out["scale_id"], "--json"], catch_exceptions=False)
    shown = {m["name"]: m["model_uri"] for m in json.loads(res.stdout)["models"]}
    assert shown == {k: m["model_uri"] for k, m in models.items()}

    # the validation split each member was evaluated on, as the member's input
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    config = store.get_scale(out["scale_id"]).config
    uris, vals = [], {}
    for name, m in models.items():
        ds = data_mod.load(config["dataset"], m["resolution"], seed=config.get("data_seed") or config.get("seed") or 0,
                           synthetic_size=tuple(config["synthetic_size"]) if config.get("synthetic_size") else None)
        path = tmp_path / f"val-{name}.pt"
        torch.save((_normalize(ds.val.images), ds.val.labels), path)
        vals[name] = str(path)
    tracking = f"sqlite:///{home / 'mlflow.db'}"
    site = sysconfig.get_paths()["purelib"]
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    for name, m in models.items():
        for uri in (m["model_uri"], f"models:/family@{name.lower()}"):
            acc = _fresh(FRESH.format(site=site, tracking=tracking, val=vals[name], uris=[uri]), empty)[uri]
            assert abs(acc - m["model_val_top1"]) < 1e-6, (name, uri, acc, m["model_val_top1"], m["weights"])

    # registering the same scale again makes no new versions
    res = CliRunner().invoke(main, ["register", out["scale_id"], "family", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)["versions"]
    assert [(v["alias"], v["created"]) for v in again] == [("b0", False), ("b1", False)]
    assert [v["version"] for v in again] == [r["version"] for r in out["registered"]]
    assert len(MlflowClient(tracking).search_model_versions("name = 'family'")) == 2

    # what cannot be registered: one line each
    res = CliRunner().invoke(main, ["register", "scale-nope", "family"])
    assert res.exit_code == 2 and "no scale 'scale-nope'" in error_line(res)
    res = CliRunner().invoke(main, ["register", out["scale_id"], "bad:name"])
    assert res.exit_code == 2 and "NAME" in error_line(res)
    # logging models left no tracking URI behind in this process's environment (its subprocesses')
    assert "MLFLOW_TRACKING_URI" not in os.environ

    # export: each format gives the PyTorch model's outputs on a fixed batch (not the export's
    # example batch size: the batch dimension is dynamic), with its card
    import numpy as np
    import onnxruntime
    from safetensors.torch import load_file

    from orchestrator.tracking import Tracker
    from workers.model import build_model

    reference = Tracker(tracking, "compound-scaling").load_torch_model(models["B1"]["model_uri"]).eval()
    x = torch.randn(3, 3, models["B1"]["resolution"], models["B1"]["resolution"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(x)
    outputs = {}
    for fmt in ("pt2", "safetensors", "onnx"):
        path = tmp_path / "export" / f"b1.{fmt}"
        res = CliRunner().invoke(main, ["export", out["scale_id"], "--model", "B1", "--format", fmt, "--out", str(path),
                                        "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        card = json.loads(res.stdout)
        assert json.loads((tmp_path / "export" / f"b1.{fmt}.card.json").read_text())["val_top1"] == models["B1"]["model_val_top1"]
        assert card["classes"] == [str(i) for i in range(10)] and card["resolution"] == models["B1"]["resolution"]
        assert card["command"].startswith(f"orch scale --from-run {search_id}") and card["dataset_digest"].startswith("sha256:")
        assert "val top-1" in (tmp_path / "export" / f"b1.{fmt}.card.md").read_text()
        if fmt == "pt2":
            with torch.no_grad():
                outputs[fmt] = torch.export.load(str(path)).module()(x)
        elif fmt == "safetensors":
            net = build_model(card["spec"])
            net.load_state_dict(load_file(str(path)))
            with torch.no_grad():
                outputs[fmt] = net.eval()(x)
        else:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outputs[fmt] = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert torch.equal(outputs["safetensors"], want)  # the same weights in the same network
    assert torch.allclose(outputs["pt2"], want, atol=1e-5, rtol=0), (outputs["pt2"] - want).abs().max()
    assert np.allclose(outputs["onnx"].numpy(), want.numpy(), atol=1e-4, rtol=0), (outputs["onnx"] - want).abs().max()

    # what cannot be exported: one line each
    res = CliRunner().invoke(main, ["export", out["scale_id"], "--model", "B9", "--format", "pt2", "--out",
                                    str(tmp_path / "x.pt2")])
    assert res.exit_code == 2 and "no member 'B9'" in error_line(res)
    res = CliRunner().invoke(main, ["export", out["scale_id"], "--format", "pt2", "--out", str(tmp_path / "x.pt2")])
    assert res.exit_code == 2 and "--model" in error_line(res)
    res = CliRunner().invoke(main, ["export", models["B0"]["mlflow_run_id"], "--format", "safetensors", "--out",
                                    "/proc/b0.safetensors"])
    assert res.exit_code == 2 and "cannot write" in error_line(res)
