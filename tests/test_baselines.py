"""`--baseline`: ResNet-50 and MobileNetV2 as torchvision builds them, and a user's own network
(tests/usernets.py) through plan, a real 2-trial search and a 1-model scale (local Ray, SQLite,
the local MLflow store), and every bad callable's one-line error."""

import json

import pytest
from click.testing import CliRunner

from orchestrator import baselines, scaling, space
from orchestrator.cli import main
from tests.conftest import TINY, error_line
from workers.flops import measure
from workers.model import build_model

#: torchvision 0.2x at 224 px, 1000 classes: parameters and multiply-adds (FlopCounterMode's
#: convolution and linear FLOPs / 2; torchvision's model table prints 4.09 and 0.30 GFLOPS).
TORCHVISION = {"resnet-50": (25_557_032, 4_089_184_256), "mobilenet-v2": (3_504_872, 300_774_272)}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_builtin_baselines_match_torchvision(name):
    spec = baselines.spec(name, 1.0, 1.0, 224, num_classes=1000, dropout=0.2)
    cost = measure(spec)
    assert (cost.params, cost.macs) == TORCHVISION[name]
    assert baselines.macs(spec) == cost.macs


@pytest.mark.parametrize("name", ["resnet-50", "mobilenet-v2", "tests.usernets:tiny"])
def test_scaled_networks_grow_and_equal_networks_share_a_key(name):
    import torch

    base = baselines.spec(name, 1.0, 1.0, 64, num_classes=10, dropout=0.2)
    deeper = baselines.spec(name, 1.5, 1.0, 64, num_classes=10, dropout=0.2)
    wider = baselines.spec(name, 1.0, 1.5, 64, num_classes=10, dropout=0.2)
    m0, md, mw = (baselines.macs(s) for s in (base, deeper, wider))
    assert md > m0 and mw > m0
    keys = {scaling.network_key(s) for s in (base, deeper, wider)}
    assert len(keys) == 3
    # multipliers a hair apart round to the same network: one key (a search trains it once)
    assert scaling.network_key(baselines.spec(name, 1.0, 1.001, 64, num_classes=10, dropout=0.2)) \
        == scaling.network_key(base)
    out = build_model(deeper)(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 10)


def test_space_solves_a_resnet_candidate_to_twice_its_flops():
    c = space.solve(1.2, None, 1.1, base_resolution=64, num_classes=10, network="resnet-50")
    assert c.feasible and abs(c.ratio / 2 - 1) <= space.FLOPS_TOLERANCE
    assert c.key.startswith("rn50_") and c.spec["network"] == "resnet-50"


BAD = {
    "tests.usernets:no_depth": "its FLOPs do not grow with the depth multiplier",
    "tests.usernets:not_a_module": "returned a dict, not a torch.nn.Module",
    "tests.usernets:wrong_signature": "must accept the keywords depth, width, resolution, num_classes",
    "tests.usernets:raises": "raised RuntimeError for depth=1, width=1: out of ideas",
    "tests.usernets:bad_forward": "does not run on a (1, 3, 32, 32) image",
    "tests.usernets:NOT_CALLABLE": "NOT_CALLABLE is a int, not a callable",
    "tests.usernets:missing": "tests.usernets has no 'missing'",
    "tests.nosuchmodule:build": "cannot import 'tests.nosuchmodule' (ModuleNotFoundError",
    "resnet-51": "unknown baseline 'resnet-51'; use one of efficientnet-b0, resnet-50, mobilenet-v2",
}


@pytest.mark.parametrize("ref", sorted(BAD))
def test_a_bad_baseline_gets_one_line(ref, home):
    res = CliRunner().invoke(main, ["plan", "--baseline", ref, "--base-resolution", "32", "--num-classes", "10"])
    assert res.exit_code == 2
    line = error_line(res)
    assert "--baseline" in line and BAD[ref] in line, line


def test_a_bad_baseline_stops_a_search_before_anything_is_recorded(home):
    from tests.conftest import no_search_recorded

    res = CliRunner().invoke(main, ["search", "--gpus", "0", "--baseline", "tests.usernets:no_depth", *TINY])
    assert res.exit_code == 2 and "its FLOPs do not grow" in error_line(res)
    no_search_recorded(home)


def test_official_mode_is_efficientnets_table(home):
    res = CliRunner().invoke(main, ["plan", "--mode", "official", "--baseline", "resnet-50"])
    assert res.exit_code == 2 and "--mode official is EfficientNet's" in error_line(res)


@pytest.mark.slow
def test_a_users_network_end_to_end(home, tmp_path):
    """plan, a 2-trial search and a 1-model scale of tests.usernets:tiny, for real (the search and
    the scale as subprocesses with their own Ray, as a user runs them)."""
    import os

    from benchmarks.faults import spawn
    from orchestrator.store import ResultsStore
    from tests.test_faults import finish

    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)

    ref = "tests.usernets:tiny"
    res = CliRunner().invoke(main, ["plan", "--baseline", ref, "--phis", "1", "--base-resolution", "32",
                                    "--num-classes", "10", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == ["B0", "B1"] and rows[1]["flops_ratio"] > 1.0
    assert rows[0]["network_key"].startswith("tests.usernets.tiny_") and rows[0]["repeats"] == []

    log = tmp_path / "search"
    search = finish(spawn(["search", "--gpus", "0", "--trials", "2", "--epochs", "1", "--baseline", ref, *TINY,
                           "--json"], env, log), log)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    rec = store.get_search(search["search_id"])
    assert rec.config["network"] == ref
    trials = store.trials(rec.id)
    assert len(trials) == 2 and all(t.network_key.startswith("tests.usernets.tiny_") for t in trials)
    trained = [t for t in trials if t.status in ("finished", "stopped")]
    assert trained and all(t.val_top1 is not None for t in trained)
    assert {t.status for t in trials} <= {"finished", "stopped", "infeasible"}
    for t in trained:  # what trained is the network the solver held to 2x the baseline's measured FLOPs
        if not t.off_surface:
            assert abs(t.flops_ratio / 2 - 1) <= space.FLOPS_TOLERANCE, t.flops_ratio

    log = tmp_path / "scale"
    out = finish(spawn(["scale", "--from-run", rec.id, "--phis", "1", "--no-baseline", "--gpus", "0", "--json"],
                       env, log), log)
    assert out["status"] == "finished" and [m["name"] for m in out["models"]] == ["B1"]
    sc = store.get_scale(out["scale_id"])
    assert sc.config["network"] == ref
    run = store.scale_runs(sc.id)[0]
    assert run.network_key.startswith("tests.usernets.tiny_") and run.val_top1 is not None


@pytest.mark.parametrize("name", ["resnet-50", "mobilenet-v2"])
@pytest.mark.parametrize("depth,width,res", [(1.0, 1.0, 224), (1.3, 1.0, 97), (1.0, 1.37, 64), (2.1, 1.6, 33)])
def test_arithmetic_count_equals_the_meta_device(name, depth, width, res):
    """What the solver counts by arithmetic is what the built network measures."""
    from workers.cost import count

    spec = baselines.spec(name, depth, width, res, num_classes=17, dropout=0.2)
    c, m = count(spec), measure(spec)
    assert (c.params, c.macs, c.activations) == (m.params, m.macs, m.activations)
