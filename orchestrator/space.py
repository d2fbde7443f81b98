"""The φ=1 search space: candidates whose *measured* FLOPs are twice B0's, and Optuna's view of it.

The formula α·β²·γ² = 2 is not what a network costs once it is built: repeats round up,
channels round to multiples of 8, and at small resolutions the input side is a staircase (a
33 px input gives the last stages 2x2 feature maps instead of 1x1: 4.35x B0 where 32 px gives
1.74x, for the paper's point at base 32). So every candidate is built, its multiply-adds are
counted on the network as built (``workers.cost.count``, equal to the meta-device measurement),
and the constraint holds on that count: within ``tolerance`` (relative, default 5%) of 2x B0.

Width is the free coordinate that is solved. Depth (α) and resolution (γ) are sampled or read
off the grid; the input side is ``base·γ`` rounded to a whole pixel (an 8 px step is a 25%
step at 32 px); then the width multiplier is solved by bisection on the counted FLOPs, since
channels round in steps of 8 over dozens of layers and move FLOPs in small steps. A candidate
whose counted FLOPs cannot come within the tolerance (already above it at width 1, or a step
jumps over the band) is *infeasible*: it is never trained, and Optuna is told so through a
constraint (``flops_constraint``), so TPE learns where they lie.

Three spaces:

- ``surface`` (default): Optuna samples α ∈ [1, ALPHA_MAX] and ``gamma_share`` ∈ [0, 1], which
  places γ between 1 and the largest γ at which depth α still fits the budget at width 1
  (counted: ``max_resolution``); β is solved. Never γ < 1. At a base that is a multiple of 32
  the next whole pixel adds a row of output to every stage (33 px: 2x2 last maps instead of
  1x1), so resolution often cannot grow at all within 2x: γ is then 1, as counted.
- ``band``: all three are sampled so that |α·β²·γ² − 2| ≤ ``band`` (the formula); a candidate
  whose counted FLOPs are within the tolerance trains as sampled, any other gets its width solved.
- ``grid``: the paper's small grid search: every (α, β, γ) on a ``step`` grid with each ≥ 1
  and the formula within ``band``, solved like ``band``, one trial per distinct *network*
  (see ``network_key``); infeasible points are counted and left out.

The paper's point (1.2, 1.1, 1.15) is evaluated as published, at whatever it costs, and is
marked off the surface. The define-by-run function is a small picklable object in this
module: Ray's OptunaSearch saves the searcher with it, and a resumed search must import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from orchestrator import baselines, scaling

SPACES = ("surface", "band", "grid")
#: The largest α sampled: all of the doubling spent on depth.
ALPHA_MAX = 2.0
TARGET = scaling.TARGET_FLOPS_FACTOR
#: Default relative tolerance on the counted FLOPs ratio (2x ± 5%: 1.9x..2.1x). Width steps
#: move FLOPs by up to ~13% at the small bases the proxy task uses, so ±5% is the tightest band
#: most (α, γ) reach; 10% of a 2x budget would let one candidate be 22% bigger than another.
FLOPS_TOLERANCE = 0.05
#: user_attrs marker of the enqueued paper point in the Optuna study.
PAPER_ATTR = "orch_paper_point"
#: user_attrs key of a proposal's constraint violation (> 0: infeasible), for TPE.
VIOLATION_ATTR = "orch_flops_violation"


@dataclass(frozen=True)
class Candidate:
    """One (α, β, γ) as it will be trained: the resolved spec, its network key and its counted
    FLOPs ratio to B0. ``violation`` > 0: no width brings it within the tolerance (infeasible)."""

    alpha: float
    beta: float
    gamma: float
    spec: dict
    ratio: float = 0.0
    violation: float = 0.0
    proposed: tuple = field(default=(), compare=False)  # (α, β, γ) as sampled, before solving

    @property
    def key(self) -> str:
        return scaling.network_key(self.spec)

    @property
    def resolution(self) -> int:
        return self.spec["resolution"]

    @property
    def feasible(self) -> bool:
        return self.violation <= 0

    @property
    def off_surface(self) -> bool:
        return (self.alpha, self.beta, self.gamma) == scaling.PAPER_POINT


def base_macs(base_resolution: int, num_classes: int, network: str = baselines.DEFAULT) -> int:
    """Multiply-adds of the unscaled baseline at the task's base resolution."""
    return _base_macs(base_resolution, num_classes, network)


@lru_cache(maxsize=64)
def _base_macs(base_resolution: int, num_classes: int, network: str) -> int:
    return baselines.macs(baselines.spec(network, 1.0, 1.0, base_resolution, num_classes=num_classes, dropout=0.0))


@lru_cache(maxsize=200_000)
def _ratio(alpha: float, beta: float, resolution: int, base_resolution: int, num_classes: int,
           network: str = baselines.DEFAULT) -> float:
    spec = baselines.spec(network, alpha, beta, resolution, num_classes=num_classes, dropout=0.0)
    return baselines.macs(spec) / _base_macs(base_resolution, num_classes, network)


