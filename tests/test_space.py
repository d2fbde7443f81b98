"""The search spaces: every proposal feasible, γ never below 1, grid de-duplicated by network."""

import math

import optuna
import pytest

from orchestrator import scaling, space


def _sample(kind, n=200, tolerance=0.1):
    fn = space.DefineByRun(kind, tolerance)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(fn(t))
        study.tell(t, 0.0)
    return out


def test_surface_is_exactly_on_the_constraint_with_gamma_at_least_one():
    for p in _sample("surface"):
        assert scaling.constraint_value(p["alpha"], p["beta"], p["gamma"]) == pytest.approx(2.0, abs=1e-9)
        assert p["alpha"] >= 1 and p["beta"] >= 1 and p["gamma"] >= 1


def test_band_stays_within_tolerance():
    pts = _sample("band", tolerance=0.1)
    for p in pts:
        assert abs(scaling.constraint_value(p["alpha"], p["beta"], p["gamma"]) - 2.0) <= 0.1 + 1e-9
        assert min(p.values()) >= 1
    # all three coordinates really vary
    assert len({round(p["gamma"], 3) for p in pts}) > 50


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


def test_grid_candidates_are_distinct_networks_paper_first():
    cands, n_points = space.grid_candidates(0.1, 0.1, base_resolution=32, num_classes=10)
    keys = [c.key for c in cands]
    assert len(keys) == len(set(keys))
    assert len(cands) < n_points  # rounding merges some grid points
    assert (cands[0].alpha, cands[0].beta, cands[0].gamma) == scaling.PAPER_POINT


def test_bad_grid_step():
    with pytest.raises(ValueError, match="grid step"):
        space.grid_points(0.0, 0.1)


def test_candidate_resolution_rounds_to_eight():
    c = space.candidate(1.2, 1.1, 1.15, base_resolution=224, num_classes=10)
    assert c.resolution == 256 and c.spec["num_classes"] == 10
    assert space.candidate(1.0, 1.0, 1.0, base_resolution=100, num_classes=10).resolution == 100
    assert math.isclose(scaling.constraint_value(1.2, 1.1, 1.15), 1.92, rel_tol=0.01)
