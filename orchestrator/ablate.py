"""`orch ablate`: does compound scaling beat scaling one dimension, at equal FLOPs, on this task?

The paper's Table 3 and Figure 8 on the user's own data and network. For each FLOPs target T
(multiples of the baseline's measured multiply-adds, default 2 and 4):

- ``compound``: the baseline scaled by α^φ, β^φ, γ^φ (the search's coefficients, the scale's
  rules), φ chosen so its *measured* FLOPs come closest to T times the baseline's (within ±10%)
  among the members whose single-dimension arms can all match it. When none can (at small bases
  one pixel can add a row to every late feature map, so resolution moves FLOPs in large steps), a
  member with depth α^φ and resolution γ^φ and its *width solved* onto a resolution-only or
  depth-only network's FLOPs, the rule the search uses for its own candidates;
- ``depth``, ``width``, ``resolution``: the baseline scaled along that one dimension only, the
  multiplier solved (bisection on measured FLOPs) to match the compound member within
  ``tolerance`` (±5%). An arm that cannot (the staircase of rounding jumps over the band) is an
  error before anything trains, naming the nearest networks either side.

Plus the unscaled ``baseline``, the curves' common start. Every arm trains ``seeds`` times
(seeds seed, seed+1, …: the same seeds in every arm, so arm runs pair by seed) on the same data,
epochs, batch rule and learning-rate rule as a scale. The report per target: each arm's mean ± std
val top-1; for each single-dimension arm, compound minus it, paired by seed, with a bootstrap 95%
interval; and a verdict: compound wins (interval above 0), loses (below 0) or ties.

An ablation is stored as a scale of kind ``ablation`` (one ``scale_runs`` row per arm and seed,
with ``arm``, ``target`` and ``seed``) and runs on ``ScaleRun``'s machinery: one Ray Train job per
run, checkpoints every epoch, resumable after a kill, and idempotent (the same command again
trains nothing that finished). MLflow: one parent (``orch.kind=ablation``), a child per arm and
seed, ``ablation.png`` (val top-1 against GMACs per strategy) and ``ablation.json``.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator import baselines, scaling
from orchestrator.scale import ScaleInputError, ScaleOptions, ScaleRun, measured_rows

ARMS = ("baseline", "compound", "depth", "width", "resolution")
SINGLE = ("depth", "width", "resolution")
DEFAULT_TARGETS = (2.0, 4.0)
DEFAULT_SEEDS = 3
#: How close (relative) a single-dimension arm's measured FLOPs must come to the compound member's.
FLOPS_TOLERANCE = 0.05
#: How far (relative) from the target a compound member may be; the one closest to it whose
#: single-dimension arms all match is taken (rounding makes FLOPs a staircase in each dimension).
COMPOUND_BAND = 0.10
#: With the default targets, how far a target may move to where every arm matches: down by this
#: factor, up by its square (at small bases the smallest compound member can be far above 2x), and
#: how many multiples are tried, nearest first.
ADJUST_FACTOR = 1.5
MAX_ADJUST_TRIES = 24
#: Resolution-only networks tried as anchors for a width-solved compound member, closest first.
MAX_ANCHORS = 8
#: Depth multiplier step of the scan for depth-only anchors (repeats change at multiples of 1/repeats).
DEPTH_STEP = 0.01
#: The scan for compound members around the target: φ steps, and how far either side.
PHI_STEP = 0.005
PHI_WINDOW = 0.5
#: Largest depth or width multiplier, and resolution factor, a single-dimension arm may take.
MULT_MAX = 16.0
#: Bootstrap resamples of the paired differences, and the seed of their generator (the report
#: is the same every time it is computed from the same runs).
BOOTSTRAP = 10_000
BOOTSTRAP_SEED = 0


class AblationInputError(ScaleInputError):
    """The ablation cannot be built as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Arm:
    target: float
    arm: str
    phi: float
    depth: float
    width: float
    resolution: int
    spec: dict
    ratio: float  # measured multiply-adds / the baseline's
    width_solved: bool = False  # a compound member whose width was solved onto the others' FLOPs

    @property
    def label(self) -> str:
        return f"x{self.target:g}-{self.arm}"


def parse_targets(text: str) -> list[float]:
    """``2,4`` -> [2.0, 4.0]: FLOPs multiples above 1, at most 2^PHI_MAX."""
    hint = "give FLOPs multiples of the baseline above 1, e.g. '2,4' or '1.5,3'"
    values = []
    for part in (p.strip() for p in (text or "").split(",")):
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number; {hint}") from None
        if not math.isfinite(v) or v <= 1.0 or v > 2 ** scaling.PHI_MAX:
            raise ValueError(f"target {part} is out of range; {hint}")
        values.append(v)
    if not values:
        raise ValueError(f"no targets; {hint}")
    return sorted(set(values))