def _spec(network: str, alpha: float, beta: float, resolution: int, num_classes: int) -> dict:
    return baselines.spec(network, alpha, beta, resolution, num_classes=num_classes,
                          dropout=scaling.compound_dropout(1.0))


def _build(alpha: float, beta: float, resolution: int, base_resolution: int, num_classes: int,
           network: str = baselines.DEFAULT, **kw) -> Candidate:
    return Candidate(alpha, beta, resolution / base_resolution, _spec(network, alpha, beta, resolution, num_classes),
                     _ratio(alpha, beta, resolution, base_resolution, num_classes, network), **kw)


def candidate(alpha: float, beta: float, gamma: float, *, base_resolution: int, num_classes: int,
              network: str = baselines.DEFAULT) -> Candidate:
    """The baseline scaled once (φ = 1) by (α, β, γ) at the task's base resolution, as given (no
    solving): what a trial trains from its config, and the paper's point."""
    res = scaling.resolution_for(base_resolution, gamma)
    return Candidate(alpha, beta, gamma, _spec(network, alpha, beta, res, num_classes),
                     _ratio(alpha, beta, res, base_resolution, num_classes, network))


def solve(alpha: float, beta: float | None, gamma: float, *, base_resolution: int, num_classes: int,
          tolerance: float = FLOPS_TOLERANCE, network: str = baselines.DEFAULT) -> Candidate:
    """The candidate for a proposal: as proposed if its counted FLOPs ratio is within
    ``tolerance`` of 2 (``beta`` None: always solve), else depth and resolution kept and the
    width solved; ``violation`` > 0 if no width ≥ 1 gets within (see the module docstring)."""
    res = scaling.resolution_for(base_resolution, gamma)
    lo_ok, hi_ok = TARGET * (1 - tolerance), TARGET * (1 + tolerance)
    proposed = (alpha, beta, gamma)
    if beta is not None:
        as_is = _build(alpha, beta, res, base_resolution, num_classes, network, proposed=proposed)
        if lo_ok <= as_is.ratio <= hi_ok:
            return as_is

    def ratio(w: float) -> float:
        return _ratio(alpha, w, res, base_resolution, num_classes, network)

    if ratio(1.0) >= TARGET:  # width cannot go below 1: the smallest width is the answer
        best = 1.0
    elif ratio(scaling.COEFF_MAX) < TARGET:
        best = scaling.COEFF_MAX
    else:  # bisection for the step where the ratio crosses 2; then the closer side of it
        lo, hi = 1.0, scaling.COEFF_MAX
        for _ in range(40):
            mid = (lo + hi) / 2
            if ratio(mid) >= TARGET:
                hi = mid
            else:
                lo = mid
        best = min((lo, hi), key=lambda w: abs(ratio(w) - TARGET))
    c = _build(alpha, best, res, base_resolution, num_classes, network, proposed=proposed)
    violation = max(0.0, abs(c.ratio / TARGET - 1.0) - tolerance)
    return Candidate(c.alpha, c.beta, c.gamma, c.spec, c.ratio, violation, proposed)


def flops_constraint(trial) -> tuple[float]:
    """Optuna's constraints_func (TPESampler): > 0 for a proposal whose counted FLOPs no width
    brings within the tolerance. Module level: the sampler is pickled with the searcher."""
    return (float(trial.user_attrs.get(VIOLATION_ATTR, 0.0)),)


@lru_cache(maxsize=4096)
def max_resolution(alpha: float, base_resolution: int, num_classes: int, tolerance: float = FLOPS_TOLERANCE,
                   network: str = baselines.DEFAULT) -> int:
    """The largest input side at which depth α still fits the budget at width 1 (counted FLOPs
    at most 2·(1 + tolerance) x B0); the base itself if none above it does. Counted FLOPs never
    fall as the side grows, so this bounds γ: beyond it every width is infeasible."""
    hi = TARGET * (1 + tolerance)
    res = base_resolution
    while res < 4 * base_resolution and _ratio(alpha, 1.0, res + 1, base_resolution, num_classes, network) <= hi:
        res += 1
    return res


def _beta_max(alpha: float, budget: float) -> float:
    return max(1.0, math.sqrt(budget / alpha))


