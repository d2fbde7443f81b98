"""`orch ablate`: the arms match the compound member's measured FLOPs (checked by an independent
meta-device measurement), the report's statistics, the one-line errors, and a real ablation on
local Ray killed mid-way, resumed and run again (subprocesses, SQLite, the local MLflow store)."""

import json
import os

import pytest
from click.testing import CliRunner

from benchmarks.faults import crash as sigkill
from benchmarks.faults import spawn
from orchestrator import ablate, baselines, scaling
from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import TINY, error_line
from tests.test_faults import children, finish, mlflow_client
from workers.flops import measure

PAPER = scaling.Coefficients(*scaling.PAPER_POINT)


def _within(arms_, tolerance=ablate.FLOPS_TOLERANCE):
    """Every single-dimension arm's measured FLOPs (meta device, not the solver's cache) within
    ±tolerance of its compound member's; each arm scales only its own dimension."""
    base = measure(arms_[0].spec).macs
    compound = {a.target: measure(a.spec).macs for a in arms_ if a.arm == "compound"}
    assert compound
    for a in arms_[1:]:
        macs = measure(a.spec).macs
        assert abs(macs / base - a.ratio) < 1e-9
        if a.arm != "compound":
            assert abs(macs / compound[a.target] - 1) <= tolerance, (a.label, macs / compound[a.target])
        scaled = {"depth": a.depth != 1.0, "width": a.width != 1.0, "resolution": a.resolution != arms_[0].resolution}
        if a.arm in scaled:
            assert scaled[a.arm] and sum(scaled.values()) == 1, a
        if a.arm == "compound":  # a network of its own: grown in all three (never one of the single arms)
            assert all(scaled.values()), a
            base_key = scaling.network_key(arms_[0].spec)
            for d, w in ((a.depth, 1.0), (1.0, a.width)):
                spec = baselines.spec(a.spec.get("network", "efficientnet-b0"), d, w, arms_[0].resolution,
                                      num_classes=10, dropout=0.2)
                assert scaling.network_key(spec) != base_key, a
    compounds = [scaling.network_key(a.spec) for a in arms_ if a.arm == "compound"]
    assert len(set(compounds)) == len(compounds)  # each target compares a compound network of its own


@pytest.mark.parametrize("network,base,targets,coeffs", [
    ("efficientnet-b0", 224, [2, 4], PAPER),
    ("efficientnet-b0", 56, [2, 4], scaling.Coefficients(1.55, 1.02, 1.11)),
    ("efficientnet-b0", 112, [2, 4, 8], PAPER),
    ("resnet-50", 160, [2], scaling.Coefficients(1.3, 1.1, 1.1)),
    ("tests.usernets:tiny", 64, [2.5], PAPER),
])
def test_every_arm_matches_its_compound_member(network, base, targets, coeffs):
    arms_ = ablate.arms(coeffs, targets, network=network, base_resolution=base, num_classes=10)
    assert [a.arm for a in arms_] == ["baseline"] + ["compound", "depth", "width", "resolution"] * len(targets)
    assert {a.target for a in arms_[1:]} == set(targets)
    _within(arms_)
    for a in arms_:  # the compound member stays within the band of its target
        if a.arm == "compound":
            assert abs(a.ratio / a.target - 1) <= ablate.COMPOUND_BAND


@pytest.mark.parametrize("network,base", [("efficientnet-b0", 32), ("efficientnet-b0", 48), ("mobilenet-v2", 40)])
def test_default_targets_move_where_resolution_jumps(network, base):
    """At small bases one pixel adds a row to every late feature map: 2x cannot be matched by
    resolution alone at base 32 (1x at 32 px, 2.4x at 33 px), and the smallest compound member
    that grows all three dimensions costs 3.7x. Asked explicitly: one error that says so; by
    default: the nearest multiples where every arm can be matched."""
    with pytest.raises(ablate.AblationInputError, match="resolution alone gives 1.000x at 32 px, then 2.410x"):
        ablate.arms(PAPER, [2.0], network="efficientnet-b0", base_resolution=32, num_classes=10)
    arms_ = ablate.arms(PAPER, [2.0, 4.0], network=network, base_resolution=base, num_classes=10, adjust=True)
    targets = sorted({a.target for a in arms_[1:]})
    assert len(targets) == 2 and 2.0 / ablate.ADJUST_FACTOR <= targets[0] <= 2.0 * ablate.ADJUST_FACTOR ** 2
    _within(arms_)