def _closest(ratio, lo: float, hi: float, want: float, *, integer: bool = False) -> tuple[float, float, float]:
    """(x_below, x_above, best x) around where the nondecreasing ``ratio(x)`` crosses ``want``
    on [lo, hi] (bisection; integers when ``integer``)."""
    if ratio(lo) >= want:
        return lo, lo, lo
    if ratio(hi) < want:
        return hi, hi, hi
    a, b = lo, hi
    while (b - a > 1) if integer else (b - a > 1e-7 * max(1.0, b)):
        mid = (a + b) // 2 if integer else (a + b) / 2
        if ratio(mid) >= want:
            b = mid
        else:
            a = mid
    return a, b, min((a, b), key=lambda x: abs(ratio(x) / want - 1))


def arms(coeffs: scaling.Coefficients, targets: list[float], *, network: str, base_resolution: int,
         num_classes: int, tolerance: float = FLOPS_TOLERANCE, adjust: bool = False) -> list[Arm]:
    """The baseline, then per target the compound member and the three single-dimension arms
    (see the module docstring). Raises AblationInputError when an arm cannot be matched, unless
    ``adjust`` (the default targets): then the nearest multiple where every arm can be is used."""
    base_spec = baselines.spec(network, 1.0, 1.0, base_resolution, num_classes=num_classes, dropout=0.2)
    base_macs = baselines.macs(base_spec)

    def spec(d: float, w: float, res: int, dropout: float) -> dict:
        return baselines.spec(network, d, w, int(res), num_classes=num_classes, dropout=dropout)

    def ratio(d: float, w: float, res: int) -> float:
        return baselines.macs(spec(d, w, res, 0.0)) / base_macs

    def compound_at(phi: float) -> tuple[float, float, int]:
        d, w, r = coeffs.multipliers(phi)
        return d, w, scaling.resolution_for(base_resolution, r)

    def singles(t: float, phi: float, c_ratio: float, dropout: float) -> tuple[list[Arm], str | None]:
        solvers = {
            "depth": (lambda x: ratio(x, 1.0, base_resolution), 1.0, MULT_MAX, False,
                      lambda x: (x, 1.0, base_resolution), "depth multiplier"),
            "width": (lambda x: ratio(1.0, x, base_resolution), 1.0, MULT_MAX, False,
                      lambda x: (1.0, x, base_resolution), "width multiplier"),
            "resolution": (lambda x: ratio(1.0, 1.0, int(x)), base_resolution, int(base_resolution * MULT_MAX), True,
                           lambda x: (1.0, 1.0, int(x)), "px"),
        }
        found = []
        for arm, (fn, lo, hi, integer, dims, unit) in solvers.items():
            below, above, best = _closest(fn, lo, hi, c_ratio, integer=integer)
            r = fn(best)
            if abs(r / c_ratio - 1) > tolerance:
                return found, (f"the {arm}-only network cannot match the compound member's {c_ratio:.3f}x the baseline's "
                               f"FLOPs within ±{tolerance:.0%} (nearest: {fn(below):.3f}x at {below:.4g} {unit}, "
                               f"{fn(above):.3f}x at {above:.4g} {unit})")
            d1, w1, r1 = dims(best)
            found.append(Arm(t, arm, phi, d1, w1, r1, spec(d1, w1, r1, dropout), r))
        return found, None

    def anchored(t: float):
        """Compound members with their width solved (as the search solves its candidates') onto
        each resolution-only and depth-only network within COMPOUND_BAND of ``t``, closest first:
        at small bases resolution, and for networks of few blocks depth, move FLOPs in steps that
        the members as scaled rarely land near."""
        anchors: set[float] = set()  # resolution-only networks' FLOPs
        for res in range(base_resolution, int(base_resolution * MULT_MAX)):
            r = ratio(1.0, 1.0, res)
            if r > t * (1 + COMPOUND_BAND):
                break
            if r >= t * (1 - COMPOUND_BAND):
                anchors.add(round(r, 9))
        # ... and onto each depth-only network (repeats round up per stage: another staircase)
        d_lo = _closest(lambda x: ratio(x, 1.0, base_resolution), 1.0, MULT_MAX, t * (1 - COMPOUND_BAND))[0]
        d, deep = d_lo, set()
        while d <= MULT_MAX and (r := ratio(d, 1.0, base_resolution)) <= t * (1 + COMPOUND_BAND):
            if r >= t * (1 - COMPOUND_BAND):
                deep.add(round(r, 9))
            d += DEPTH_STEP
        # the coarser staircase first (fewer anchors, each a network the other arms must reach)
        groups = sorted((deep, anchors - deep), key=len)
        for f in [f for g in groups for f in sorted(g, key=lambda f: abs(f / t - 1))[:MAX_ANCHORS]]:
            below, _, _ = _closest(lambda p: ratio(*compound_at(p)), 0.0, scaling.PHI_MAX, f)
            tried: set[str] = set()  # depth and resolution at or below the crossing's, each network once
            for k in range(int(PHI_WINDOW / PHI_STEP)):
                phi = below - k * PHI_STEP
                if phi <= 0 or len(tried) > MAX_ANCHORS:
                    break
                d, _, res = compound_at(phi)
                key = scaling.network_key(spec(d, 1.0, res, 0.0))
                if key in tried or ratio(d, 1.0, res) > f * (1 + tolerance):
                    continue
                tried.add(key)
                _, _, w = _closest(lambda x: ratio(d, x, res), 1.0, MULT_MAX, f)
                if abs((r := ratio(d, w, res)) / f - 1) <= tolerance:
                    yield phi, d, w, res, r
                    break

    base_key = scaling.network_key(base_spec)

    def genuine(d: float, w: float, res: int) -> bool:
        """A compound member grows all three: more blocks, more channels, more pixels than the
        baseline (else "compound against depth" can compare a network with itself)."""
        return (res > base_resolution and scaling.network_key(spec(d, 1.0, base_resolution, 0.0)) != base_key
                and scaling.network_key(spec(1.0, w, base_resolution, 0.0)) != base_key)

    taken: set[str] = set()  # compound networks of earlier targets: each target compares a new one

    def at(t: float, width_solved: bool = True) -> list[Arm]:
        # the compound members around the target (distinct networks within COMPOUND_BAND of it),
        # closest first, then (``width_solved``) width-solved ones; the first whose three single
        # arms all match is taken
        lo, hi, phi0 = _closest(lambda p: ratio(*compound_at(p)), 0.0, scaling.PHI_MAX, t)
        near: dict[tuple, tuple[float, float]] = {}
        steps = int(PHI_WINDOW / PHI_STEP)
        for phi in (phi0 + i * PHI_STEP for i in range(-steps, steps + 1)):
            if 0.0 < phi <= scaling.PHI_MAX and abs((r := ratio(*compound_at(phi))) / t - 1) <= COMPOUND_BAND \
                    and genuine(*compound_at(phi)) \
                    and scaling.network_key(spec(*compound_at(phi), 0.0)) not in taken:
                near.setdefault(compound_at(phi), (phi, r))
        first_error = None if near else (
            f"no compound member that grows all three dimensions (more blocks, channels and pixels than the "
            f"baseline) is within ±{COMPOUND_BAND:.0%} of it (as scaled, its FLOPs go from {ratio(*compound_at(lo)):.3f}x "
            f"to {ratio(*compound_at(hi)):.3f}x at φ={hi:.3f})")
        candidates = [(phi, d, w, res, r, False) for (d, w, res), (phi, r) in
                      sorted(near.items(), key=lambda kv: abs(kv[1][1] / t - 1))]
        solved = ((*c, True) for c in anchored(t) if genuine(*c[1:4])
                  and scaling.network_key(spec(*c[1:4], 0.0)) not in taken) if width_solved else ()
        for phi, d, w, res, c_ratio, was_solved in itertools.chain(candidates, solved):
            dropout = scaling.compound_dropout(phi)
            found, error = singles(t, phi, c_ratio, dropout)
            if error is None:
                return [Arm(t, "compound", phi, d, w, res, spec(d, w, res, dropout), c_ratio, was_solved), *found]
            first_error = first_error or error
        below, above, _ = _closest(lambda x: ratio(1.0, 1.0, int(x)), base_resolution, int(base_resolution * MULT_MAX),
                                   t, integer=True)
        raise AblationInputError(
            f"at target {t:g}x: {first_error}" + (f" (and every other compound member within ±{COMPOUND_BAND:.0%} of "
                                                  f"the target)" if len(near) > 1 else "")
            + f"; resolution alone gives {ratio(1.0, 1.0, below):.3f}x at {below} px, then {ratio(1.0, 1.0, above):.3f}x "
            f"at {above} px. Choose other --targets or another --base-resolution (at small bases one pixel can add a "
            f"row to every late feature map)", param="--targets")

    out = [Arm(1.0, "baseline", 0.0, 1.0, 1.0, base_resolution, base_spec, 1.0)]
    for t in targets:
        try:
            found = at(t)
        except AblationInputError:
            if not adjust:
                raise
            found = _nearest_feasible(t, at, lambda res: ratio(1.0, 1.0, res), base_resolution)
        taken.add(scaling.network_key(found[0].spec))
        out += found
    labels = [a.label for a in out]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise AblationInputError(f"two targets name the same runs ({', '.join(twice)}); give --targets that differ "
                                 f"in their first digits", param="--targets")
    return out


