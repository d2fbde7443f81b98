"""`orch scale` without Ray: the batch rule, resolving --from-run, the plan, the dry run, and bad
input refused before anything launches. The store is a real SQLite file written through the
ResultsStore, as `orch search` would leave it."""

import json

import pytest
from click.testing import CliRunner

from orchestrator import cluster, scaling
from orchestrator import scale as scale_mod
from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import error_line

TRIAL = dict(network_key="k", resolution=40, params=100, gmacs=0.02, flops_ratio=2.0, epochs_done=2, history=[])
CONFIG = {"epochs": 2, "dataset": "synthetic", "base_resolution": 32, "num_classes": 10, "batch_size": 32,
          "lr": 0.03, "seed": 0, "synthetic_size": [128, 64]}


@pytest.fixture
def store(home):
    """Searches in every state: done (winner t-win), running, failed, no winner, interrupted."""
    st = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    st.create_search("s-done", "done", CONFIG, mlflow_run_id="mlrun-done")
    st.upsert_trial("s-done", "t-win", alpha=1.3, beta=1.1, gamma=1.1, status="finished", val_top1=0.6,
                    mlflow_run_id="mlrun-twin", **TRIAL)
    st.upsert_trial("s-done", "t-other", alpha=1.1, beta=1.2, gamma=1.1, status="stopped", val_top1=0.4, **TRIAL)
    st.upsert_trial("s-done", "t-failed", alpha=1.1, beta=1.2, gamma=1.1, status="failed", error="boom", **TRIAL)
    st.update_search("s-done", status="finished", best_trial_id="t-win")
    st.create_search("s-running", "running", CONFIG)
    st.create_search("s-failed", "failed", CONFIG)
    st.update_search("s-failed", status="failed", error="no trial finished")
    st.create_search("s-empty", "empty", CONFIG)
    st.update_search("s-empty", status="finished")
    st.create_search("s-int", "interrupted", CONFIG)
    st.upsert_trial("s-int", "t-int", alpha=1.2, beta=1.1, gamma=1.15, status="finished", val_top1=0.5, **TRIAL)
    st.update_search("s-int", status="interrupted", best_trial_id="t-int")
    yield st
    st.close()


# --------------------------------------------------------------------------- the batch rule


def test_batch_shrinks_with_sqrt_flops_and_lr_follows_the_global_batch():
    rule = dict(base_batch=256, base_lr=0.1, workers=1, rule="sqrt-flops")
    assert scale_mod.batch_and_lr(1.0, **rule) == (256, pytest.approx(0.1))
    assert scale_mod.batch_and_lr(4.0, **rule) == (128, pytest.approx(0.05))
    # the reference runs: B3 (~4.7x B0) bs128, B5 (~26x) bs48, B7 (~98x) bs16-24
    assert scale_mod.batch_and_lr(4.7, **rule)[0] == 112
    assert scale_mod.batch_and_lr(26.6, **rule)[0] == 48
    assert scale_mod.batch_and_lr(97.8, **rule)[0] == 24
    assert scale_mod.batch_and_lr(10_000.0, **rule)[0] == scale_mod.MIN_BATCH
    assert scale_mod.batch_and_lr(4.0, **(rule | {"workers": 4})) == (128, pytest.approx(0.2))
    assert scale_mod.batch_and_lr(4.0, **(rule | {"rule": "fixed"})) == (256, pytest.approx(0.1))
    assert scale_mod.batch_and_lr(100.0, **(rule | {"base_batch": 4})) == (4, pytest.approx(0.1))
    with pytest.raises(ValueError, match="unknown batch rule"):
        scale_mod.batch_and_lr(1.0, **(rule | {"rule": "linear"}))


def test_plan_rows_carry_batch_lr_and_spec():
    opts = scale_mod.ScaleOptions(phis=[1.0, 2.0], base_resolution=32, num_classes=10, batch_size=64, lr=0.04,
                                  batch_rule="sqrt-flops")
    rows = scale_mod.build_plan(opts, scaling.Coefficients(1.2, 1.1, 1.15))
    assert [r["name"] for r in rows] == ["B0", "B1", "B2"]
    assert rows[0]["batch_size"] == 64 and rows[0]["lr"] == pytest.approx(0.04)
    assert rows[2]["batch_size"] <= rows[1]["batch_size"] < 64 and rows[2]["flops_ratio"] > rows[1]["flops_ratio"]
    fit = scale_mod.build_plan(scale_mod.ScaleOptions(phis=[1.0, 2.0], base_resolution=32, num_classes=10,
                                                      batch_size=64), scaling.Coefficients(1.2, 1.1, 1.15))
    assert [r["batch_size"] for r in fit] == [64, 64, 64]  # the default rule on CPU: no shrinking
    for r in rows:
        assert r["lr"] == pytest.approx(0.04 * r["batch_size"] / 64)
        assert r["spec"]["resolution"] == r["resolution"]
    off = scale_mod.plan_entries(scale_mod.ScaleOptions(mode="official", phis=[1.0, 3.0]), scaling.Coefficients(1, 1, 1))
    assert [e.name for e in off] == ["B0", "B1", "B3"]
    with pytest.raises(scale_mod.ScaleInputError, match="B1..B7 only"):
        scale_mod.plan_entries(scale_mod.ScaleOptions(mode="official", phis=[1.5]), scaling.Coefficients(1, 1, 1))


