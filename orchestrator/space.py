"""The φ=1 search space on (or near) the constraint surface α·β²·γ² = 2, and candidates.

Three spaces:

- ``surface`` (default): Optuna samples α ∈ [1, ALPHA_MAX] and ``beta_share`` ∈ [0, 1], which
  places β between 1 and the largest β that still leaves γ ≥ 1; γ is derived so that
  α·β²·γ² = 2 exactly. Every proposal is feasible; none has γ < 1.
- ``band``: all three are sampled (α, then β and γ as shares of what is still feasible), so
  that |α·β²·γ² − 2| ≤ tolerance holds for every proposal by construction.
- ``grid``: the paper's small grid search: every (α, β, γ) on a ``step`` grid with each ≥ 1
  and |α·β²·γ² − 2| ≤ tolerance, one trial per distinct *network* (see ``network_key``).

The define-by-run function is a small picklable object in this module: Ray's OptunaSearch
saves the searcher with it, and a resumed search must be able to import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator import scaling

SPACES = ("surface", "band", "grid")
#: The largest α sampled: all of the doubling spent on depth.
ALPHA_MAX = 2.0
TARGET = scaling.TARGET_FLOPS_FACTOR
#: user_attrs marker of the enqueued paper point in the Optuna study.
PAPER_ATTR = "orch_paper_point"


@dataclass(frozen=True)
class Candidate:
    """One (α, β, γ) as it will be trained: the resolved spec and its network key."""

    alpha: float
    beta: float
    gamma: float
    spec: dict

    @property
    def key(self) -> str:
        return scaling.network_key(self.spec)

    @property
    def resolution(self) -> int:
        return self.spec["resolution"]


def candidate(alpha: float, beta: float, gamma: float, *, base_resolution: int, num_classes: int) -> Candidate:
    """B0 scaled once (φ = 1) by (α, β, γ) at the task's base resolution."""
    res = base_resolution if gamma == 1.0 else scaling.round_resolution(base_resolution * gamma)
    spec = scaling.network_spec(alpha, beta, res, num_classes=num_classes, dropout=scaling.compound_dropout(1.0))
    return Candidate(alpha, beta, gamma, spec)


def _beta_max(alpha: float, budget: float) -> float:
    return max(1.0, math.sqrt(budget / alpha))


class DefineByRun:
    """Optuna define-by-run space: suggests the sampled coordinates, returns the derived ones
    as constants (Ray merges them into the trial config)."""

    def __init__(self, kind: str, tolerance: float = 0.1):
        if kind not in ("surface", "band"):
            raise ValueError(f"no define-by-run space {kind!r}; use 'surface' or 'band'")
        self.kind = kind
        self.tolerance = tolerance

    def __call__(self, trial) -> dict:
        alpha = trial.suggest_float("alpha", 1.0, ALPHA_MAX)
        beta_share = trial.suggest_float("beta_share", 0.0, 1.0)
        if self.kind == "surface":
            beta = 1.0 + beta_share * (_beta_max(alpha, TARGET) - 1.0)
            gamma = max(1.0, math.sqrt(TARGET / (alpha * beta * beta)))
        else:
            hi = TARGET + self.tolerance
            beta = 1.0 + beta_share * (_beta_max(alpha, hi) - 1.0)
            gamma_share = trial.suggest_float("gamma_share", 0.0, 1.0)
            g_lo = math.sqrt(max(1.0, (TARGET - self.tolerance) / (alpha * beta * beta)))
            g_hi = max(g_lo, math.sqrt(hi / (alpha * beta * beta)))
            gamma = g_lo + gamma_share * (g_hi - g_lo)
        if trial.user_attrs.get(PAPER_ATTR):
            # The enqueued paper point is evaluated as published, off the surface (1.92).
            alpha, beta, gamma = scaling.PAPER_POINT
        return {"beta": beta, "gamma": gamma, "alpha": alpha}

    def paper_params(self) -> dict:
        """Optuna params that put the enqueued paper trial where the paper point projects."""
        a, b, g = scaling.PAPER_POINT
        budget = TARGET if self.kind == "surface" else TARGET + self.tolerance
        params = {"alpha": a, "beta_share": (b - 1.0) / (_beta_max(a, budget) - 1.0)}
        if self.kind == "band":
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
                    paper_first: bool = True) -> tuple[list[Candidate], int]:
    """One candidate per distinct network on the grid (the first point that builds it), and
    the number of feasible points. The paper point leads when asked."""
    pts = grid_points(step, tolerance)
    if paper_first:
        pts = [scaling.PAPER_POINT] + pts
    seen: dict[str, Candidate] = {}
    for a, b, g in pts:
        c = candidate(a, b, g, base_resolution=base_resolution, num_classes=num_classes)
        seen.setdefault(c.key, c)
    return list(seen.values()), len(pts)
