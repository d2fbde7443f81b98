"""`orch scale`: the scaled family B0..Bk of a stored search, one Ray Train job per model."""

from __future__ import annotations

import click

from orchestrator import scaling
from orchestrator.cli.options import (
    CheckedCommand, PhiList, baseline_option, check_dataset, check_id, check_model_name, check_network, compile_option,
    not_above, one_of, open_store, open_tracker, prepare_dataset, run_options, writable,
)
from orchestrator.cli.views import (
    ScaleProgress, connect_and_grow, echo_json, print_dry_run, print_registered, print_scale_outcome,
    results_only_stdout, stderr_console, stdout_console,
)
from orchestrator.errors import about
from orchestrator.status import Status


def job_options(f):
    """What a job trains on and how it runs: shared by `orch scale` and `orch ablate`, each
    defaulting to the search's (or the earlier scale's) value."""
    for option in reversed((
        click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None,
                     help="Epochs per model. Default: the search's."),
        click.option("--dataset", default=None, callback=check_dataset,
                     help="'synthetic', 'imagefolder:PATH' or 'prepared:PATH'. Default: the search's."),
        click.option("--base-resolution", type=click.IntRange(min=32, max=2048), default=None,
                     help="B0's input size; the family scales from it. Default: the search's."),
        baseline_option(None),
        click.option("--batch-size", type=click.IntRange(min=1, max=65536), default=None,
                     help="B0's batch per worker; larger models derive theirs by --batch-rule. Default: the search's."),
        click.option("--lr", type=click.FloatRange(min=0.0, min_open=True, max=10.0), default=None,
                     help="B0's learning rate at --batch-size on one worker; scaled linearly with each model's "
                     "global batch. Default: the search's."),
        click.option("--batch-rule", type=click.Choice(["fit", "sqrt-flops", "fixed"]), default=None,
                     help="fit (default): every model keeps B0's batch unless its estimated training memory "
                     "(activations × batch × 6.8 bytes, measured for bf16 on an H200) passes 80% of the GPU's; then "
                     "the largest multiple of 8 that fits. Never shrinks on CPU. sqrt-flops: B0's / sqrt(FLOPs ratio), "
                     "multiple of 8, at least 8. fixed: B0's batch everywhere. lr follows the batch linearly."),
        click.option("--gpu-memory", "gpu_memory", type=click.FloatRange(min=1.0), default=None, metavar="GB",
                     help="GPU memory the fit rule plans against. Default: this machine's GPU; 80 with --address "
                     "and no GPU here; none (CPU jobs) with --gpus 0 or no GPU and no cluster."),
        click.option("--gpus", type=click.FloatRange(min=0.0), default=None,
                     help="GPU budget. Default: every GPU the cluster has; 0 runs on CPU."),
        click.option("--gpus-per-job", type=click.IntRange(min=1), default=None,
                     help="Data-parallel GPU workers per model (one GPU each). Default 1 with GPUs."),
        click.option("--workers-per-job", type=click.IntRange(min=1, max=1024), default=None,
                     help="Without GPUs: data-parallel CPU workers (gloo) per model. Default 1."),
        click.option("--cpus-per-worker", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
                     show_default=True, help="CPUs of each worker."),
        click.option("--max-failures", type=click.IntRange(min=0, max=100), default=2, show_default=True,
                     help="Restarts of a job whose worker died, from its last checkpoint."),
        compile_option("job", None),
    )):
        f = option(f)
    return f


#: The checks of job_options' options.
JOB_CHECKS = (
    not_above("gpus_per_job", "gpus", budget=True),
    one_of("gpus_per_job", "workers_per_job",
           why="--workers-per-job is for CPU jobs and --gpus-per-job for GPU jobs; give one"),
)


def inherit(store, from_run: str, *, address, gpu_memory, **given):
    """The source --from-run names and the options a job of it runs with (given ones win)."""
    from orchestrator import scale as scale_mod

    with about("--from-run"):  # what it names, and the options stored with it
        source = scale_mod.resolve_source(store, from_run)
        opts = scale_mod.ScaleOptions.inherit(
            source, gpu_memory_gb=scale_mod.gpu_memory_for(gpus=given.get("gpus"), given_gb=gpu_memory,
                                                           address=address), **given)
    check_network(opts.network, base_resolution=opts.base_resolution, num_classes=opts.num_classes)
    return source, opts