def test_targets_that_name_the_same_runs_are_one_error():
    with pytest.raises(ablate.AblationInputError, match="two targets name the same runs"):
        ablate.arms(PAPER, [2.0, 2.0000001], network="efficientnet-b0", base_resolution=224, num_classes=10)


def test_report_verdicts_and_intervals():
    def runs(arm, accs, target=2.0):
        return [{"arm": arm, "target": target, "seed": s, "val_top1": a, "gmacs": 1.0, "flops_ratio": target}
                for s, a in enumerate(accs)]

    rep = ablate.report(runs("baseline", [0.5, 0.5, 0.5], 1.0) + runs("compound", [0.80, 0.82, 0.81])
                        + runs("depth", [0.70, 0.71, 0.72]) + runs("width", [0.80, 0.83, 0.80])
                        + runs("resolution", [0.90, 0.91, 0.93]))
    (e,) = rep
    assert e["target"] == 2.0 and set(e["arms"]) == set(ablate.ARMS)
    assert e["arms"]["compound"]["mean"] == pytest.approx(0.81) and e["arms"]["compound"]["std"] == pytest.approx(0.01)
    c = e["compound_minus"]
    assert c["depth"]["verdict"] == "wins" and c["depth"]["mean"] == pytest.approx(0.1)
    assert c["width"]["verdict"] == "ties" and c["width"]["ci95"][0] < 0 < c["width"]["ci95"][1]
    assert c["resolution"]["verdict"] == "loses" and c["resolution"]["ci95"][1] < 0
    for arm in ablate.SINGLE:
        lo, hi = c[arm]["ci95"]
        assert lo <= c[arm]["mean"] <= hi
    assert ablate.report(runs("baseline", [0.5], 1.0) + runs("compound", [0.8]) + runs("depth", [0.7])
                         )[0]["compound_minus"]["depth"]["verdict"] == "too few seeds"
    # pairs by seed: a seed missing in one arm leaves that pair out
    rep = ablate.report(runs("compound", [0.8, 0.8, 0.9]) + runs("depth", [0.7, 0.7])[:2])
    assert rep[0]["compound_minus"]["depth"]["pairs"] == 2
    assert "compound wins against depth" in ablate.sentence(rep[0])


@pytest.mark.parametrize("text,says", [("1", "out of range"), ("2,x", "'x' is not a number"), ("", "not a number")])
def test_bad_targets(text, says):
    with pytest.raises(ValueError, match=says):
        ablate.parse_targets(text)


