"""A scaled family in the terminal: val top-1 against GMACs (log axis), one labelled point per
member, and the official EfficientNet family's shape as a reference line. Drawn with plotext;
shown by `orch scale` and `orch runs show <scale>` when stdout is a terminal and not with --json.
"""

from __future__ import annotations

import math

#: The paper's Table 2 (Tan & Le, 2019): ImageNet top-1 (%) and FLOPs (billions) of B0..B7.
OFFICIAL_TOP1 = (77.1, 79.1, 80.1, 81.6, 82.9, 83.6, 84.0, 84.3)
OFFICIAL_GFLOPS = (0.39, 0.70, 1.0, 1.8, 4.2, 9.9, 19.0, 37.0)

WIDTH, HEIGHT = 72, 20


def official_shape(gmacs0: float, top1_0: float, up_to: float) -> tuple[list[float], list[float]]:
    """The official family anchored at a B0 of (gmacs0, top1_0): each official member at B0's
    GMACs times its FLOPs multiple, and at B0's error times its error as a fraction of the
    official B0's (error ratios carry across tasks better than accuracy differences). Members
    up to the first one past ``up_to`` GMACs."""
    xs, ys = [], []
    for flops, top1 in zip(OFFICIAL_GFLOPS, OFFICIAL_TOP1):
        xs.append(gmacs0 * flops / OFFICIAL_GFLOPS[0])
        ys.append(1.0 - (1.0 - top1_0) * (100.0 - top1) / (100.0 - OFFICIAL_TOP1[0]))
        if xs[-1] >= up_to:
            break
    return xs, ys


def family_chart(models: list[dict], *, title: str, reference: bool) -> str | None:
    """The chart as text (no colours), or None when fewer than two members have an accuracy.
    ``models``: dicts with name, gmacs and val_top1. ``reference``: draw the official shape
    (for a compound plan; an official plan *is* that family's recipe)."""
    import plotext as plt

    pts = [(m["name"], float(m["gmacs"]), float(m["val_top1"])) for m in models
           if m.get("val_top1") is not None and m.get("gmacs")]
    if len(pts) < 2:
        return None
    plt.clear_figure()
    plt.plotsize(WIDTH, HEIGHT)
    plt.theme("clear")
    plt.xscale("log")
    names, xs, ys = zip(*sorted(pts, key=lambda p: p[1]))
    base = next((p for p in pts if p[0] == "B0"), None)
    all_y = list(ys)
    if reference and base is not None and len(pts) > 1:
        rx, ry = official_shape(base[1], base[2], max(xs))
        plt.plot(rx, ry, marker="dot", label="official B0-B7 shape (Table 2, at your B0)")
        all_y += ry
    plt.scatter(list(xs), list(ys), marker="●", label="this family")  # last: on top of the line
    span = max(max(all_y) - min(all_y), 0.02)
    plt.ylim(min(all_y) - 0.08 * span, max(all_y) + 0.35 * span)  # room for the legend above the points
    hi = max(xs)
    for name, x, y in zip(names, xs, ys):  # each label beside its point (left of the last one: the edge)
        if len(xs) > 1 and math.isclose(x, hi):
            plt.text(f"{name} ", x / 1.03, y, alignment="right")
        else:
            plt.text(f" {name}", x * 1.03, y, alignment="left")
    plt.title(title)
    plt.xlabel("GMACs (log)")
    plt.ylabel("val top-1")
    return plt.uncolorize(plt.build())


def print_family(scale_id: str, models: list[dict], *, reference: bool) -> None:
    """Print a scale's chart to stdout when it is a terminal (a pipe or a file gets only the table)."""
    import sys

    if not sys.stdout.isatty():
        return
    text = family_chart(models, title=f"{scale_id}: val top-1 against GMACs", reference=reference)
    if text:
        print(text, flush=True)
