"""Compound-scaling math: pure Python, no torch.

Everything here is arithmetic on the EfficientNet B0 definition. The result of scaling is a
*network spec*: a plain, JSON-able dict of resolved integers (per-stage repeats and channels,
stem, head, resolution) that ``workers.model.build_model`` turns into an ``nn.Module``. The
model never sees a multiplier.

Sources of the rules (Tan & Le, 2019, and the TF reference implementation,
``tensorflow/tpu/models/official/efficientnet/efficientnet_model.py`` and
``efficientnet_builder.py``):

- compound scaling, d = α^φ, w = β^φ, r = γ^φ, FLOPs ∝ (α·β²·γ²)^φ: the paper, section 3.3;
- the B0 block strings, stem 32 / head 1280, SE ratio 0.25 of the block's input channels,
  stochastic depth 0.2: ``efficientnet_builder.py`` (``_DEFAULT_BLOCKS_ARGS``);
- ``round_filters`` and ``round_repeats``: ``efficientnet_model.py``;
- the official (width, depth, resolution, dropout) table: ``efficientnet_params`` in
  ``efficientnet_builder.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: The paper's φ=1 grid-search result (section 4). α·β²·γ² = 1.92, not 2.
PAPER_POINT = (1.2, 1.1, 1.15)

#: Target of the φ=1 constraint α·β²·γ² ≈ 2 (twice the FLOPs of B0).
TARGET_FLOPS_FACTOR = 2.0

#: Channels are multiples of this (TF ``depth_divisor``); 8 suits tensor-core tiles.
DEPTH_DIVISOR = 8

#: Input resolutions are rounded to a multiple of this, so every stride-2 stage divides evenly
#: down to the 1/32 feature map as far as possible and GPU kernels see friendly sizes.
RESOLUTION_DIVISOR = 8

#: The largest φ `orch` plans; B7 is φ≈7 and each step doubles FLOPs, so 10 is ~8x B7.
PHI_MAX = 10.0

#: Largest single coefficient accepted; at α=4 one φ step already quadruples depth.
COEFF_MAX = 4.0

#: Native input resolution of B0; the official table's resolutions are relative to it.
B0_RESOLUTION = 224

#: Stochastic-depth ("drop connect") rate of the TF reference for every family member.
DROP_PATH_RATE = 0.2

# B0 block strings, TF reference grammar (decoded by ``decode_block``):
#   r<repeats>_k<kernel>_s<stride><stride>_e<expand ratio>_i<in>_o<out>_se<SE ratio>
B0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)
B0_STEM = 32
B0_HEAD = 1280

#: The official family: name -> (width, depth, resolution, dropout) (``efficientnet_params``).
OFFICIAL = {
    "B0": (1.0, 1.0, 224, 0.2),
    "B1": (1.0, 1.1, 240, 0.2),
    "B2": (1.1, 1.2, 260, 0.3),
    "B3": (1.2, 1.4, 300, 0.3),
    "B4": (1.4, 1.8, 380, 0.4),
    "B5": (1.6, 2.2, 456, 0.4),
    "B6": (1.8, 2.6, 528, 0.5),
    "B7": (2.0, 3.1, 600, 0.5),
}

#: The paper's Table 2 at 1000 classes and native resolutions: (params in M, FLOPs in B, where
#: "FLOPs" are multiply-adds). Rounded as printed in the paper.
PAPER_TABLE2 = {
    "B0": (5.3, 0.39),
    "B1": (7.8, 0.70),
    "B2": (9.2, 1.0),
    "B3": (12.0, 1.8),
    "B4": (19.0, 4.2),
    "B5": (30.0, 9.9),
    "B6": (43.0, 19.0),
    "B7": (66.0, 37.0),
}

PLAN_MODES = ("compound", "official")

_BLOCK_RE = re.compile(
    r"^r(?P<r>\d+)_k(?P<k>\d+)_s(?P<s>\d)(?P=s)_e(?P<e>\d+)_i(?P<i>\d+)_o(?P<o>\d+)_se(?P<se>[0-9.]+)$"
)


@dataclass(frozen=True)
class Coefficients:
    """Depth, width and resolution coefficients (α, β, γ) found at φ = 1."""

    alpha: float
    beta: float
    gamma: float

    def __post_init__(self) -> None:
        for name, value in (("alpha", self.alpha), ("beta", self.beta), ("gamma", self.gamma)):
            if not math.isfinite(value) or value < 1.0 or value > COEFF_MAX:
                raise ValueError(f"{name} must be between 1 and {COEFF_MAX:g}, got {value!r}")

    @property
    def flops_factor(self) -> float:
        """α·β²·γ²: how much one φ step multiplies FLOPs (depth is linear, width and
        resolution quadratic in FLOPs)."""
        return constraint_value(self.alpha, self.beta, self.gamma)

    def multipliers(self, phi: float) -> tuple[float, float, float]:
        """(depth, width, resolution) multipliers α^φ, β^φ, γ^φ."""
        return self.alpha**phi, self.beta**phi, self.gamma**phi


def constraint_value(alpha: float, beta: float, gamma: float) -> float:
    """α·β²·γ², the per-φ FLOPs factor that the φ=1 search holds near 2."""
    return alpha * beta * beta * gamma * gamma


def decode_block(block: str) -> dict:
    """Decode one TF block string into a dict (see ``B0_BLOCKS`` for the grammar).

    Raises:
        ValueError: the string does not follow the grammar.
    """
    m = _BLOCK_RE.match(block)
    if m is None:
        raise ValueError(f"not a block string: {block!r} (expected e.g. 'r2_k3_s22_e6_i16_o24_se0.25')")
    return {
        "repeats": int(m["r"]),
        "kernel": int(m["k"]),
        "stride": int(m["s"]),
        "expand": int(m["e"]),
        "in": int(m["i"]),
        "out": int(m["o"]),
        "se": float(m["se"]),
    }


def round_filters(channels: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """Scale a channel count by ``width`` and round it as the TF reference does.

    ``c*w`` is rounded to the nearest multiple of ``divisor`` (at least ``divisor``); if that
    lost more than 10% of ``c*w``, one more ``divisor`` is added, so rounding never shrinks a
    layer by more than 10% (``round_filters`` in ``efficientnet_model.py``).
    """
    if width == 1.0:
        return int(channels)
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth``, rounding *up* (``round_repeats`` in the TF
    reference). Ceil, not round: a depth multiplier above 1 must never leave a stage as
    shallow as the baseline, and small stages (1-2 blocks) would otherwise never grow."""
    return int(math.ceil(depth * repeats))


