"""Measured plans: each plan entry with its parameters, GMACs and FLOPs ratio to B0.

Shared by ``orch plan`` and ``orch scale --dry-run`` so both print the same table.
"""

from __future__ import annotations

from orchestrator import scaling


def measure_entries(entries: list[scaling.PlanEntry], *, base_resolution: int, num_classes: int,
                    network: str = "efficientnet-b0") -> list[dict]:
    """Measure every entry on the meta device; ratios are to the unscaled ``network`` (B0) at the
    same base and classes. A user's network has no stages orch knows: its rows leave them out."""
    from orchestrator import baselines

    from workers.flops import measure  # torch: imported only when a plan is measured

    cache: dict[str, object] = {}

    def cost(spec: dict):
        key = scaling.network_key(spec) + f"/c{spec['num_classes']}"
        if key not in cache:
            cache[key] = measure(spec)
        return cache[key]

    b0 = cost(baselines.spec(network, 1.0, 1.0, base_resolution, num_classes=num_classes, dropout=0.0))
    rows = []
    for e in entries:
        c = cost(e.spec)
        rows.append(
            {
                "name": e.name,
                "phi": e.phi,
                "depth_mult": round(e.depth_mult, 4),
                "width_mult": round(e.width_mult, 4),
                "resolution": e.resolution,
                "stem": e.spec.get("stem"),
                "repeats": [s["repeats"] for s in e.spec.get("stages", [])],
                "channels": [s["out"] for s in e.spec.get("stages", [])],
                "head": e.spec.get("head"),
                "params": c.params,
                "params_m": round(c.params_m, 3),
                "macs": c.macs,
                "gmacs": round(c.gmacs, 4),
                "flops_ratio": round(c.macs / b0.macs, 4),
                "activations_m": round(c.activations / 1e6, 4),
                "theory_ratio": round(e.theory_factor, 4),
                "network_key": e.key,
            }
        )
    return rows


def render_table(rows: list[dict], title: str):
    """A rich Table of measured plan rows."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (
        ("name", "left"), ("φ", "right"), ("depth", "right"), ("width", "right"), ("res", "right"),
        ("repeats", "left"), ("channels", "left"), ("head", "right"), ("params (M)", "right"),
        ("GMACs", "right"), ("FLOPs ×B0", "right"), ("theory ×B0", "right"),
    ):
        table.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['phi']:g}",
            f"{r['depth_mult']:.3f}",
            f"{r['width_mult']:.3f}",
            str(r["resolution"]),
            "-".join(map(str, r["repeats"])) or "(its own)",
            "-".join(map(str, [r["stem"], *r["channels"]])) if r["stem"] else "(its own)",
            str(r["head"] or "-"),
            f"{r['params_m']:.2f}",
            f"{r['gmacs']:.3f}",
            f"{r['flops_ratio']:.2f}",
            f"{r['theory_ratio']:.2f}",
        )
    return table