def test_scale_id_names_what_is_trained(store):
    src = scale_mod.resolve_source(store, "s-done")
    c = scaling.Coefficients(src.trial.alpha, src.trial.beta, src.trial.gamma)
    a = scale_mod.scale_id_for(src, c, scale_mod.ScaleOptions(phis=[1.0, 2.0]))
    assert a == scale_mod.scale_id_for(src, c, scale_mod.ScaleOptions(phis=[1.0, 2.0], gpus=8, max_failures=5))
    assert a != scale_mod.scale_id_for(src, c, scale_mod.ScaleOptions(phis=[1.0, 2.0, 3.0]))
    assert a != scale_mod.scale_id_for(src, c, scale_mod.ScaleOptions(phis=[1.0, 2.0], epochs=4))
    assert a != scale_mod.scale_id_for(src, c, scale_mod.ScaleOptions(phis=[1.0, 2.0], workers=2))


# --------------------------------------------------------------------------- --from-run


def test_every_kind_of_id_resolves(store):
    for ref in ("s-done", "mlrun-done", "latest"):
        src = scale_mod.resolve_source(store, ref)
        assert (src.search.id, src.trial.trial_id, src.via) == ("s-done", "t-win", "search"), ref
    for ref in ("t-other", "mlrun-twin"):
        src = scale_mod.resolve_source(store, ref)
        assert src.via == "trial" and src.trial.trial_id == ("t-other" if ref == "t-other" else "t-win")
    src = scale_mod.resolve_source(store, "s-int")
    assert src.trial.trial_id == "t-int" and "interrupted" in src.note


@pytest.mark.parametrize(
    "ref, says",
    [
        ("s-running", "still running"),
        ("s-failed", r"failed \(no trial finished\)"),
        ("s-empty", "no finished trial"),
        ("t-failed", "is failed: boom"),
        ("nope", "takes a search id, a scale id, a trial id"),
    ],
)
def test_unscalable_sources_are_refused_with_the_reason(store, ref, says):
    with pytest.raises(scale_mod.ScaleInputError, match=says):
        scale_mod.resolve_source(store, ref)


# --------------------------------------------------------------------------- the command


def _scale(args):
    return CliRunner().invoke(main, ["scale", "--gpus", "0", *args])


@pytest.mark.parametrize(
    "args, says",
    [
        (["--from-run", "nope"], "no search, scale or trial 'nope'"),
        (["--from-run", "../../etc/passwd"], "is not an id"),
        (["--from-run", "%2e%2e%2fetc%2fpasswd"], "is not an id"),
        (["--from-run", "a/b"], "is not an id"),
        (["--from-run", "x" * 10_000], "is not an id"),
        (["--from-run", "s-done'; DROP TABLE searches; --"], "is not an id"),
        (["--from-run", "s-done\x00"], "is not an id"),
        (["--from-run", "s-running"], "still running"),
        (["--from-run", "s-failed"], "failed"),
        (["--from-run", "s-done", "--phis", "11"], "at most 10"),
        (["--from-run", "s-done", "--phis", "0"], "above 0"),
        (["--from-run", "s-done", "--phis", "1-x"], "not a number"),
        (["--from-run", "s-done", "--mode", "official", "--phis", "1.5"], "B1..B7 only"),
        (["--from-run", "s-done", "--gpus-per-job", "4", "--gpus", "2"], "above the --gpus budget 2"),
        (["--from-run", "s-done", "--gpus-per-job", "1"], "needs a GPU budget"),
        (["--from-run", "s-done", "--dataset", "cifar"], "unknown dataset"),
        (["--from-run", "s-done", "--epochs", "0"], "--epochs"),
        (["--from-run", "s-done", "--gpus", "2", "--gpus-per-job", "1", "--workers-per-job", "2"], "give one"),
    ],
)
def test_bad_input_fails_before_anything_launches(home, store, args, says):
    res = _scale(args)
    assert res.exit_code == 2, res.output
    assert says in error_line(res)
    assert store.list_scales() == []
    assert not (home / "mlflow.db").exists()  # no MLflow run was created either


