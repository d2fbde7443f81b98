"""`orch search`: the φ=1 search as Ray Tune trials, or a stopped one resumed."""

from __future__ import annotations

from dataclasses import asdict

import click

from orchestrator import scaling
from orchestrator.cli.options import (
    CheckedCommand, alone_with, baseline_option, check_dataset, check_id, check_network, compile_option, not_above,
    num_classes_of, only_with, open_store, open_tracker, prepare_dataset, run_options, writable,
)
from orchestrator.cli.views import (
    SearchProgress, connect_and_grow, echo_json, print_search_outcome, results_only_stdout, stderr_console, stdout_console,
)
from orchestrator.status import Status
from workers import defaults

#: What `--resume` may be given with: where things are, not what the search does.
RESUME_ALLOWS = {"home", "db_url", "tracking_uri", "address", "wait_s", "storage", "as_json"}


@click.command(cls=CheckedCommand, checks=(
    alone_with("resume_id", RESUME_ALLOWS, "a resumed search keeps the options it started with"),
    not_above("grace_epochs", "epochs"),
    not_above("gpus_per_trial", "gpus", budget=True),
    only_with("synthetic_size", "dataset", "synthetic"),
))
@click.option("--space", "space_kind", type=click.Choice(["surface", "band", "grid"]), default="surface",
              show_default=True, help="surface: α·β²·γ² = 2 exactly; band: within --tolerance of 2; "
              "grid: the paper's grid over feasible points, one trial per distinct network.")
@click.option("--trials", type=click.IntRange(min=1, max=100_000), default=None,
              help="Candidates to train. Default 16 (grid: every distinct network on the grid).")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=defaults.EPOCHS, show_default=True,
              help="Maximum epochs per trial (ASHA stops weak trials earlier).")
@click.option("--grace-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Minimum epochs before ASHA may stop a trial.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds Optuna's TPE, the data and the models.")
@click.option("--tolerance", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.1, show_default=True,
              help="band/grid: propose points with |α·β²·γ² − 2| up to this (the formula; what trains is held to "
              "--flops-tolerance on measured FLOPs).")
@click.option("--flops-tolerance", type=click.FloatRange(min=0.001, max=1.0), default=0.05,
              show_default=True, help="Every trained candidate's measured FLOPs ratio to B0 is within this fraction "
              "of 2 (its width is solved to get there; one that cannot is infeasible and not trained).")
@click.option("--grid-step", type=click.FloatRange(min=0.005, max=0.5), default=0.05, show_default=True,
              help="grid: step of the coefficient grid.")
@click.option("--no-paper-point", is_flag=True, help="Do not evaluate the paper's (1.2, 1.1, 1.15) first.")
@click.option("--confirm-top", type=click.IntRange(min=0, max=20), default=3, show_default=True,
              help="After the search, train the top N distinct networks again at the full budget with fresh "
              "seeds; the winner is the best mean (0: no confirmation, the best single trial wins).")
@click.option("--confirm-seeds", type=click.IntRange(min=1, max=20), default=2, show_default=True,
              help="Fresh seeds per confirmed network (2 or more give a noise estimate).")
@click.option("--data-seed", type=click.IntRange(min=0), default=None,
              help="Seed of the synthetic task's data. Default: --seed.")
@click.option("--dataset", default="synthetic", show_default=True, callback=check_dataset,
              help="'synthetic' (generated, no download), 'imagefolder:PATH' (PATH/train/<class>/…, PATH/val/<class>/…) "
              "or 'prepared:PATH' (made by `orch data prepare`).")
@click.option("--base-resolution", type=click.IntRange(min=32, max=2048), default=None,
              help=f"B0's input size for the task. Default {scaling.B0_RESOLUTION}; {defaults.SYNTHETIC_BASE_RESOLUTION} for the synthetic task "
              "(its images are 64px).")
@baseline_option("efficientnet-b0")
@click.option("--batch-size", type=click.IntRange(min=1, max=65536), default=defaults.BATCH_SIZE,
              show_default=True, help="Training batch size per trial.")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True, max=10.0), default=defaults.LR,
              show_default=True,
              help="Peak SGD learning rate (warm-up, then cosine).")
@click.option("--gpus", type=click.FloatRange(min=0.0), default=None,
              help="GPU budget of the search. Default: every GPU the cluster has; 0 runs on CPU.")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="GPUs per trial, fractions allowed (0.5 packs two trials per GPU). Default with GPUs: packed "
              "by base resolution, from measured throughput: 8 per GPU below 91 px, 4 up to 128, 2 up to 181, "
              "1 above.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True,
              help="CPUs per trial; with no GPU, concurrency is the cluster's CPUs divided by this.")
@click.option("--max-failures", type=click.IntRange(min=0, max=100), default=2, show_default=True,
              help="Retries of a trial whose worker died, from its last checkpoint.")
@compile_option("trial", defaults.COMPILE)
@click.option("--name", default=None, help="A label for the search. Default: generated.")
@click.option("--synthetic-size", type=(click.IntRange(min=64), click.IntRange(min=32)), default=None,
              metavar="TRAIN VAL", help="Images in the synthetic task's train and val splits (default 1536 512).")