def round_resolution(resolution: float, divisor: int = RESOLUTION_DIVISOR) -> int:
    """Round an input resolution to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(round(resolution / divisor)) * divisor)


def default_base_resolution(dataset: str) -> int:
    """B0's input size when none is given: the synthetic task's own, else the paper's 224."""
    from workers.defaults import SYNTHETIC_BASE_RESOLUTION

    return SYNTHETIC_BASE_RESOLUTION if dataset == "synthetic" else B0_RESOLUTION


def resolution_for(base_resolution: int, gamma: float) -> int:
    """The input side for a resolution multiplier γ (γ^φ for a member): base·γ to the nearest whole
    pixel, never below the base. The search's candidates and a compound plan's members both use
    it, so a scale's B1 is exactly the network the search trained and measured."""
    return max(int(base_resolution), int(round(base_resolution * gamma)))


def network_spec(
    depth: float,
    width: float,
    resolution: int,
    *,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path: float = DROP_PATH_RATE,
) -> dict:
    """Resolve B0 scaled by (depth, width) at ``resolution`` into integers.

    The spec is what a worker builds (``workers.model.build_model``) and what the network key
    is computed from. Each stage's first block takes the previous stage's (rounded) channels.
    """
    if depth < 1.0 or width < 1.0:
        raise ValueError(f"depth and width multipliers must be >= 1, got {depth!r}, {width!r}")
    stages = []
    for block in B0_BLOCKS:
        b = decode_block(block)
        stages.append(
            {
                "repeats": round_repeats(b["repeats"], depth),
                "kernel": b["kernel"],
                "stride": b["stride"],
                "expand": b["expand"],
                "in": round_filters(b["in"], width),
                "out": round_filters(b["out"], width),
                "se": b["se"],
            }
        )
    return {
        "stem": round_filters(B0_STEM, width),
        "head": round_filters(B0_HEAD, width),
        "stages": stages,
        "resolution": int(resolution),
        "num_classes": int(num_classes),
        "dropout": float(dropout),
        "drop_path": float(drop_path),
    }


def network_key(spec: dict) -> str:
    """Identify the network a spec actually builds: rounded stem, per-stage repeats x
    channels, head and input resolution. Distinct coefficients that round to the same network
    get the same key (ceil(1.1·r) == ceil(1.2·r) for every B0 stage), so a search trains it
    once. Classes, dropout and drop path are training settings, not part of the key.

    Other baselines (``orchestrator.baselines``) key the same way behind a prefix (``rn50_``,
    ``mbv2_``); a user's network by its callable and a digest of what it builds."""
    network = spec.get("network", "efficientnet-b0")
    if "structure" in spec:
        return f"{network.replace(':', '.')}_{spec['structure']}_r{spec['resolution']}"
    stages = "-".join(f"{s['repeats']}x{s['out']}" + (f"m{s['mid']}" if "mid" in s else "") for s in spec["stages"])
    key = f"r{spec['resolution']}_s{spec['stem']}_{stages}" + (f"_h{spec['head']}" if "head" in spec else "")
    if network == "efficientnet-b0":
        return key
    from orchestrator.baselines import KEY_PREFIX

    return f"{KEY_PREFIX[network]}_{key}"