def _nearest_feasible(t: float, at, res_ratio, base_resolution: int) -> list[Arm]:
    """The arms at the FLOPs multiple nearest ``t`` (within ADJUST_FACTOR of it either way) where
    every arm can be matched; candidates are the resolution-only networks' own multiples. Raises
    the error of ``t`` itself when there is none."""
    cands = {}
    for res in range(base_resolution + 1, int(base_resolution * MULT_MAX)):
        r = res_ratio(res)
        if r > t * ADJUST_FACTOR ** 2:
            break
        if r >= t / ADJUST_FACTOR and r > 1.0:
            cands.setdefault(round(r, 2), res)
    near = sorted(cands, key=lambda r: abs(math.log(r / t)))[:MAX_ADJUST_TRIES]
    # nearest first; at each multiple a member as scaled, else a width-solved one
    for r in near:
        for width_solved in (False, True):
            try:
                return at(r, width_solved)
            except AblationInputError:
                continue
    return at(t)


def plan_rows(opts: ScaleOptions, coeffs: scaling.Coefficients, targets: list[float], seeds: int, *,
              adjust: bool = False) -> list[dict]:
    """One plan row per arm and seed (name ``x2-depth-s1``), measured and with the scale's batch
    and lr rules, plus ``arm``, ``target`` and ``seed`` (``adjust``: see ``arms``)."""
    found = arms(coeffs, targets, network=opts.network, base_resolution=opts.base_resolution,
                 num_classes=opts.num_classes, adjust=adjust)
    entries = [scaling.PlanEntry(a.label, a.phi, a.depth, a.width, a.resolution, a.ratio, a.spec) for a in found]
    rows = []
    for a, row in zip(found, measured_rows(opts, entries)):
        for i in range(seeds):
            rows.append(row | {"name": f"{a.label}-s{i}", "arm": a.arm, "target": a.target, "seed": opts.seed + i,
                               "width_solved": a.width_solved})
    return rows