def test_stored_options_this_orch_does_not_know_are_named(home, store):
    # A search or an earlier scale stored with an option this orch lacks (a newer orch's, a
    # hand-edited row) is refused with the option's name, not scaled with it silently dropped.
    store.create_search("s-newer", "newer", CONFIG | {"mixup": 0.2})
    store.upsert_trial("s-newer", "t-newer", alpha=1.3, beta=1.1, gamma=1.1, status="finished", val_top1=0.6, **TRIAL)
    store.update_search("s-newer", status="finished", best_trial_id="t-newer")
    res = _scale(["--from-run", "s-newer", "--dry-run"])
    assert res.exit_code == 2 and "does not know (mixup)" in error_line(res), res.output
    store.create_scale("scale-newer", search_id="s-done", trial_id="t-win", plan=[],
                       config={"mode": "compound", "alpha": 1.3, "beta": 1.1, "gamma": 1.1, "warmup_epochs": 5})
    res = _scale(["--from-run", "scale-newer", "--dry-run"])
    assert res.exit_code == 2 and "does not know (warmup_epochs)" in error_line(res), res.output
    assert "--from-run" in error_line(res)


def test_a_search_whose_data_is_gone_says_to_pass_dataset(home, store, tmp_path):
    store.create_search("s-gone", "gone", CONFIG | {"dataset": f"imagefolder:{tmp_path / 'moved'}"})
    store.upsert_trial("s-gone", "t-gone", alpha=1.3, beta=1.1, gamma=1.1, status="finished", val_top1=0.6, **TRIAL)
    store.update_search("s-gone", status="finished", best_trial_id="t-gone")
    res = _scale(["--from-run", "s-gone", "--dry-run"])
    assert res.exit_code == 2 and "the dataset of s-gone cannot be read" in error_line(res), res.output
    assert "pass --dataset" in error_line(res) and "Traceback" not in res.output