def train_jobs(runner, plan, todo, *, err, address, wait_s, storage, home, opts):
    """Connect to Ray when something is left to train, run ``runner`` with live progress, and
    let the cluster go; the outcome."""
    from orchestrator import cluster as cluster_mod
    from orchestrator import scale as scale_mod

    info = resources = storage_path = None
    if todo:
        prepare_dataset(opts.dataset, err)
        info, resources, storage_path = _connect_for_jobs(err, address, wait_s, opts, storage, home)
    try:
        err.print(f"{len(plan) - len(todo)} of {len(plan)} models finished earlier; training "
                  f"{', '.join(todo) or 'nothing'}"
                  + (f" ({resources.concurrency} at once, {resources.workers} "
                     f"{'GPU' if resources.use_gpu else 'CPU'} worker(s) each)" if resources else ""), highlight=False)
        with results_only_stdout(), ScaleProgress(opts.epochs) as progress:
            runner.on_change = progress.update
            return scale_mod.run_scale(runner, cluster=info, resources=resources, storage_path=storage_path)
    finally:
        if info is not None:
            cluster_mod.shutdown(info)


@click.command(cls=CheckedCommand, checks=JOB_CHECKS)
@click.option("--from-run", "from_run", required=True, callback=check_id, metavar="ID",
              help="What to scale: a search id (its winner), a trial id (that candidate), a scale id (that "
              "scale's options as defaults), the MLflow run id of any of them, or 'latest'.")
@click.option("--phis", type=PhiList(), default=None,
              help="φ values to train: '1-7', '1,3,5' or '0.5,1.5' (compound); 1..7 (official). Default 1-7.")
@click.option("--mode", type=click.Choice(scaling.PLAN_MODES), default=None,
              help="compound: depth, width, resolution = α^φ, β^φ, γ^φ of the winner. official: the shipped "
              "B1..B7 table. Default: compound.")
@click.option("--no-baseline", is_flag=True, help="Do not train the unscaled network (B0), trained for comparison "
              "by default.")
@job_options
@click.option("--register", "register_as", default=None, callback=check_model_name, metavar="NAME",
              help="When the scale finishes, register its members in the MLflow model registry as versions of "
              "NAME with aliases b0..b7 (models:/NAME@b3 loads B3). Again for the same scale: no new versions.")
@click.option("--dry-run", is_flag=True, help="Print the plan (as `orch plan` does) with each model's batch and lr; "
              "launch nothing.")