def official_resolution(native: int, base_resolution: int) -> int:
    """Resolution of an official member for a task whose B0 resolution is ``base_resolution``.

    At the native base (224) the table's own value is used, so Table 2 reproduces exactly;
    B0 itself always runs at the base; any other member's native value is scaled by base/224
    and rounded to a multiple of 8.
    """
    if native == B0_RESOLUTION:
        return base_resolution
    if base_resolution == B0_RESOLUTION:
        return native
    return round_resolution(native * base_resolution / B0_RESOLUTION)


def compound_dropout(phi: float) -> float:
    """Head dropout for a compound member: the official table's value at floor(φ) (clipped to
    B0..B7), so larger members regularise more, as in the shipped family."""
    idx = min(7, max(0, int(math.floor(phi + 1e-9))))
    return OFFICIAL[f"B{idx}"][3]


@dataclass(frozen=True)
class PlanEntry:
    """One member of a plan, before anything is measured."""

    name: str
    phi: float
    depth_mult: float
    width_mult: float
    resolution: int
    theory_factor: float  # FLOPs ratio to B0 the coefficients promise, before rounding
    spec: dict

    @property
    def key(self) -> str:
        return network_key(self.spec)


def phi_name(phi: float) -> str:
    """``B3`` for φ=3, ``B0.5`` for φ=0.5."""
    return f"B{phi:g}"


def compound_plan(
    coeffs: Coefficients,
    phis: list[float],
    *,
    base_resolution: int = B0_RESOLUTION,
    num_classes: int = 1000,
    baseline: bool = True,
    network: str = "efficientnet-b0",
) -> list[PlanEntry]:
    """The ``compound`` plan: d, w, r = α^φ, β^φ, γ^φ·base for each φ (B0 first if asked) of
    ``network`` (``orchestrator.baselines``; its unscaled form is named B0 whatever it is)."""
    from orchestrator import baselines

    entries = []
    all_phis = ([0.0] if baseline and 0.0 not in phis else []) + list(phis)
    for phi in all_phis:
        d, w, r = coeffs.multipliers(phi)
        # B0 runs at the task's own base; a scaled member at the search's whole-pixel rule (a
        # multiple of 8 is a 20% step at a 40 px base and moved B1 off 2x B0's FLOPs).
        res = base_resolution if phi == 0 else resolution_for(base_resolution, r)
        spec = baselines.spec(network, d, w, res, num_classes=num_classes, dropout=compound_dropout(phi))
        entries.append(
            PlanEntry(phi_name(phi), phi, d, w, res, coeffs.flops_factor**phi, spec)
        )
    return entries


def official_plan(
    *,
    base_resolution: int = B0_RESOLUTION,
    num_classes: int = 1000,
    names: list[str] | None = None,
    baseline: bool = True,
) -> list[PlanEntry]:
    """The ``official`` plan: the shipped B0..B7 table (``names`` picks a subset)."""
    chosen = list(OFFICIAL) if names is None else list(names)
    if baseline and "B0" not in chosen:
        chosen = ["B0"] + chosen
    if not baseline:
        chosen = [n for n in chosen if n != "B0"]
    entries = []
    b0_res = official_resolution(OFFICIAL["B0"][2], base_resolution)
    for name in chosen:
        width, depth, native, dropout = OFFICIAL[name]
        res = official_resolution(native, base_resolution)
        spec = network_spec(depth, width, res, num_classes=num_classes, dropout=dropout)
        theory = depth * width**2 * (res / b0_res) ** 2
        entries.append(PlanEntry(name, float(name[1:]), depth, width, res, theory, spec))
    return entries


def parse_phis(text: str) -> list[float]:
    """Parse a φ list: ``1-7`` (an integer range), ``1,3,5``, ``0.5``, ``0.5,1,2``.

    Raises:
        ValueError: with a message that says what a valid list looks like.
    """
    hint = "use a range like '1-7', a list like '1,3,5' or values like '0.5'"
    text = (text or "").strip()
    if not text:
        raise ValueError(f"the phi list is empty; {hint}")
    phis: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ValueError(f"empty item in phi list {text!r}; {hint}")
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m[1]), int(m[2])
            if lo > hi:
                raise ValueError(f"phi range {part!r} runs backwards; write it low-high, e.g. '{hi}-{lo}'")
            phis.extend(float(p) for p in range(lo, hi + 1))
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number; {hint}") from None
        phis.append(value)
    for phi in phis:
        if not math.isfinite(phi) or phi <= 0 or phi > PHI_MAX:
            raise ValueError(f"phi must be above 0 and at most {PHI_MAX:g}, got {phi:g}; {hint}")
    return sorted(set(phis))
