"""`orch ablate`: compound scaling against depth-, width- and resolution-only scaling at equal
measured FLOPs, trained on the search's task (orchestrator.ablate)."""

from __future__ import annotations

import click

from orchestrator import scaling
from orchestrator.cli.options import CheckedCommand, check_id, open_store, open_tracker, run_options, writable
from orchestrator.cli.scale import JOB_CHECKS, inherit, job_options, notes, train_jobs
from orchestrator.cli.views import echo_json, stderr_console, stdout_console
from orchestrator.errors import about
from orchestrator.status import Status
from workers.defaults import BaselineError


class Targets(click.ParamType):
    name = "targets"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        from orchestrator.ablate import parse_targets

        try:
            return parse_targets(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command(cls=CheckedCommand, checks=JOB_CHECKS)
@click.option("--from-run", "from_run", required=True, callback=check_id, metavar="ID",
              help="Whose coefficients: a search id (its winner), a trial id, an earlier ablation's id (its options "
              "as defaults), the MLflow run id of any of them, or 'latest'.")
@click.option("--targets", type=Targets(), default=None, metavar="LIST",
              help="FLOPs multiples of the baseline to compare at, e.g. '2,4' (the default) or '1.5,3'.")
@click.option("--seeds", type=click.IntRange(min=1, max=50), default=None,
              help="Training runs per arm, seeds seed..seed+N-1, the same in every arm (paired). Default 3; 2 or "
              "more give an interval.")
@job_options
@click.option("--dry-run", is_flag=True, help="Print the arms (networks, measured FLOPs, batch, lr); launch nothing.")
@run_options
def ablate(from_run, targets, seeds, dry_run, experiment, home, db_url, tracking_uri, address, wait_s, storage,
           as_json, gpu_memory, **job):
    """Does compound scaling beat scaling one dimension, at equal FLOPs, on this task?

    For each FLOPs target (× the baseline's measured multiply-adds), trains the compound member
    (α^φ, β^φ, γ^φ from the search) and the depth-only, width-only and resolution-only networks
    whose measured FLOPs match it within ±5%, plus the unscaled baseline, each with --seeds seeds
    at the same budget as a scale. Reports each arm's mean ± std val top-1, compound minus each
    single arm with a paired bootstrap 95% interval, and whether compound wins, ties or loses.
    One MLflow parent (a child per arm and seed, ablation.png, ablation.json) and scale_runs rows;
    the same command again trains only what is missing.

    \b
    orch ablate --from-run latest --dry-run
    orch ablate --from-run search-20261127-ab12cd --gpus 8 --epochs 30 --targets 2,4,8
    """
    from orchestrator import ablate as ablate_mod
    from orchestrator import home as home_mod
    from orchestrator import scale as scale_mod

    store = open_store(home, db_url)
    source, opts = inherit(store, from_run, address=address, gpu_memory=gpu_memory, experiment=experiment,
                           compile=job.pop("compile_mode"), **job)
    if source.scale is not None and source.scale.kind != "ablation":
        raise click.BadParameter(f"{source.scale.id} is a scale; ablate its search {source.search.id}",
                                 param_hint="--from-run")
    prev = source.scale.config if source.scale is not None else {}
    asked = targets or [float(x) for x in prev.get("targets", ablate_mod.DEFAULT_TARGETS)]
    seeds = seeds or int(prev.get("seeds", ablate_mod.DEFAULT_SEEDS))
    t = source.trial
    coeffs = scaling.Coefficients(t.alpha, t.beta, t.gamma)
    err = stderr_console()
    with about("--targets"), err.status("matching every arm's measured FLOPs…"):
        try:  # the default targets move to the nearest multiples where every arm can be matched
            plan = ablate_mod.plan_rows(opts, coeffs, asked, seeds, adjust=targets is None and not prev)
        except BaselineError as e:  # a user's network that fails at a multiplier the arms need
            raise click.BadParameter(str(e), param_hint="--baseline") from None
    targets = sorted({r["target"] for r in plan if r["arm"] != "baseline"})
    moved = [f"{a:g}x -> {b:g}x" for a, b in zip(asked, targets) if a != b]
    if moved and not as_json:
        err.print(f"note: at base resolution {opts.base_resolution} not every arm can match the FLOPs of "
                  f"{', '.join(f'{a:g}x' for a in asked)}; comparing at the nearest multiples where all can "
                  f"({', '.join(moved)}; --targets sets them)", highlight=False)
    ablation_id = ablate_mod.ablation_id_for(source, coeffs, opts, targets, seeds)
    title = (f"{ablation_id}: {opts.network} at {', '.join(f'{x:g}x' for x in targets)} its FLOPs, {seeds} seed(s), "
             f"{opts.epochs} epoch(s); α={t.alpha:.4f} β={t.beta:.4f} γ={t.gamma:.4f} from "
             f"{'trial ' + t.trial_id if source.via == 'trial' else source.search.id}")
    arms = [r for r in plan if r["seed"] == opts.seed]
    if dry_run:
        rows = [{k: v for k, v in r.items() if k != "spec"} for r in arms]
        if as_json:
            echo_json({"ablation_id": ablation_id, "dry_run": True, "targets": targets, "seeds": seeds,
                       "options": opts.as_config(), "arms": rows})
        else:
            stdout_console().print(_arms_table(rows, title))
            stdout_console().print("dry run: nothing launched", highlight=False)
        return
    if not as_json:
        for line in notes(source, opts):
            err.print(line, highlight=False)
        stdout_console().print(_arms_table(arms, title))
    todo = scale_mod.pending_models(store, ablation_id, plan, opts.epochs)
    tracker = open_tracker(home, tracking_uri, experiment)
    h = home_mod.home_dir(home)
    writable(h)
    runner = ablate_mod.AblationRun(ablation_id, source, coeffs, opts, plan, store=store, tracker=tracker,
                                    targets=targets, seeds=seeds)
    outcome = train_jobs(runner, plan, todo, err=err, address=address, wait_s=wait_s, storage=storage, home=h,
                         opts=opts)
    s = outcome.summary
    if as_json:
        echo_json({"ablation_id": outcome.scale_id, "mlflow_run_id": outcome.mlflow_run_id,
                   "search_id": outcome.search_id, "trial_id": outcome.trial_id, "status": outcome.status,
                   "targets": targets, "seeds": seeds, "report": s.get("report", []), "verdicts": s.get("verdicts", []),
                   "runs": [scale_mod.model_entry(m) | {k: m.row[k] for k in ("arm", "target", "seed")}
                            for m in outcome.models],
                   "summary": {k: v for k, v in s.items() if k not in ("report", "verdicts", "models")}})
    else:
        out = stdout_console()
        out.print(report_table(s.get("report", []), f"ablation {outcome.scale_id} {outcome.status}: "
                               f"{len(s['trained_now'])} runs trained now, {len(s['done_before'])} earlier, "
                               f"{s['wall_s']:.0f}s wall"))
        for line in s.get("verdicts", []):
            out.print(line, highlight=False)
        out.print(f"MLflow: parent run {outcome.mlflow_run_id} ({outcome.scale_id}) in experiment {experiment!r}: "
                  f"ablation.png (val top-1 against GMACs per strategy) and ablation.json under Artifacts; one "
                  f"child run per arm and seed", highlight=False)
    if outcome.status == Status.INTERRUPTED:
        raise SystemExit(130)


def _arms_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in ("arm", "depth", "width", "res", "params (M)", "GMACs", "FLOPs ×base", "batch", "lr"):
        table.add_column(c, justify="left" if c == "arm" else "right")
    for r in rows:
        table.add_row(r["name"].rsplit("-s", 1)[0] + (" (width solved)" if r.get("width_solved") else ""),
                      f"{r['depth_mult']:.3f}", f"{r['width_mult']:.3f}",
                      str(r["resolution"]), f"{r['params_m']:.2f}", f"{r['gmacs']:.4f}", f"{r['flops_ratio']:.3f}",
                      str(r["batch_size"]), f"{r['lr']:.4g}")
    return table


def report_table(report: list[dict], title: str):
    """Per target and arm: FLOPs, mean ± std val top-1, compound minus it with its interval, verdict."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in ("target", "arm", "FLOPs ×base", "GMACs", "seeds", "val top-1 (mean ± std)", "compound − arm",
              "95% CI", "verdict"):
        table.add_column(c, justify="left" if c in ("target", "arm", "verdict") else "right")
    for e in report:
        for arm, a in e["arms"].items():
            c = e["compound_minus"].get(arm)
            ci = f"[{c['ci95'][0] * 100:+.1f}, {c['ci95'][1] * 100:+.1f}]" if c and c["ci95"] else ""
            table.add_row(f"{e['target']:g}x" if arm != "baseline" else "1x",
                          arm + (" (width solved)" if a.get("width_solved") else ""), f"{a['flops_ratio']:.3f}",
                          f"{a['gmacs']:.4f}", str(a["n"]), f"{a['mean']:.4f} ± {a['std']:.4f}",
                          f"{c['mean'] * 100:+.1f} pts" if c else "", ci,
                          ("compound " + c["verdict"]) if c else "")
    return table