def ablation_id_for(source, coeffs: scaling.Coefficients, opts: ScaleOptions, targets: list[float], seeds: int) -> str:
    from orchestrator.scale import scale_id_for

    return scale_id_for(source, coeffs, opts, extra={"ablation": {"targets": targets, "seeds": seeds}},
                        prefix="ablate")


# --------------------------------------------------------------------------- the report


def _bootstrap(diffs: list[float]) -> tuple[float, float]:
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def report(runs: list[dict]) -> list[dict]:
    """Per target: each arm's val top-1 over its seeds, and compound minus each single arm.

    ``runs``: one dict per finished run with arm, target, seed, val_top1, gmacs, flops_ratio.
    Differences pair runs of the same seed; the interval is a percentile bootstrap of their mean
    (BOOTSTRAP resamples). Verdict: ``wins`` (interval above 0), ``loses`` (below 0), ``ties``;
    ``too few seeds`` with fewer than 2 pairs (one pair has no spread to bootstrap)."""
    import statistics

    base = [r for r in runs if r["arm"] == "baseline"]
    out = []
    for t in sorted({r["target"] for r in runs if r["arm"] != "baseline"}):
        entry = {"target": t, "arms": {}, "compound_minus": {}}
        by_arm = {}
        for arm in ARMS:
            rs = base if arm == "baseline" else [r for r in runs if r["target"] == t and r["arm"] == arm]
            if not rs:
                continue
            accs = [r["val_top1"] for r in rs]
            by_arm[arm] = {r["seed"]: r["val_top1"] for r in rs}
            entry["arms"][arm] = {
                "n": len(accs), "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "gmacs": rs[0]["gmacs"], "flops_ratio": rs[0]["flops_ratio"], "seeds": sorted(by_arm[arm]),
                "width_solved": bool(rs[0].get("width_solved"))}
        comp = by_arm.get("compound", {})
        for arm in SINGLE:
            other = by_arm.get(arm, {})
            seeds = sorted(set(comp) & set(other))
            if not seeds:
                continue
            diffs = [comp[s] - other[s] for s in seeds]
            mean = statistics.fmean(diffs)
            if len(diffs) < 2:
                entry["compound_minus"][arm] = {"pairs": len(diffs), "mean": mean, "ci95": None,
                                                "verdict": "too few seeds"}
                continue
            lo, hi = _bootstrap(diffs)
            verdict = "wins" if lo > 0 else "loses" if hi < 0 else "ties"
            entry["compound_minus"][arm] = {"pairs": len(diffs), "mean": mean, "ci95": [lo, hi], "verdict": verdict}
        out.append(entry)
    return out


