"""`orch plan`: a scaled family, measured on the meta device."""

from __future__ import annotations

import click

from orchestrator import scaling
from orchestrator.cli.options import (
    PhiList, base_resolution_option, baseline_option, check_network, coefficient_options, json_option,
    num_classes_option, resolve_coefficients,
)
from orchestrator.cli.views import echo_json, stderr_console, stdout_console


@click.command()
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
@baseline_option("efficientnet-b0")
@click.option("--no-baseline", is_flag=True, help="Leave out the unscaled network (B0), the first row by default.")
@base_resolution_option
@num_classes_option
@json_option
def plan(mode, alpha, beta, gamma, phis, network, no_baseline, base_resolution, num_classes, as_json):
    """Print a scaled family: per-stage repeats and channels, parameters, GMACs, FLOPs ratio.

    FLOPs are measured (multiply-adds, on the meta device, no compute), so the table shows where
    rounding moves a member away from the theoretical (α·β²·γ²)^φ.

    \b
    orch plan --mode official
    orch plan --alpha 1.2 --beta 1.1 --gamma 1.15 --phis 1-7
    orch plan --phis 0.5,1,2 --base-resolution 128 --num-classes 10 --json
    orch plan --baseline resnet-50 --phis 1-3
    """
    from orchestrator.plan import measure_entries, render_table

    baseline = not no_baseline
    coeffs_given = any(v is not None for v in (alpha, beta, gamma))
    mode = mode or "compound"
    check_network(network, base_resolution=base_resolution, num_classes=num_classes)
    if mode == "official":
        if coeffs_given:
            raise click.UsageError(
                "--mode official uses the shipped table; drop --alpha/--beta/--gamma or use --mode compound"
            )
        if network != "efficientnet-b0":
            raise click.UsageError(f"--mode official is EfficientNet's B0..B7 table; use --mode compound with "
                                   f"--baseline {network}")
        entries = scaling.official_plan(base_resolution=base_resolution, num_classes=num_classes, baseline=baseline)
        title = f"official B0..B7 at base resolution {base_resolution}, {num_classes} classes"
    else:
        coeffs, defaulted = resolve_coefficients(alpha, beta, gamma)
        entries = scaling.compound_plan(
            coeffs, phis, base_resolution=base_resolution, num_classes=num_classes, baseline=baseline, network=network
        )
        title = (
            f"{network}, compound α={coeffs.alpha:g} β={coeffs.beta:g} γ={coeffs.gamma:g}"
            f"{' (the paper point; pass --alpha/--beta/--gamma for yours)' if defaulted else ''}: "
            f"α·β²·γ² = {coeffs.flops_factor:.3f} per φ; base resolution {base_resolution}, {num_classes} classes"
        )
    if not entries:
        raise click.UsageError("the plan is empty: add members or drop --no-baseline")

    if as_json:
        echo_json(measure_entries(entries, base_resolution=base_resolution, num_classes=num_classes, network=network))
        return
    with stderr_console().status(f"measuring {len(entries)} networks on the meta device…"):
        rows = measure_entries(entries, base_resolution=base_resolution, num_classes=num_classes, network=network)
    stdout_console().print(render_table(rows, title))