@click.option("--resume", "resume_id", default=None, callback=check_id, metavar="SEARCH_ID",
              help="Continue a search whose driver died or was stopped: its trials resume from their "
              "checkpoints, its Optuna study goes on, its rows and MLflow runs are reused. Takes the search's "
              "own options; only --home/--db-url/--tracking-uri/--address/--wait-for-resources/--storage/--json may be given.")
@run_options
def search(space_kind, trials, epochs, grace_epochs, seed, tolerance, flops_tolerance, grid_step, no_paper_point,
           confirm_top, confirm_seeds, data_seed, dataset, base_resolution, network, batch_size, lr, gpus, gpus_per_trial,
           cpus_per_trial, max_failures, compile_mode, name, synthetic_size, resume_id, experiment, home, db_url, tracking_uri,
           address, wait_s, storage, as_json):
    """Search φ=1 coefficients (α, β, γ) with α·β²·γ² ≈ 2 as Ray Tune trials.

    Optuna (TPE, seeded) proposes candidates, ASHA stops weak ones early, every trial is logged
    to MLflow (a parent run, one child per trial) and to the results store.

    \b
    orch search                                  # local Ray, CPU, synthetic data
    orch search --gpus 8 --dataset imagefolder:/data/pets --epochs 10
    orch search --space grid --tolerance 0.1 --grid-step 0.1
    orch search --baseline resnet-50 --dataset imagefolder:/data/pets
    orch search --resume search-20261127-ab12cd  # after a crash or Ctrl-C
    """
    from orchestrator.search import SearchOptions, new_search_id

    if resume_id:
        return _resume(resume_id, home, db_url, tracking_uri, address, wait_s, storage, as_json)
    search_id = new_search_id()
    opts = SearchOptions(
        name=name or search_id, space=space_kind, trials=trials, epochs=epochs, grace_epochs=grace_epochs, seed=seed,
        tolerance=tolerance, flops_tolerance=flops_tolerance, grid_step=grid_step, paper_point=not no_paper_point,
        dataset=dataset, base_resolution=base_resolution or scaling.default_base_resolution(dataset),
        num_classes=num_classes_of(dataset), batch_size=batch_size, lr=lr, gpus=gpus, gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial, max_failures=max_failures, experiment=experiment,
        synthetic_size=tuple(synthetic_size) if synthetic_size else None,
        confirm_top=confirm_top, confirm_seeds=confirm_seeds, data_seed=data_seed, compile=compile_mode,
        network=network,
    )
    check_network(network, base_resolution=opts.base_resolution, num_classes=opts.num_classes)
    store = open_store(home, db_url)
    tracker = open_tracker(home, tracking_uri, experiment)
    _run(opts, search_id, store, tracker, home, address, wait_s, storage, as_json)


def _resume(search_id, home, db_url, tracking_uri, address, wait_s, storage, as_json):
    from orchestrator import home as home_mod
    from orchestrator.search import check_resumable, options_of

    store = open_store(home, db_url)
    resume = check_resumable(store, search_id, storage=storage, home=home_mod.home_dir(home))
    opts = options_of(resume.record)
    tracker = open_tracker(home, tracking_uri, opts.experiment)
    _run(opts, search_id, store, tracker, home, address, wait_s, resume.storage, as_json, resume=resume)


def _run(opts, search_id, store, tracker, home, address, wait_s, storage, as_json, resume=None):
    """Connect to Ray, run (or resume) the search with live progress, print the outcome."""
    from orchestrator import cluster as cluster_mod
    from orchestrator import datasource
    from orchestrator import home as home_mod
    from orchestrator.search import run_search

    err = stderr_console()
    h = home_mod.home_dir(home)
    writable(h)
    prepare_dataset(opts.dataset, err)  # an image folder: before a cluster is started or joined
    info = connect_and_grow(err, address, h, opts.gpus, wait_s)
    try:
        datasource.check_reach(opts.dataset, info.nodes, info.address)
        cluster_mod.plan_resources(info, gpus=opts.gpus, gpus_per_trial=opts.gpus_per_trial,
                                   cpus_per_trial=opts.cpus_per_trial, base_resolution=opts.base_resolution)
        storage_path = cluster_mod.resolve_storage(info, storage, home_mod.ray_storage(h))
        if opts.dataset == "synthetic" and not as_json and resume is None:
            err.print(f"synthetic task: {opts.num_classes} classes, base resolution {opts.base_resolution} "
                      f"(its images are 64px; pass --base-resolution to change)", highlight=False)
        verb = "resuming search" if resume else "search"
        err.print(f"{verb} {search_id}: {opts.space} space, {info.cpus:g} CPUs / {info.gpus:g} GPUs, "
                  f"store {store.masked_url}", highlight=False)
        total = opts.trials or (None if opts.space == "grid" else 16)
        with results_only_stdout(), SearchProgress(total, opts.epochs) as progress:
            outcome = run_search(opts, store=store, tracker=tracker, cluster=info, storage_path=storage_path,
                                 on_change=progress.update, search_id=search_id, resume=resume)
    finally:
        cluster_mod.shutdown(info)
    if as_json:
        echo_json(asdict(outcome))
    else:
        print_search_outcome(stdout_console(), outcome)
    if outcome.status == Status.INTERRUPTED:
        err.print(f"continue it with: orch search --resume {outcome.search_id}", highlight=False)
        raise SystemExit(130)
