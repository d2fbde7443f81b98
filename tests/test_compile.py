"""Compiled steps (workers/compiled.py) on CPU: Inductor's real code generation in fresh
processes sharing one cache folder (as the trials of a node do), the fallback to eager when
compilation fails (a node without a working C++ compiler), and `auto`'s rule. Search and scale
with `--compile on`: tests/test_scale_e2e.py. The GPU figures: benchmarks/compile_gpu.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers import compiled, train

ROOT = Path(__file__).resolve().parents[1]

#: One stage of two blocks, so a cold Inductor build takes seconds on 2 cores instead of a
#: minute for the tiny B0 topology.
SMALL = {"stem": 8, "head": 16, "resolution": 16, "num_classes": 10, "dropout": 0.0, "drop_path": 0.0,
         "stages": [{"repeats": 2, "kernel": 3, "stride": 2, "expand": 2, "in": 8, "out": 8, "se": 0.25}]}

RUN = """
import json, sys
from torch._dynamo.utils import counters
from workers import train
spec = json.loads(sys.argv[1])
hist = train.run(dict(spec=spec, dataset="synthetic", synthetic_size=(64, 32), epochs=2, batch_size=16,
                      compile=sys.argv[2]), lambda m, c: None)
print("RESULT " + json.dumps({"history": hist, "inductor": dict(counters["inductor"])}))
"""


def _run(mode: str, env: dict) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-c", RUN, json.dumps(SMALL), mode], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, **env})
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[7:]), p.stderr


@pytest.fixture
def inductor(tmp_path):
    """Inductor (the real backend) with a compile cache of this test's own, cold at the start."""
    return {"ORCH_COMPILE_BACKEND": "inductor", "ORCH_COMPILE_CACHE": str(tmp_path / "compiled")}


@pytest.mark.slow
def test_a_second_process_loads_the_network_from_the_node_cache(inductor):
    env = inductor
    first, _ = _run("on", env)
    second, _ = _run("on", env)
    h1, h2 = first["history"], second["history"]
    assert h1[0]["compiled"] == 1.0 and h2[-1]["compiled"] == 1.0
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0  # the first one generated code
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0  # the second one compiled nothing
    assert second["inductor"].get("fxgraph_cache_hit", 0) == first["inductor"]["fxgraph_cache_miss"]
    assert h2[0]["compile_s"] < h1[0]["compile_s"] / 2
    assert h1[1]["compile_s"] == h1[0]["compile_s"]  # all of it in the first epoch
    assert (Path(env["ORCH_COMPILE_CACHE"]) / "orch-networks").is_dir()  # auto's record of the seconds
    # what was compiled trains what eager trains (same seeds; fp32 on CPU)
    eager, _ = _run("off", {})
    assert h1[-1]["train_loss"] == pytest.approx(eager["history"][-1]["train_loss"], rel=1e-3)


def test_a_failed_compile_continues_eager_with_one_warning(inductor):
    # A node whose C++ compiler does not work: Inductor cannot build CPU kernels.
    result, stderr = _run("on", inductor | {"CXX": "/bin/false"})
    warnings = [ln for ln in stderr.splitlines() if "torch.compile failed" in ln]
    assert len(warnings) == 1, stderr[-3000:]
    assert "continues eager" in warnings[0] and "Traceback" not in stderr
    hist = result["history"]
    assert len(hist) == 2 and all(h["compiled"] == 0.0 for h in hist)
    eager, _ = _run("off", {})  # the failed attempt changed nothing: the run is the eager run
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in eager["history"]]


def test_an_unknown_backend_falls_back_too(monkeypatch, capfd):
    monkeypatch.setenv("ORCH_COMPILE_BACKEND", "no_such_backend")
    hist = train.run(dict(spec=SMALL, dataset="synthetic", synthetic_size=(64, 32), epochs=1, batch_size=16,
                          compile="on"), lambda m, c: None)
    err = capfd.readouterr().err
    assert err.count("torch.compile failed") == 1 and "no_such_backend" in err
    assert hist[0]["compiled"] == 0.0


def test_auto_is_off_on_cpu():
    hist = train.run(dict(spec=SMALL, dataset="synthetic", synthetic_size=(64, 32), epochs=1, batch_size=16,
                          compile="auto"), lambda m, c: None)
    assert hist[0]["compiled"] == 0.0 and hist[0]["compile_s"] == 0.0


