"""The search spaces: what trains is within the tolerance on measured FLOPs, γ never below 1,
infeasible proposals are told to Optuna, the grid is de-duplicated by network."""

import math

import optuna
import pytest

from orchestrator import scaling, space


BASES = (32, 40, 64, 100, 128, 224)  # multiples of 32 and not: the staircase differs


def _sample(kind, n=200, tolerance=0.1, base=32, classes=10, flops_tolerance=space.FLOPS_TOLERANCE):
    fn = space.DefineByRun(kind, tolerance, base_resolution=base, num_classes=classes, flops_tolerance=flops_tolerance)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=base))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(fn(t) | {"violation_attr": t.user_attrs[space.VIOLATION_ATTR]})
        study.tell(t, 0.0)
    return out


@pytest.mark.parametrize("kind", ["surface", "band"])
@pytest.mark.parametrize("base", BASES)
def test_every_feasible_proposal_is_within_the_tolerance_on_measured_flops(kind, base):
    """The acceptance check: what trains is held to ±5% of 2x B0 on FLOPs counted on the
    network as built; every other proposal says it is infeasible (and tells Optuna)."""
    from workers.flops import measure

    b0 = measure(scaling.network_spec(1.0, 1.0, base, num_classes=10)).macs
    pts = _sample(kind, n=60, base=base)
    feasible = [p for p in pts if p["flops_violation"] == 0]
    assert len(feasible) >= 0.7 * len(pts), (kind, base, len(feasible))
    for i, p in enumerate(pts):
        assert p["violation_attr"] == p["flops_violation"]
        assert p["alpha"] >= 1 and p["beta"] >= 1 and p["gamma"] >= 1
        c = space.candidate(p["alpha"], p["beta"], p["gamma"], base_resolution=base, num_classes=10)
        if p["flops_violation"] == 0 and i % 20 == 0:  # some measured on the meta device too
            assert abs(measure(c.spec).macs / b0 / 2 - 1) <= space.FLOPS_TOLERANCE + 1e-9, (p, c.spec)
        if p["flops_violation"] == 0:
            assert abs(c.ratio / 2 - 1) <= space.FLOPS_TOLERANCE + 1e-9
        else:
            assert abs(c.ratio / 2 - 1) > space.FLOPS_TOLERANCE


@pytest.mark.parametrize("base", BASES)
def test_grid_candidates_are_within_the_tolerance_and_distinct(base):
    cands, n_points, n_infeasible = space.grid_candidates(0.1, 0.1, base_resolution=base, num_classes=10)
    assert n_points > len(cands) and n_infeasible < n_points
    assert len({c.key for c in cands}) == len(cands)
    assert cands[0].off_surface  # the paper's point first, as published
    assert all(abs(c.ratio / 2 - 1) <= space.FLOPS_TOLERANCE + 1e-9 for c in cands[1:])


def test_resolution_grows_where_the_base_allows_it():
    """At a base that is a multiple of 32 one more pixel gives every stage another row of output
    (33 px: 2x2 last maps instead of 1x1, 2.5x the FLOPs): resolution cannot grow within 2x.
    At other bases it can, in whole pixels."""
    assert space.max_resolution(1.0, 32, 10) == 32
    assert {p["gamma"] for p in _sample("surface", n=40, base=32)} == {1.0}
    grown = {round(p["gamma"] * 40) for p in _sample("surface", n=40, base=40) if p["flops_violation"] == 0}
    assert len(grown) > 5 and min(grown) == 40 or min(grown) > 40


def test_the_paper_point_measures_what_the_issue_found():
    """Issue #14's table: the paper's point measured 4.45x B0 at base 32 (then built at 40 px);
    built now at 37 px (whole pixels), it is still far off the 2x surface: marked, not solved."""
    c = space.candidate(*scaling.PAPER_POINT, base_resolution=32, num_classes=10)
    assert c.off_surface and c.resolution == 37 and c.ratio > 4
    assert not space.candidate(1.2, 1.1, 1.0, base_resolution=32, num_classes=10).off_surface


def test_tpe_learns_from_the_constraint():
    """Infeasible proposals reach TPE as constraint violations (pruned trials, never trained)."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=0, constraints_func=space.flops_constraint, n_startup_trials=5))
    fn = space.DefineByRun("band", 0.3, base_resolution=40, num_classes=10)
    for _ in range(12):
        t = study.ask()
        p = fn(t)
        if p["flops_violation"] > 0:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(t, p["alpha"])
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    recorded = [t.system_attrs.get(_CONSTRAINTS_KEY) for t in study.trials]
    assert all(r is not None for r in recorded)
    assert any(r[0] > 0 for r in recorded) and any(r[0] == 0 for r in recorded)


@pytest.mark.parametrize("kind", ["surface", "band"])
def test_enqueued_paper_point_is_evaluated_as_published(kind):
    fn = space.DefineByRun(kind, 0.1)
    study = optuna.create_study()
    study.enqueue_trial(fn.paper_params(), user_attrs={space.PAPER_ATTR: True})
    t = study.ask()
    p = fn(t)
    assert (p["alpha"], p["beta"], p["gamma"]) == scaling.PAPER_POINT
    assert t.params["alpha"] == pytest.approx(1.2)
    # and the next proposal is Optuna's own
    study.tell(t, 0.5)
    t2 = study.ask()
    assert fn(t2)["alpha"] != 1.2


def test_grid_points_feasible_and_sorted():
    pts = space.grid_points(0.05, 0.1)
    assert pts, "the grid has feasible points"
    devs = [abs(scaling.constraint_value(*p) - 2) for p in pts]
    assert all(d <= 0.1 + 1e-9 for d in devs)
    assert devs == sorted(devs)
    assert all(min(p) >= 1 for p in pts)


def test_bad_grid_step():
    with pytest.raises(ValueError, match="grid step"):
        space.grid_points(0.0, 0.1)


def test_candidate_resolution_in_whole_pixels():
    c = space.candidate(1.2, 1.1, 1.15, base_resolution=224, num_classes=10)
    assert c.resolution == 258 and c.spec["num_classes"] == 10
    assert space.candidate(1.0, 1.0, 1.0, base_resolution=100, num_classes=10).resolution == 100
    assert math.isclose(scaling.constraint_value(1.2, 1.1, 1.15), 1.92, rel_tol=0.01)