def sentence(entry: dict) -> str:
    """The plain verdict of one target, e.g. "at 2x: compound wins against depth, ties with width …"."""
    words = {"wins": "wins against", "loses": "loses to", "ties": "ties with", "too few seeds": "(one seed) vs"}
    parts = [f"{words[c['verdict']]} {arm} ({c['mean'] * 100:+.1f} points"
             + (f", 95% CI {c['ci95'][0] * 100:+.1f} to {c['ci95'][1] * 100:+.1f})" if c["ci95"] else ")")
             for arm, c in entry["compound_minus"].items()]
    solved = " (its width solved onto the others' FLOPs)" if entry["arms"].get("compound", {}).get("width_solved") else ""
    return (f"at {entry['target']:g}x the baseline's FLOPs, compound{solved} "
            + ("; ".join(parts) or "has nothing to compare"))


def plot(rep: list[dict], path: Path, *, title: str) -> Path:
    """The paper's Figure 8 shape: val top-1 against GMACs, one line per strategy from the
    baseline, error bars one standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = {"compound": "tab:red", "depth": "tab:blue", "width": "tab:green", "resolution": "tab:orange"}
    base = next((e["arms"]["baseline"] for e in rep if "baseline" in e["arms"]), None)
    for arm, colour in colours.items():
        pts = ([(base["gmacs"], base["mean"], base["std"])] if base else []) + [
            (e["arms"][arm]["gmacs"], e["arms"][arm]["mean"], e["arms"][arm]["std"]) for e in rep if arm in e["arms"]]
        if len(pts) < (2 if base else 1):
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    color=colour, label=f"{arm} scaling" if arm != "compound" else "compound scaling",
                    linewidth=2.2 if arm == "compound" else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image (log scale)")
    ax.set_ylabel("validation top-1 (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- running it


class AblationRun(ScaleRun):
    """A ScaleRun whose runs are arms × seeds: no MLflow model per run (arms are for comparing,
    not for serving), the report and its plot at the end."""

    KIND = "ablation"

    def __init__(self, *args, targets: list[float], seeds: int, **kw):
        super().__init__(*args, **kw)
        self.targets, self.seeds = targets, seeds
        self.report: list[dict] = []

    def _config(self) -> dict:
        return super()._config() | {"targets": self.targets, "seeds": self.seeds}

    def _log_model(self, m, checkpoint) -> None:
        return None

    def _closing(self, finished) -> tuple[dict, list]:
        runs = [{"arm": m.row["arm"], "target": m.row["target"], "seed": m.row["seed"], "val_top1": m.last("val_top1"),
                 "gmacs": m.row["gmacs"], "flops_ratio": m.row["flops_ratio"],
                 "width_solved": m.row.get("width_solved", False)}
                for m in finished if m.last("val_top1") is not None]
        self.report = report(runs)
        metrics = []
        for e in self.report:
            t = f"x{e['target']:g}"
            metrics += [(f"{t}_{arm}_mean", a["mean"], 0) for arm, a in e["arms"].items() if arm != "baseline"]
            metrics += [(f"{t}_compound_minus_{arm}", c["mean"], 0) for arm, c in e["compound_minus"].items()]
        if self.report:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="orch-ablation-") as d:
                c = self.coeffs
                path = plot(self.report, Path(d) / "ablation.png",
                            title=f"{self.scale_id} ({self.opts.network}): α={c.alpha:.3f} β={c.beta:.3f} "
                                  f"γ={c.gamma:.3f}; {self.seeds} seed(s), {self.opts.epochs} epoch(s)")
                self.tracker.log_artifact(self.parent, path)
            self.tracker.log_text(self.parent, json.dumps({"report": self.report, "verdicts": [
                sentence(e) for e in self.report]}, indent=2), "ablation.json")
        return {"report": self.report, "verdicts": [sentence(e) for e in self.report]}, metrics