def test_dry_run_prints_the_plan_and_launches_nothing(home, store):
    res = CliRunner().invoke(main, ["scale", "--from-run", "s-done", "--phis", "1-2", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "B2" in res.output and "dry run: nothing launched" in res.output
    res = CliRunner().invoke(main, ["scale", "--from-run", "t-other", "--phis", "1", "--dry-run", "--json"])
    out = json.loads(res.stdout)
    assert out["trial_id"] == "t-other" and [m["name"] for m in out["models"]] == ["B0", "B1"]
    # the search's settings are the defaults
    assert out["options"]["epochs"] == 2 and out["options"]["synthetic_size"] == [128, 64]
    assert out["models"][0]["batch_size"] == 32 and out["models"][0]["lr"] == pytest.approx(0.03)
    assert store.list_scales() == [] and not (home / "mlflow.db").exists()


def test_job_resources_are_checked_against_the_cluster():
    info = cluster.ClusterInfo(cpus=4, gpus=8, address=None, started_here=False)
    r = cluster.plan_job_resources(info, gpus=None, workers=2, cpus_per_worker=1)
    assert (r.use_gpu, r.workers, r.concurrency, r.per_worker) == (True, 2, 2, {"CPU": 1, "GPU": 1})  # 4 CPUs cap it
    r = cluster.plan_job_resources(info, gpus=0, workers=2, cpus_per_worker=1)
    assert (r.use_gpu, r.concurrency) == (False, 2)
    for kwargs, says in [
        (dict(gpus=16, workers=1, cpus_per_worker=1), "more GPUs than the cluster has"),
        (dict(gpus=2, workers=4, cpus_per_worker=1), "above the --gpus budget"),
        (dict(gpus=0.5, workers=1, cpus_per_worker=1), "takes a whole GPU"),
        (dict(gpus=0, workers=8, cpus_per_worker=1), "the cluster has 4"),
        (dict(gpus=0, workers=1, cpus_per_worker=1, gpu_workers_asked=True), "needs GPUs"),
    ]:
        with pytest.raises(cluster.ClusterError, match=says):
            cluster.plan_job_resources(info, **kwargs)


def test_family_plot_is_a_png(tmp_path):
    path = scale_mod.plot_family([("B0", 0.01, 0.3), ("B1", 0.02, 0.4), ("B2", 0.05, 0.45)], tmp_path / "f.png",
                                 title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_the_family_view_and_its_urls():
    from urllib.parse import parse_qs, urlparse

    from orchestrator.tracking import VIEW_METRICS, family_urls, family_view

    key, view = family_view("scale-0123abcd")
    state = json.loads(view["state"])
    assert key == "scale-0123abcd" and view["name"] == "orch family scale-0123abcd"
    assert state["searchFilter"] == "tags.`orch.scale_id` = 'scale-0123abcd' and tags.`orch.kind` = 'model'"
    assert state["orderByKey"] == "metrics.`gmacs`" and state["orderByAsc"] is True  # B0 first
    assert [c for c in state["selectedColumns"] if c.startswith("metrics.")] == [f"metrics.`{m}`" for m in VIEW_METRICS]
    (scatter,) = [c for c in state["compareRunCharts"] if c["type"] == "SCATTER"]
    assert (scatter["xaxis"]["key"], scatter["yaxis"]["key"]) == ("gmacs", "val_top1")
    assert len(json.dumps(view)) < 5000  # an experiment tag's value
    table, charts = family_urls("http://h:1/", "7", key)
    frag = urlparse(table).fragment
    assert frag.startswith("/experiments/7/runs?")
    assert parse_qs(frag.split("?", 1)[1]) == {"workflowType": ["machine_learning"], "viewStateShareKey": [key]}
    assert charts == table + "&compareRunsMode=CHART"
    assert family_urls("http://h:1", "7", None)[0] == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"


def test_storage_defaults_to_the_state_folder_only_on_one_machine(tmp_path):
    one = cluster.ClusterInfo(cpus=2, gpus=0, address=None, started_here=True, nodes=1)
    many = cluster.ClusterInfo(cpus=64, gpus=8, address="10.0.0.1:6379", started_here=False, nodes=3)
    remote = cluster.ClusterInfo(cpus=8, gpus=0, address="ray://head:10001", started_here=False, nodes=1)
    assert cluster.resolve_storage(one, None, tmp_path / "ray") == str((tmp_path / "ray").resolve())
    for info in (many, remote):
        with pytest.raises(cluster.ClusterError, match="pass --storage"):
            cluster.resolve_storage(info, None, tmp_path / "ray")
    assert cluster.resolve_storage(many, "s3://bucket/orch", tmp_path) == "s3://bucket/orch"
    assert cluster.resolve_storage(many, str(tmp_path / "nfs"), tmp_path) == str((tmp_path / "nfs").resolve())


def test_unreachable_ray_address_is_a_bounded_clear_error(home):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for addr in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(cluster.ClusterError, match="cannot reach Ray"):
            cluster._check_reachable(addr)
    with pytest.raises(cluster.ClusterError, match="cannot parse Ray address"):
        cluster._check_reachable("head-without-port")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "search", "--gpus", "0", "--address",
                          f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, ORCH_HOME=str(home)))
    assert res.returncode == 2 and "cannot reach Ray at 127.0.0.1:" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60  # ray.init alone would retry for minutes


def test_the_fit_rule_shrinks_a_batch_only_where_memory_demands_it():
    """CPU jobs (no GPU memory to plan against) keep B0's batch for every member; on a GPU the
    batch shrinks only for members whose estimated memory does not fit, to the largest multiple
    of 8 that does; the lr follows the batch."""
    from orchestrator import scaling
    from workers.cost import count

    def member(name):  # B0 and B7 at 224 px, 1000 classes
        w, d, r, _ = scaling.OFFICIAL[name]
        return count(scaling.network_spec(d, w, r, num_classes=1000)).activations / 1e6

    rule = dict(base_batch=256, base_lr=0.1, workers=1, rule="fit")
    b0, b7 = member("B0"), member("B7")
    assert scale_mod.batch_and_lr(1.0, activations_m=b0, **rule) == (256, pytest.approx(0.1))  # CPU
    assert scale_mod.batch_and_lr(98.0, activations_m=b7, **rule) == (256, pytest.approx(0.1))  # CPU: never
    assert scale_mod.batch_and_lr(1.0, activations_m=b0, gpu_memory_gb=141, **rule)[0] == 256  # room: kept
    batch, lr = scale_mod.batch_and_lr(98.0, activations_m=b7, gpu_memory_gb=80, **rule)
    assert 8 <= batch < 256 and batch % 8 == 0 and lr == pytest.approx(0.1 * batch / 256)
    assert b7 * 1e6 * batch * scale_mod.BYTES_PER_ACTIVATION <= 0.8 * 80e9  # it fits...
    assert b7 * 1e6 * (batch + 8) * scale_mod.BYTES_PER_ACTIVATION > 0.8 * 80e9  # ... and is the largest that does
    smaller, _ = scale_mod.batch_and_lr(98.0, activations_m=b7, gpu_memory_gb=24, **rule)
    assert smaller < batch  # less memory, smaller batch


def test_gpu_memory_the_fit_rule_plans_against():
    assert scale_mod.gpu_memory_for(gpus=0, given_gb=None, address=None) is None
    assert scale_mod.gpu_memory_for(gpus=8, given_gb=40.0, address=None) == 40.0
    # this CPU-only machine: the embedded instance has no GPU; a cluster's GPUs are assumed 80 GB
    assert scale_mod.gpu_memory_for(gpus=None, given_gb=None, address=None) is None
    assert scale_mod.gpu_memory_for(gpus=None, given_gb=None, address="10.0.0.1:6379") == 80.0