def test_modes_and_the_auto_rule(tmp_path, monkeypatch):
    assert compiled.resolve_mode(True) == "on" and compiled.resolve_mode(False) == "off"
    assert compiled.resolve_mode("auto") == "auto"
    with pytest.raises(ValueError, match="auto, on, off"):
        compiled.resolve_mode("fast")
    with pytest.raises(ValueError, match="compile must be"):
        train.run(dict(spec=SMALL, dataset="synthetic", synthetic_size=(64, 32), epochs=1, compile="fast"),
                  lambda m, c: None)
    # compile pays when the steps left save more than twice its cost
    step_s, cost = 0.05, 60.0
    even = round(2 * cost / (step_s * compiled.SAVING))
    assert not compiled.pays_off(step_s, even - 10, cost) and compiled.pays_off(step_s, even + 10, cost)
    # what it expects to pay: this network's last compile on this node, else a cold estimate per block
    monkeypatch.setenv("ORCH_COMPILE_CACHE", str(tmp_path))
    model = train.build_model(SMALL)
    assert compiled.blocks(model) == 2
    key = compiled.network_key(SMALL, 16, train.pick_device())
    assert compiled.expected_seconds(key, model) == 2 * compiled.COLD_S_PER_BLOCK
    compiled.record_seconds(key, 3.5)
    assert compiled.recorded_seconds(key) == 3.5 and compiled.expected_seconds(key, model) == 3.5


def test_proxy_trials_are_packed_by_base_resolution():
    """The default --gpus-per-trial (orchestrator/cluster.py, from the packing figures)."""
    from orchestrator import cluster

    info = cluster.ClusterInfo(cpus=64, gpus=4, address="10.0.0.1:6379", started_here=False)
    expect = {40: 0.125, 90: 0.125, 128: 0.25, 160: 0.5, 181: 0.5, 224: 1.0, 600: 1.0}
    for res, gpt in expect.items():
        assert cluster.default_gpus_per_trial(res) == gpt, res
        assert cluster.plan_resources(info, gpus=None, gpus_per_trial=None, cpus_per_trial=1.0,
                                      base_resolution=res) == (gpt, 1.0, min(64, int(4 / gpt)))
    # what the user gives wins; a budget below one trial's default share is that trial's share
    assert cluster.plan_resources(info, gpus=None, gpus_per_trial=1.0, cpus_per_trial=1.0, base_resolution=128)[0] == 1.0
    assert cluster.plan_resources(info, gpus=0.5, gpus_per_trial=None, cpus_per_trial=1.0, base_resolution=224)[:3:2] \
        == (0.5, 1)
    # CPU trials and CPU-bound concurrency are as before
    assert cluster.plan_resources(info, gpus=0, gpus_per_trial=None, cpus_per_trial=2.0, base_resolution=128) \
        == (0.0, 2.0, 32)
    few_cpus = cluster.ClusterInfo(cpus=8, gpus=4, address=None, started_here=True)
    assert cluster.plan_resources(few_cpus, gpus=None, gpus_per_trial=None, cpus_per_trial=1.0,
                                  base_resolution=40) == (0.125, 1.0, 8)


def test_a_search_stored_before_compile_and_packing_resumes_as_it_ran(tmp_path):
    """Its stored options lack `compile` (it ran eager) and left --gpus-per-trial to the default of
    the time (1 GPU, recorded in its row): resumed, it keeps both."""
    from orchestrator.search import options_of
    from orchestrator.store import ResultsStore

    store = ResultsStore(f"sqlite:///{tmp_path / 'orch.db'}")
    store.create_search("search-old", "old", {"epochs": 2, "gpus": 4.0, "gpus_per_trial": None})
    store.update_search("search-old", gpus_per_trial=1.0)
    opts = options_of(store.get_search("search-old"))
    assert opts.compile == "off" and opts.gpus_per_trial == 1.0
    store.create_search("search-new", "new", {"epochs": 2, "gpus": 4.0, "gpus_per_trial": None, "compile": "auto"})
    store.update_search("search-new", gpus_per_trial=0.125)
    opts = options_of(store.get_search("search-new"))
    assert opts.compile == "auto" and opts.gpus_per_trial is None  # planned again, as it first was
    store.close()