@run_options
def scale(from_run, phis, mode, no_baseline, register_as, dry_run, experiment, home, db_url, tracking_uri, address,
          wait_s, storage, as_json, gpu_memory, **job):
    """Train the scaled family B0..Bk from a search's winning α, β, γ, one Ray Train job per model.

    Each model is a data-parallel TorchTrainer run (checkpointed every epoch), launched as the
    cluster's resources allow. Results go to the results store (scale_runs) and MLflow (a scale
    parent run with one child per model, plan.json and an accuracy-vs-GMACs plot). Running the
    same command again trains only what is missing.

    \b
    orch scale --from-run latest --phis 1-3          # CPU demo size
    orch scale --from-run search-20261127-ab12cd --gpus 8 --epochs 30
    orch scale --from-run <trial id> --mode official --phis 1-4 --dry-run
    """
    from orchestrator import home as home_mod
    from orchestrator import scale as scale_mod
    from orchestrator.tracking import family_urls

    store = open_store(home, db_url)
    source, opts = inherit(store, from_run, address=address, gpu_memory=gpu_memory, mode=mode, phis=phis,
                           baseline=False if no_baseline else None, experiment=experiment,
                           compile=job.pop("compile_mode"), **job)
    if source.scale is not None and source.scale.kind != "scale":
        raise click.BadParameter(f"{source.scale.id} is an {source.scale.kind}, not a scale; scale its search "
                                 f"{source.search.id}", param_hint="--from-run")
    t = source.trial
    coeffs = scaling.Coefficients(t.alpha, t.beta, t.gamma)
    with about("--phis"):
        plan = scale_mod.build_plan(opts, coeffs)
    scale_id = scale_mod.scale_id_for(source, coeffs, opts)
    err = stderr_console()
    what = (f"{'winner ' if source.via != 'trial' else 'trial '}{t.trial_id} of {source.search.id}: "
            f"α={t.alpha:.4f} β={t.beta:.4f} γ={t.gamma:.4f} (val_top1 {t.val_top1:.4f} at φ=1)")
    title = f"{scale_id}: {opts.mode} plan from {what}"
    if dry_run:
        rows = [{k: v for k, v in r.items() if k != "spec"} for r in plan]
        if as_json:
            echo_json({"scale_id": scale_id, "search_id": source.search.id, "trial_id": t.trial_id,
                       "alpha": t.alpha, "beta": t.beta, "gamma": t.gamma, "dry_run": True,
                       "options": opts.as_config(), "models": rows})
        else:
            print_dry_run(stdout_console(), title, rows, opts)
        return
    if not as_json:
        for line in notes(source, opts):
            err.print(line, highlight=False)

    todo = scale_mod.pending_models(store, scale_id, plan, opts.epochs)
    tracker = open_tracker(home, tracking_uri, experiment)
    h = home_mod.home_dir(home)
    writable(h)
    runner = scale_mod.ScaleRun(scale_id, source, coeffs, opts, plan, store=store, tracker=tracker)
    err.print(title, highlight=False)
    outcome = train_jobs(runner, plan, todo, err=err, address=address, wait_s=wait_s, storage=storage, home=h,
                         opts=opts)
    models = [scale_mod.model_entry(m) for m in outcome.models]
    url, charts = family_urls("http://127.0.0.1:5000", tracker.experiment_id, outcome.scale_id)
    registered = None
    if register_as and outcome.status == Status.FINISHED:
        registered = scale_mod.register_scale(store, tracker, outcome.scale_id, register_as)
    if as_json:
        echo_json({"scale_id": outcome.scale_id, "mlflow_run_id": outcome.mlflow_run_id,
                   "search_id": outcome.search_id, "trial_id": outcome.trial_id, "status": outcome.status,
                   "alpha": t.alpha, "beta": t.beta, "gamma": t.gamma, "models": models,
                   "summary": outcome.summary, "ui_url": url, "ui_charts_url": charts, "registered": registered})
    else:
        print_scale_outcome(stdout_console(), outcome, models, url, compound=opts.mode == "compound")
        if registered:
            print_registered(stdout_console(), register_as, registered)
    if outcome.status == Status.INTERRUPTED:
        raise SystemExit(130)


def notes(source, opts) -> list[str]:
    """What a user should know before the jobs start: an interrupted search, another network."""
    out = [source.note] if source.note else []
    searched = source.search.config.get("network", "efficientnet-b0")
    if opts.network != searched:
        out.append(f"note: these coefficients were searched on {searched}; scaling {opts.network} with them")
    return out


def _connect_for_jobs(err, address, wait_s, opts, storage, home):
    """Ray (grown to the budget where it can) and the jobs' resources, or an error before
    anything is launched."""
    from orchestrator import cluster as cluster_mod
    from orchestrator import datasource
    from orchestrator.home import ray_storage
    from workers.datasets import DatasetError

    info = connect_and_grow(err, address, home, opts.gpus, wait_s)
    try:
        datasource.check_reach(opts.dataset, info.nodes, info.address)
        resources = cluster_mod.plan_job_resources(info, gpus=opts.gpus, workers=opts.workers,
                                                   cpus_per_worker=opts.cpus_per_worker,
                                                   gpu_workers_asked=bool(opts.gpus_per_job))
        storage_path = cluster_mod.resolve_storage(info, storage, ray_storage(home))
    except (cluster_mod.ClusterError, DatasetError):
        cluster_mod.shutdown(info)
        raise
    return info, resources, storage_path