class DefineByRun:
    """Optuna define-by-run space: suggests the sampled coordinates, solves the candidate, and
    returns (α, β, γ) and the violation as constants (Ray merges them into the trial config)."""

    def __init__(self, kind: str, tolerance: float = 0.1, *, base_resolution: int = 32, num_classes: int = 10,
                 flops_tolerance: float = FLOPS_TOLERANCE, network: str = baselines.DEFAULT):
        if kind not in ("surface", "band"):
            raise ValueError(f"no define-by-run space {kind!r}; use 'surface' or 'band'")
        self.kind = kind
        self.tolerance = tolerance  # the formula's band (space "band")
        self.base_resolution, self.num_classes, self.flops_tolerance = base_resolution, num_classes, flops_tolerance
        self.network = network

    def __setstate__(self, state):  # searchers saved before these existed
        self.__dict__.update({"base_resolution": 32, "num_classes": 10, "flops_tolerance": FLOPS_TOLERANCE,
                              "network": baselines.DEFAULT} | state)

    def _task(self) -> dict:
        return {"base_resolution": self.base_resolution, "num_classes": self.num_classes, "network": self.network}

    def __call__(self, trial) -> dict:
        alpha = trial.suggest_float("alpha", 1.0, ALPHA_MAX)
        # γ's range: up to the side where width 1 already spends the budget (counted, not the
        # formula's sqrt(2/α): rounding makes most of that range infeasible)
        g_max = max_resolution(alpha, self.base_resolution, self.num_classes, self.flops_tolerance,
                               self.network) / self.base_resolution
        if self.kind == "surface":
            gamma_share = trial.suggest_float("gamma_share", 0.0, 1.0)
            beta, gamma = None, 1.0 + gamma_share * (g_max - 1.0)
        else:
            hi = TARGET + self.tolerance
            beta_share = trial.suggest_float("beta_share", 0.0, 1.0)
            beta = 1.0 + beta_share * (_beta_max(alpha, hi) - 1.0)
            gamma_share = trial.suggest_float("gamma_share", 0.0, 1.0)
            g_lo = math.sqrt(max(1.0, (TARGET - self.tolerance) / (alpha * beta * beta)))
            g_hi = max(g_lo, math.sqrt(hi / (alpha * beta * beta)))
            gamma = min(g_max, g_lo + gamma_share * (g_hi - g_lo))
        if trial.user_attrs.get(PAPER_ATTR):
            # The enqueued paper point is evaluated as published, off the surface.
            alpha, beta, gamma = scaling.PAPER_POINT
            c = candidate(alpha, beta, gamma, **self._task())
        else:
            c = solve(alpha, beta, gamma, tolerance=self.flops_tolerance, **self._task())
        trial.set_user_attr(VIOLATION_ATTR, c.violation)
        return {"beta": c.beta, "gamma": c.gamma, "alpha": c.alpha, "flops_violation": c.violation}

    def paper_params(self) -> dict:
        """Optuna params that put the enqueued paper trial where the paper point projects."""
        a, b, g = scaling.PAPER_POINT
        if self.kind == "surface":
            g_max = max_resolution(a, self.base_resolution, self.num_classes, self.flops_tolerance,
                                   self.network) / self.base_resolution
            return {"alpha": a, "gamma_share": min(1.0, (g - 1.0) / (g_max - 1.0)) if g_max > 1 else 0.0}
        budget = TARGET + self.tolerance
        params = {"alpha": a, "beta_share": (b - 1.0) / (_beta_max(a, budget) - 1.0)}
        g_lo = math.sqrt(max(1.0, (TARGET - self.tolerance) / (a * b * b)))
        g_hi = math.sqrt((TARGET + self.tolerance) / (a * b * b))
        params["gamma_share"] = min(1.0, max(0.0, (g - g_lo) / (g_hi - g_lo))) if g_hi > g_lo else 0.0
        return params


def grid_points(step: float = 0.05, tolerance: float = 0.1) -> list[tuple[float, float, float]]:
    """Every feasible (α, β, γ) on the grid, closest to the constraint first."""
    if not (0.005 <= step <= 0.5):
        raise ValueError(f"grid step must be between 0.005 and 0.5, got {step:g}")
    hi = TARGET + tolerance
    n_alpha = int(round((ALPHA_MAX - 1.0) / step))
    n_bg = int(math.floor((math.sqrt(hi) - 1.0) / step + 1e-9))
    pts = []
    for i in range(n_alpha + 1):
        a = round(1.0 + i * step, 6)
        for j in range(n_bg + 1):
            b = round(1.0 + j * step, 6)
            for k in range(n_bg + 1):
                g = round(1.0 + k * step, 6)
                if abs(scaling.constraint_value(a, b, g) - TARGET) <= tolerance + 1e-12:
                    pts.append((a, b, g))
    pts.sort(key=lambda p: (abs(scaling.constraint_value(*p) - TARGET), p))
    return pts


def grid_candidates(step: float, tolerance: float, *, base_resolution: int, num_classes: int,
                    paper_first: bool = True, flops_tolerance: float = FLOPS_TOLERANCE,
                    network: str = baselines.DEFAULT) -> tuple[list[Candidate], int, int]:
    """One candidate per distinct network on the grid (each point solved, the first point that
    builds a network keeps it), the number of grid points, and how many of them no width brings
    within ``flops_tolerance`` (left out). The paper point leads when asked, as published."""
    pts = grid_points(step, tolerance)
    seen: dict[str, Candidate] = {}
    if paper_first:
        c = candidate(*scaling.PAPER_POINT, base_resolution=base_resolution, num_classes=num_classes, network=network)
        seen[c.key] = c
    infeasible = 0
    for a, b, g in pts:
        c = solve(a, b, g, base_resolution=base_resolution, num_classes=num_classes, tolerance=flops_tolerance,
                  network=network)
        if not c.feasible:
            infeasible += 1
            continue
        seen.setdefault(c.key, c)
    return list(seen.values()), len(pts), infeasible