@pytest.mark.slow
def test_ablation_end_to_end_killed_resumed_and_idempotent(tmp_path):
    """A tiny search, then `orch ablate` SIGKILLed (by its own fault point) after its second run
    ended; the same command again trains only what had not finished; a third time trains nothing.
    Subprocesses with their own Ray, as a user runs them (and no in-process Ray is left running
    for the multi-node tests that come after this file)."""
    home = tmp_path / "home"
    env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "search"
    search = finish(spawn(["search", "--gpus", "0", "--trials", "2", "--epochs", "1", "--json", *TINY], env, log), log)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")

    # bad targets at this base (32 px: resolution alone jumps from 1x to 2.4x): one line, nothing recorded
    res = CliRunner().invoke(main, ["ablate", "--from-run", search["search_id"], "--targets", "2", "--dry-run"],
                             env={"ORCH_HOME": str(home)})
    assert res.exit_code == 2 and "resolution alone gives 1.000x at 32 px" in error_line(res)

    # the paper point's trial (coefficients known whatever the search's winner), at base 36
    paper = next(t for t in store.trials(search["search_id"]) if t.off_surface)
    args = ["ablate", "--from-run", paper.trial_id, "--base-resolution", "36", "--targets", "2.56", "--seeds", "2",
            "--gpus", "0", "--json"]
    log = tmp_path / "ablate1"
    p = spawn(args, dict(env, ORCH_KILL_AT="model-ended:2"), log)
    p.wait(timeout=600)
    assert p.returncode == -9, open(f"{log}.err").read()[-2000:]
    sigkill(p)  # and its process group: the Ray it started outlives a killed driver
    (abl,) = [s for s in store.list_scales() if s.kind == "ablation"]
    before = {r.model: r for r in store.scale_runs(abl.id) if r.status == "finished"}
    assert len(before) >= 1  # one ended in full; the second's end was not yet in the store

    log = tmp_path / "ablate2"
    out = finish(spawn(args, env, log), log)
    assert out["ablation_id"] == abl.id and out["status"] == "finished"
    assert not set(before) & set(out["summary"]["trained_now"])  # finished runs were not trained again
    assert set(before) <= set(out["summary"]["done_before"])
    rows = store.scale_runs(abl.id)
    assert len(rows) == 10 and all(r.status == "finished" for r in rows)
    for r in rows:
        assert [h["epoch"] for h in r.history] == [1]
        if r.model in before:
            assert (r.mlflow_run_id, r.started_at) == (before[r.model].mlflow_run_id, before[r.model].started_at)
    assert {(r.arm, r.seed) for r in rows} == {(a, s) for a in ablate.ARMS for s in (0, 1)}
    assert {r.target for r in rows} == {1.0, 2.56}
    base = next(r for r in rows if r.arm == "baseline").gmacs
    compound = next(r for r in rows if r.arm == "compound").gmacs
    for r in rows:
        if r.arm in ablate.SINGLE:
            assert abs(r.gmacs / compound - 1) <= ablate.FLOPS_TOLERANCE + 1e-4  # gmacs are rounded to 1e-4
    (e,) = out["report"]
    assert e["target"] == 2.56 and set(e["arms"]) == set(ablate.ARMS)
    assert set(e["compound_minus"]) == set(ablate.SINGLE)
    for c in e["compound_minus"].values():
        assert c["pairs"] == 2 and c["verdict"] in ("wins", "ties", "loses")
        assert c["ci95"][0] <= c["mean"] <= c["ci95"][1]
    assert len(out["verdicts"]) == 1 and out["verdicts"][0].startswith("at 2.56x the baseline's FLOPs, compound")
    assert base < compound

    client = mlflow_client(home)
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.data.tags["orch.kind"] == "ablation" and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ablation.png", "ablation.json"}
    kids = children(client, parent.info.run_id)
    assert len(kids) == 10 and {k.info.run_id for k in kids} == {r.mlflow_run_id for r in rows}
    assert {(k.data.params["arm"], k.data.params["seed"]) for k in kids} == {(a, str(s)) for a in ablate.ARMS
                                                                            for s in (0, 1)}
    assert parent.data.metrics["x2.56_compound_minus_depth"] == pytest.approx(e["compound_minus"]["depth"]["mean"])

    # the same command once more: nothing trains (no cluster is even started), the same report
    res = CliRunner().invoke(main, args, env={"ORCH_HOME": str(home)}, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again["summary"]["trained_now"] == [] and again["report"] == out["report"]
    res = CliRunner().invoke(main, ["runs", "show", abl.id], env={"ORCH_HOME": str(home)})
    assert res.exit_code == 0 and "compound against single-dimension scaling" in res.output
    assert json.loads(CliRunner().invoke(main, ["runs", "list", "--json"], env={"ORCH_HOME": str(home)}).stdout)[0][
        "kind"] == "ablation"
    store.close()
