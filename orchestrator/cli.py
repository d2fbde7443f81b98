"""The ``orch`` command line.

Heavy libraries (torch, ray, mlflow, sqlalchemy) are imported inside command bodies so that
``orch --help`` answers at once. User mistakes become ``click.UsageError`` /
``click.BadParameter`` (exit code 2, one line saying how to fix it), never a traceback.
"""

from __future__ import annotations

import json
import math
import sys

import click

from orchestrator import __version__, scaling


# --------------------------------------------------------------------------- parameter types


class PhiList(click.ParamType):
    """A φ list: ``1-7``, ``1,3,5``, ``0.5``."""

    name = "PHIS"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return scaling.parse_phis(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _coefficient(ctx, param, value):
    if value is None:
        return None
    if not math.isfinite(value) or value < 1.0:
        raise click.BadParameter(
            f"{value:g} is below 1; compound scaling only grows the network, so use a value >= 1 "
            f"(the paper's point is --alpha 1.2 --beta 1.1 --gamma 1.15)"
        )
    if value > scaling.COEFF_MAX:
        raise click.BadParameter(f"{value:g} is above {scaling.COEFF_MAX:g}; use a value between 1 and {scaling.COEFF_MAX:g}")
    return value


def coefficient_options(f):
    """--alpha/--beta/--gamma, defined once."""
    for name, sym, paper in reversed((("alpha", "α", 1.2), ("beta", "β", 1.1), ("gamma", "γ", 1.15))):
        what = {"alpha": "depth", "beta": "width", "gamma": "resolution"}[name]
        f = click.option(
            f"--{name}",
            type=float,
            callback=_coefficient,
            help=f"{what.capitalize()} coefficient {sym} (>= 1). Default with no coefficient given: the paper's {paper}.",
        )(f)
    return f


base_resolution_option = click.option(
    "--base-resolution",
    type=click.IntRange(min=32, max=2048),
    default=scaling.B0_RESOLUTION,
    show_default=True,
    help="Input resolution of B0 for the task; the family scales from it (32..2048).",
)
num_classes_option = click.option(
    "--num-classes",
    type=click.IntRange(min=2, max=100_000),
    default=1000,
    show_default=True,
    help="Classes of the classifier head (affects parameters and FLOPs).",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of a table."
)


def resolve_coefficients(alpha, beta, gamma) -> tuple[scaling.Coefficients, bool]:
    """All three or none (then the paper's point). Returns (coefficients, defaulted)."""
    given = [v is not None for v in (alpha, beta, gamma)]
    if any(given) and not all(given):
        missing = [f"--{n}" for n, g in zip(("alpha", "beta", "gamma"), given) if not g]
        raise click.UsageError(
            f"missing {', '.join(missing)}: give all three of --alpha, --beta and --gamma, or none for the paper's point"
        )
    if not any(given):
        return scaling.Coefficients(*scaling.PAPER_POINT), True
    return scaling.Coefficients(alpha, beta, gamma), False


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped output: don't squeeze tables into 80 columns.
        console = Console(width=200)
    return console


# --------------------------------------------------------------------------- root group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="orch")
def main():
    """orch: find EfficientNet compound-scaling coefficients on your data, then train the family.

    \b
    orch plan                      show a scaled family: repeats, channels, params, GMACs
    orch search --gpus 8           the φ=1 search as Ray Tune trials (Optuna + ASHA)
    orch scale --from-run <id>     train B1..B7 from a search's winner
    """


# --------------------------------------------------------------------------- orch plan


@main.command()
@click.option(
    "--mode",
    type=click.Choice(scaling.PLAN_MODES),
    default=None,
    help="compound: depth, width, resolution = α^φ, β^φ, γ^φ. official: the shipped B0..B7 table. "
    "Default: compound.",
)
@coefficient_options
@click.option(
    "--phis",
    type=PhiList(),
    default="1-7",
    show_default=True,
    help="φ values for compound mode: a range '1-7', a list '1,3,5', or fractions '0.5,1.5'.",
)
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="Include B0 as the first row.")
@base_resolution_option
@num_classes_option
@json_option
def plan(mode, alpha, beta, gamma, phis, baseline, base_resolution, num_classes, as_json):
    """Print a scaled family: per-stage repeats and channels, parameters, GMACs, FLOPs ratio.

    FLOPs are measured (multiply-adds, on the meta device, no compute), so the table shows where
    rounding moves a member away from the theoretical (α·β²·γ²)^φ.

    \b
    orch plan --mode official
    orch plan --alpha 1.2 --beta 1.1 --gamma 1.15 --phis 1-7
    orch plan --phis 0.5,1,2 --base-resolution 128 --num-classes 10 --json
    """
    from orchestrator.plan import measure_entries, render_table

    coeffs_given = any(v is not None for v in (alpha, beta, gamma))
    mode = mode or "compound"
    if mode == "official":
        if coeffs_given:
            raise click.UsageError(
                "--mode official uses the shipped table; drop --alpha/--beta/--gamma or use --mode compound"
            )
        entries = scaling.official_plan(base_resolution=base_resolution, num_classes=num_classes, baseline=baseline)
        title = f"official B0..B7 at base resolution {base_resolution}, {num_classes} classes"
    else:
        coeffs, defaulted = resolve_coefficients(alpha, beta, gamma)
        entries = scaling.compound_plan(
            coeffs, phis, base_resolution=base_resolution, num_classes=num_classes, baseline=baseline
        )
        title = (
            f"compound α={coeffs.alpha:g} β={coeffs.beta:g} γ={coeffs.gamma:g}"
            f"{' (the paper point; pass --alpha/--beta/--gamma for yours)' if defaulted else ''}: "
            f"α·β²·γ² = {coeffs.flops_factor:.3f} per φ; base resolution {base_resolution}, {num_classes} classes"
        )
    if not entries:
        raise click.UsageError("the plan is empty: add members or drop --no-baseline")

    if as_json:
        rows = measure_entries(entries, base_resolution=base_resolution, num_classes=num_classes)
        click.echo(json.dumps(rows, indent=2))
        return
    with stderr_console().status(f"measuring {len(entries)} networks on the meta device…"):
        rows = measure_entries(entries, base_resolution=base_resolution, num_classes=num_classes)
    stdout_console().print(render_table(rows, title))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
