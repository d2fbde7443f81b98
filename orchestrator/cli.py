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
from workers import defaults


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

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=200)


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
    orch ui                        compare the family in the MLflow UI
    """
    import logging

    from orchestrator.cluster import sigterm_as_ctrl_c

    sigterm_as_ctrl_c()

    # orch's own warnings (a store write being retried, …) go to stderr as one line each
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("orch: %(message)s"))
    orch_log = logging.getLogger("orch")
    orch_log.handlers = [handler]
    orch_log.setLevel(logging.WARNING)
    orch_log.propagate = False


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


# --------------------------------------------------------------------------- shared state options

ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


def _check_id(ctx, param, value):
    import re

    if value is None:
        return None
    if not re.match(ID_RE, value):
        shown = value if len(value) <= 60 else value[:60] + "…"
        raise click.BadParameter(
            f"{shown!r} is not an id; ids are letters, digits and . _ : - (see `orch runs list`)"
        )
    return value


home_option = click.option(
    "--home", envvar="ORCH_HOME", default=None, metavar="DIR",
    help="State folder for the embedded defaults (results store, MLflow store, Ray storage). "
    "Env ORCH_HOME; default ./orch-runs.",
)
db_url_option = click.option(
    "--db-url", envvar="ORCH_DB_URL", default=None, metavar="URL",
    help="Results store (any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db). "
    "Env ORCH_DB_URL; default sqlite:///<home>/orch.db.",
)
tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
    help="MLflow tracking store or server. Env MLFLOW_TRACKING_URI; default sqlite:///<home>/mlflow.db.",
)
experiment_option = click.option(
    "--experiment", default="compound-scaling", show_default=True, help="MLflow experiment name."
)
storage_option = click.option(
    "--storage", envvar="ORCH_STORAGE", default=None, metavar="PATH|URI",
    help="Where trials and jobs write checkpoints: a path every node mounts, or s3://bucket/prefix. "
    "Env ORCH_STORAGE; default <home>/ray, which only a one-machine cluster can use.",
)
address_option = click.option(
    "--address", envvar="RAY_ADDRESS", default=None, metavar="ADDR",
    help="Ray cluster to use ('auto', host:port, ray://host:10001). Env RAY_ADDRESS; "
    "default: start a local Ray instance on 127.0.0.1.",
)


def open_store(home, db_url):
    """The results store, or a click error that says what to do."""
    from orchestrator import home as home_mod
    from orchestrator.store import SchemaOutOfDate, StoreError, ResultsStore

    from orchestrator.cluster import reap_state_folder

    h = home_mod.home_dir(home)
    reap_state_folder(h)  # what a SIGKILLed driver's local Ray left running
    if not db_url:
        try:
            home_mod.ensure_writable(h)
        except PermissionError as e:
            raise click.ClickException(str(e))
    try:
        return ResultsStore(db_url or home_mod.default_db_url(h))
    except SchemaOutOfDate as e:
        raise click.ClickException(str(e))
    except StoreError as e:
        raise click.BadParameter(str(e), param_hint="--db-url")


def open_tracker(home, tracking_uri, experiment):
    from orchestrator import home as home_mod
    from orchestrator.tracking import Tracker, TrackingError

    h = home_mod.home_dir(home)
    try:
        return Tracker(tracking_uri or home_mod.default_tracking_uri(h), experiment, home_mod.artifact_root(h))
    except TrackingError as e:
        raise click.BadParameter(str(e), param_hint="--tracking-uri")


def _dataset(ctx, param, value):
    from workers.data import DatasetError, parse_spec, scan_imagefolder

    try:
        kind, path = parse_spec(value)
        if kind == "imagefolder":
            scan_imagefolder(path)
    except DatasetError as e:
        raise click.BadParameter(str(e))
    return value


def default_base_resolution(dataset: str) -> int:
    """B0's input size when none is given: the synthetic task's own, else the paper's 224."""
    return defaults.SYNTHETIC_BASE_RESOLUTION if dataset == "synthetic" else scaling.B0_RESOLUTION


# --------------------------------------------------------------------------- orch search


def results_only_stdout():
    """While work runs, anything written to stdout goes to stderr: Ray prints raylet warnings
    and libraries print chatter to stdout, which would corrupt `--json` output and pipes.
    orch's own results are printed after this block."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)


class LiveProgress:
    """Live view of long work on stderr: a table redrawn in place on a terminal; without one
    (CI, pipes) one line per change instead. Subclasses give ``render(items)`` and
    ``line(item) -> (key, signature, text)``."""

    def __init__(self):
        import threading

        self.console = stderr_console()
        self.live = None
        self._seen: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, items) -> None:
        with self._lock:
            if self.live is not None:
                self.live.update(self.render(items))
                return
            for item in items:
                key, sig, text = self.line(item)
                if self._seen.get(key) != sig:
                    self._seen[key] = sig
                    self.console.print(text, highlight=False)


class SearchProgress(LiveProgress):
    """Trials running/finished and the best so far."""

    def __init__(self, total: int | None, epochs: int):
        super().__init__()
        self.total, self.epochs = total, epochs

    def update(self, state: dict) -> None:
        super().update(state["trials"])

    def line(self, t):
        top1 = t.last("val_top1")
        acc = f" val_top1={top1:.3f}" if top1 is not None else ""
        reuse = f" (reused {t.reused_from})" if t.reused_from else ""
        return t.trial_id, (t.status, t.epochs_done), (
            f"trial {t.trial_id} α={t.alpha:.3f} β={t.beta:.3f} γ={t.gamma:.3f} res={t.resolution} "
            f"epoch {t.epochs_done}/{self.epochs}{acc} {t.status}{reuse}")

    def render(self, trials):
        from rich.table import Table

        done = [t for t in trials if t.status != "running"]
        running = [t for t in trials if t.status == "running"]
        scored = [t for t in trials if t.last("val_top1") is not None]
        best = max(scored, key=lambda t: t.last("val_top1"), default=None)
        title = (f"{len(running)} running, {len(done)} ended" + (f" of {self.total}" if self.total else "")
                 + (f"; best so far {best.trial_id} val_top1={best.last('val_top1'):.3f}" if best else ""))
        table = Table(title=title, title_justify="left")
        for c in ("trial", "α", "β", "γ", "res", "GMACs", "×B0", "epoch", "val_top1", "status"):
            table.add_column(c)
        for t in trials[-14:]:
            top1 = t.last("val_top1")
            table.add_row(t.trial_id, f"{t.alpha:.3f}", f"{t.beta:.3f}", f"{t.gamma:.3f}", str(t.resolution),
                          f"{t.gmacs:.3f}", f"{t.flops_ratio:.2f}", f"{t.epochs_done}/{self.epochs}",
                          f"{top1:.3f}" if top1 is not None else "-",
                          t.status + (" (reused)" if t.reused_from else ""))
        return table


@main.command()
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
@click.option("--dataset", default="synthetic", show_default=True, callback=_dataset,
              help="'synthetic' (generated, no download) or 'imagefolder:PATH' (PATH/train/<class>/…, PATH/val/<class>/…).")
@click.option("--base-resolution", type=click.IntRange(min=32, max=2048), default=None,
              help=f"B0's input size for the task. Default {scaling.B0_RESOLUTION}; {defaults.SYNTHETIC_BASE_RESOLUTION} for the synthetic task "
              "(its images are 64px).")
@click.option("--batch-size", type=click.IntRange(min=1, max=65536), default=defaults.BATCH_SIZE,
              show_default=True, help="Training batch size per trial.")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True, max=10.0), default=defaults.LR,
              show_default=True,
              help="Peak SGD learning rate (warm-up, then cosine).")
@click.option("--gpus", type=click.FloatRange(min=0.0), default=None,
              help="GPU budget of the search. Default: every GPU the cluster has; 0 runs on CPU.")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="GPUs per trial, fractions allowed (0.5 packs two trials per GPU). Default 1 with GPUs.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True,
              help="CPUs per trial; with no GPU, concurrency is the cluster's CPUs divided by this.")
@click.option("--max-failures", type=click.IntRange(min=0, max=100), default=2, show_default=True,
              help="Retries of a trial whose worker died, from its last checkpoint.")
@click.option("--name", default=None, help="A label for the search. Default: generated.")
@click.option("--synthetic-size", type=(click.IntRange(min=64), click.IntRange(min=32)), default=None,
              metavar="TRAIN VAL", help="Images in the synthetic task's train and val splits (default 1536 512).")
@click.option("--resume", "resume_id", default=None, callback=_check_id, metavar="SEARCH_ID",
              help="Continue a search whose driver died or was stopped: its trials resume from their "
              "checkpoints, its Optuna study goes on, its rows and MLflow runs are reused. Takes the search's "
              "own options; only --home/--db-url/--tracking-uri/--address/--storage/--json may be given.")
@experiment_option
@home_option
@db_url_option
@tracking_option
@address_option
@storage_option
@json_option
@click.pass_context
def search(ctx, space_kind, trials, epochs, grace_epochs, seed, tolerance, flops_tolerance, grid_step, no_paper_point,
           confirm_top, confirm_seeds, data_seed, dataset, base_resolution, batch_size, lr, gpus, gpus_per_trial, cpus_per_trial, max_failures, name,
           synthetic_size, resume_id, experiment, home, db_url, tracking_uri, address, storage, as_json):
    """Search φ=1 coefficients (α, β, γ) with α·β²·γ² ≈ 2 as Ray Tune trials.

    Optuna (TPE, seeded) proposes candidates, ASHA stops weak ones early, every trial is logged
    to MLflow (a parent run, one child per trial) and to the results store.

    \b
    orch search                                  # local Ray, CPU, synthetic data
    orch search --gpus 8 --dataset imagefolder:/data/pets --epochs 10
    orch search --space grid --tolerance 0.1 --grid-step 0.1
    orch search --resume search-20261127-ab12cd  # after a crash or Ctrl-C
    """
    from orchestrator.search import SearchOptions, new_search_id
    from workers.data import num_classes_of

    if resume_id:
        from click.core import ParameterSource

        infra = {"resume_id", "home", "db_url", "tracking_uri", "address", "storage", "as_json"}
        given = [p for p in ctx.command.params if p.name not in infra
                 and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
        if given:
            flag = given[0].opts[0]
            raise click.UsageError(f"{flag} cannot be combined with --resume: a resumed search keeps the options "
                                   f"it started with; drop {flag}")
        return _resume_search(resume_id, home, db_url, tracking_uri, address, storage, as_json)

    if grace_epochs > epochs:
        raise click.BadParameter(f"{grace_epochs} is above --epochs {epochs}; use at most {epochs}",
                                 param_hint="--grace-epochs")
    if gpus == 0 and gpus_per_trial:
        raise click.BadParameter("needs a GPU budget; drop it or set --gpus above 0", param_hint="--gpus-per-trial")
    if gpus is not None and gpus_per_trial is not None and gpus_per_trial > gpus:
        raise click.BadParameter(f"{gpus_per_trial:g} is above the --gpus budget {gpus:g}; lower it or raise --gpus",
                                 param_hint="--gpus-per-trial")
    if synthetic_size and dataset != "synthetic":
        raise click.BadParameter("only applies to --dataset synthetic", param_hint="--synthetic-size")
    if base_resolution is None:
        base_resolution = default_base_resolution(dataset)
    search_id = new_search_id()
    opts = SearchOptions(
        name=name or search_id, space=space_kind, trials=trials, epochs=epochs, grace_epochs=grace_epochs, seed=seed,
        tolerance=tolerance, flops_tolerance=flops_tolerance, grid_step=grid_step, paper_point=not no_paper_point,
        dataset=dataset, base_resolution=base_resolution, num_classes=num_classes_of(dataset),
        batch_size=batch_size, lr=lr, gpus=gpus, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
        max_failures=max_failures, experiment=experiment, synthetic_size=tuple(synthetic_size) if synthetic_size else None,
        confirm_top=confirm_top, confirm_seeds=confirm_seeds, data_seed=data_seed,
    )
    store = open_store(home, db_url)
    tracker = open_tracker(home, tracking_uri, experiment)
    _run_search_command(opts, search_id, store, tracker, home, address, storage, as_json)


def _resume_search(search_id, home, db_url, tracking_uri, address, storage, as_json):
    from pathlib import Path

    from orchestrator import home as home_mod
    from orchestrator.search import SearchInputError, check_resumable, options_of

    store = open_store(home, db_url)
    h = home_mod.home_dir(home)
    try:
        record, path, restorable = check_resumable(store, search_id, storage=storage, home=h)
    except SearchInputError as e:
        raise click.UsageError(str(e))
    opts = options_of(record)
    tracker = open_tracker(home, tracking_uri, opts.experiment)
    root = path.rsplit("/", 1)[0] if "://" in path else str(Path(path).parent)  # checked by check_resumable
    _run_search_command(opts, search_id, store, tracker, home, address, root, as_json, resume=(record, path, restorable))


def _run_search_command(opts, search_id, store, tracker, home, address, storage, as_json, resume=None):
    """Connect to Ray, run (or resume) the search with live progress, print the outcome."""
    from orchestrator import cluster as cluster_mod
    from orchestrator import home as home_mod
    from orchestrator.errors import SearchFailed
    from orchestrator.search import SearchInputError, run_search

    err = stderr_console()
    h = home_mod.home_dir(home)
    home_mod.ensure_writable(h)
    gpus, gpus_per_trial, cpus_per_trial = opts.gpus, opts.gpus_per_trial, opts.cpus_per_trial
    with err.status("starting Ray…"):
        try:
            info = cluster_mod.connect(address, home=h)
        except cluster_mod.ClusterError as e:
            raise click.BadParameter(str(e), param_hint="--address")
    try:
        try:
            cluster_mod.plan_resources(info, gpus=gpus, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial)
            storage_path = cluster_mod.resolve_storage(info, storage, home_mod.ray_storage(h))
        except cluster_mod.ClusterError as e:
            raise click.UsageError(str(e))
        if opts.dataset == "synthetic" and not as_json and resume is None:
            err.print(f"synthetic task: {opts.num_classes} classes, base resolution {opts.base_resolution} "
                      f"(its images are 64px; pass --base-resolution to change)", highlight=False)
        verb = "resuming search" if resume else "search"
        err.print(f"{verb} {search_id}: {opts.space} space, {info.cpus:g} CPUs / {info.gpus:g} GPUs, "
                  f"store {store.masked_url}", highlight=False)
        total = opts.trials or (None if opts.space == "grid" else 16)
        with results_only_stdout(), SearchProgress(total, opts.epochs) as progress:
            try:
                outcome = run_search(opts, store=store, tracker=tracker, cluster=info,
                                     storage_path=storage_path, on_change=progress.update,
                                     search_id=search_id, resume=resume)
            except SearchFailed as e:
                raise click.ClickException(str(e))
            except SearchInputError as e:
                raise click.UsageError(str(e))
    finally:
        cluster_mod.shutdown(info)
    best = outcome.best
    if as_json:
        click.echo(json.dumps({"search_id": outcome.search_id, "mlflow_run_id": outcome.mlflow_run_id,
                               "status": outcome.status, "n_trials": outcome.n_trials, "best": best,
                               "summary": outcome.summary}, indent=2, default=str))
    else:
        out = stdout_console()
        s = outcome.summary
        out.print(f"search {outcome.search_id} {outcome.status}: {outcome.n_trials} trials, "
                  f"{s['n_networks']} distinct networks ({s['n_reused']} reused), {s['wall_s']:.0f}s wall"
                  + (f", efficiency {s['efficiency']}" if s["efficiency"] is not None else " (resumed)"),
                  highlight=False)
        if s.get("confirmation"):
            _print_confirmation(out, s["confirmation"])
        if best:
            note = "" if s["winner_within_tolerance"] else " (no trial was within --flops-tolerance; best overall)"
            mean = (f" confirmed {best['confirm_mean']:.4f} ± {best['confirm_std']:.4f} over {len(best['confirm_seeds'])} "
                    f"seeds" if best.get("confirm_mean") is not None else "")
            out.print(f"winner {best['trial_id']}: α={best['alpha']:.4f} β={best['beta']:.4f} γ={best['gamma']:.4f} "
                      f"val_top1={best['val_top1']:.4f}{mean} FLOPs ×B0={best['flops_ratio']:.2f}{note}", highlight=False)
            out.print(f"next: orch scale --from-run {outcome.search_id}", highlight=False)
    if outcome.status == "interrupted":
        err.print(f"continue it with: orch search --resume {outcome.search_id}", highlight=False)
        raise SystemExit(130)


# --------------------------------------------------------------------------- orch scale


class ScaleProgress(LiveProgress):
    """One row per model: epoch, val top-1, status."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def line(self, m):
        top1 = m.last("val_top1")
        acc = f" val_top1={top1:.3f}" if top1 is not None else ""
        note = " (finished earlier)" if m.earlier else (f": {m.error}" if m.error else "")
        return m.name, (m.status, m.epochs_done), (
            f"{m.name} φ={m.row['phi']:g} res={m.row['resolution']} batch={m.row['batch_size']} "
            f"epoch {m.epochs_done}/{self.epochs}{acc} {m.status}{note}")

    def render(self, models):
        from rich.table import Table

        running = sum(1 for m in models if m.status == "running")
        done = sum(1 for m in models if m.status == "finished")
        table = Table(title=f"{running} training, {done} of {len(models)} finished", title_justify="left")
        for c in ("model", "φ", "res", "GMACs", "batch", "epoch", "val_top1", "status"):
            table.add_column(c)
        for m in models:
            top1 = m.last("val_top1")
            table.add_row(m.name, f"{m.row['phi']:g}", str(m.row["resolution"]), f"{m.row['gmacs']:.3f}",
                          str(m.row["batch_size"]), f"{m.epochs_done}/{self.epochs}",
                          f"{top1:.3f}" if top1 is not None else "-",
                          m.status + (" (earlier)" if m.earlier else ""))
        return table


def _models_table(models: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c, j in (("model", "left"), ("φ", "right"), ("res", "right"), ("params (M)", "right"), ("GMACs", "right"),
                 ("batch", "right"), ("lr", "right"), ("val top-1", "right"), ("time (s)", "right"), ("status", "left")):
        table.add_column(c, justify=j)
    for m in models:
        table.add_row(m["name"], f"{m['phi']:g}", str(m["resolution"]), f"{m['params_m']:.2f}", f"{m['gmacs']:.3f}",
                      str(m["batch_size"]), f"{m['lr']:.4g}",
                      f"{m['val_top1']:.4f}" if m["val_top1"] is not None else "-",
                      f"{m['train_s']:.0f}" if m.get("train_s") else "-",
                      m["status"] + (" (earlier)" if m.get("done_before") else ""))
    return table


@main.command()
@click.option("--from-run", "from_run", required=True, callback=_check_id, metavar="ID",
              help="What to scale: a search id (its winner), a trial id (that candidate), a scale id (that "
              "scale's options as defaults), the MLflow run id of any of them, or 'latest'.")
@click.option("--phis", type=PhiList(), default=None,
              help="φ values to train: '1-7', '1,3,5' or '0.5,1.5' (compound); 1..7 (official). Default 1-7.")
@click.option("--mode", type=click.Choice(scaling.PLAN_MODES), default=None,
              help="compound: depth, width, resolution = α^φ, β^φ, γ^φ of the winner. official: the shipped "
              "B1..B7 table. Default: compound.")
@click.option("--baseline/--no-baseline", default=None, help="Train B0 too, for comparison. Default: yes.")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None,
              help="Epochs per model. Default: the search's.")
@click.option("--dataset", default=None, callback=lambda c, p, v: _dataset(c, p, v) if v else None,
              help="'synthetic' or 'imagefolder:PATH'. Default: the search's.")
@click.option("--base-resolution", type=click.IntRange(min=32, max=2048), default=None,
              help="B0's input size; the family scales from it. Default: the search's.")
@click.option("--batch-size", type=click.IntRange(min=1, max=65536), default=None,
              help="B0's batch per worker; larger models derive theirs by --batch-rule. Default: the search's.")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True, max=10.0), default=None,
              help="B0's learning rate at --batch-size on one worker; scaled linearly with each model's "
              "global batch. Default: the search's.")
@click.option("--batch-rule", type=click.Choice(["fit", "sqrt-flops", "fixed"]), default=None,
              help="fit (default): every model keeps B0's batch unless its estimated training memory "
              "(activations × batch × 6.8 bytes, measured for bf16 on an H200) passes 80% of the GPU's; then the "
              "largest multiple of 8 that fits. Never shrinks on CPU. sqrt-flops: B0's / sqrt(FLOPs ratio), "
              "multiple of 8, at least 8. fixed: B0's batch everywhere. lr follows the batch linearly.")
@click.option("--gpu-memory", "gpu_memory", type=click.FloatRange(min=1.0), default=None, metavar="GB",
              help="GPU memory the fit rule plans against. Default: this machine's GPU; 80 with --address "
              "and no GPU here; none (CPU jobs) with --gpus 0 or no GPU and no cluster.")
@click.option("--gpus", type=click.FloatRange(min=0.0), default=None,
              help="GPU budget of the scale. Default: every GPU the cluster has; 0 runs on CPU.")
@click.option("--gpus-per-job", type=click.IntRange(min=1), default=None,
              help="Data-parallel GPU workers per model (one GPU each). Default 1 with GPUs.")
@click.option("--workers-per-job", type=click.IntRange(min=1, max=1024), default=None,
              help="Without GPUs: data-parallel CPU workers (gloo) per model. Default 1.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True,
              help="CPUs of each worker.")
@click.option("--max-failures", type=click.IntRange(min=0, max=100), default=2, show_default=True,
              help="Restarts of a job whose worker died, from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the plan (as `orch plan` does) with each model's batch and lr; "
              "launch nothing.")
@experiment_option
@home_option
@db_url_option
@tracking_option
@address_option
@storage_option
@json_option
def scale(from_run, phis, mode, baseline, epochs, dataset, base_resolution, batch_size, lr, batch_rule, gpu_memory, gpus,
          gpus_per_job, workers_per_job, cpus_per_worker, max_failures, dry_run, experiment, home, db_url,
          tracking_uri, address, storage, as_json):
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
    from workers.data import num_classes_of

    if gpus == 0 and gpus_per_job:
        raise click.BadParameter("needs a GPU budget; drop it or set --gpus to 1 or more", param_hint="--gpus-per-job")
    if gpus is not None and gpus_per_job is not None and gpus_per_job > gpus:
        raise click.BadParameter(f"{gpus_per_job} is above the --gpus budget {gpus:g}; lower it or raise --gpus",
                                 param_hint="--gpus-per-job")
    if gpus_per_job and workers_per_job:
        raise click.UsageError("--workers-per-job is for CPU jobs and --gpus-per-job for GPU jobs; give one")
    store = open_store(home, db_url)
    try:
        source = scale_mod.resolve_source(store, from_run)
    except scale_mod.ScaleInputError as e:
        raise click.BadParameter(str(e), param_hint="--from-run")
    cfg = source.search.config or {}
    prev = (source.scale.config or {}) if source.scale else {}

    def pick(name, given, fallback):
        return given if given is not None else prev.get(name, cfg.get(name, fallback))

    dataset = pick("dataset", dataset, "synthetic")
    same_data = dataset == cfg.get("dataset", "synthetic")
    syn = prev.get("synthetic_size", cfg.get("synthetic_size")) if same_data else None
    opts = scale_mod.ScaleOptions(
        mode=mode or prev.get("mode", "compound"),
        phis=phis if phis is not None else prev.get("phis", [float(p) for p in range(1, 8)]),
        baseline=baseline if baseline is not None else prev.get("baseline", True),
        epochs=pick("epochs", epochs, defaults.EPOCHS), dataset=dataset,
        base_resolution=pick("base_resolution", base_resolution, default_base_resolution(dataset)),
        num_classes=num_classes_of(dataset),
        batch_size=pick("batch_size", batch_size, defaults.BATCH_SIZE), lr=pick("lr", lr, defaults.LR),
        batch_rule=batch_rule or prev.get("batch_rule", "fit"),
        gpu_memory_gb=scale_mod.gpu_memory_for(gpus=gpus, given_gb=gpu_memory, address=address),
        workers=gpus_per_job or workers_per_job or 1, seed=int(cfg.get("seed", 0)),
        synthetic_size=tuple(syn) if syn else None,
        gpus=gpus, gpus_per_job=gpus_per_job, workers_per_job=workers_per_job or 1, cpus_per_worker=cpus_per_worker,
        max_failures=max_failures, experiment=experiment,
    )
    if source.scale and (gpus_per_job or workers_per_job) is None:
        opts.workers = int(prev.get("workers", 1))
    t = source.trial
    coeffs = scaling.Coefficients(t.alpha, t.beta, t.gamma)
    try:
        plan = scale_mod.build_plan(opts, coeffs)
    except scale_mod.ScaleInputError as e:
        raise click.BadParameter(str(e), param_hint="--phis")
    scale_id = scale_mod.scale_id_for(source, coeffs, opts)
    err = stderr_console()
    what = (f"{'winner ' if source.via != 'trial' else 'trial '}{t.trial_id} of {source.search.id}: "
            f"α={t.alpha:.4f} β={t.beta:.4f} γ={t.gamma:.4f} (val_top1 {t.val_top1:.4f} at φ=1)")
    title = f"{scale_id}: {opts.mode} plan from {what}"
    if dry_run:
        rows = [{k: v for k, v in r.items() if k != "spec"} for r in plan]
        if as_json:
            click.echo(json.dumps({"scale_id": scale_id, "search_id": source.search.id, "trial_id": t.trial_id,
                                   "alpha": t.alpha, "beta": t.beta, "gamma": t.gamma, "dry_run": True,
                                   "options": opts.as_config(), "models": rows}, indent=2))
            return
        from orchestrator.plan import render_table

        out = stdout_console()
        out.print(render_table(rows, title))
        out.print("per model: " + ", ".join(f"{r['name']} batch {r['batch_size']}×{r['workers']} lr {r['lr']:.4g}"
                                            for r in rows), highlight=False)
        mem = (f"against {opts.gpu_memory_gb:g} GB of GPU memory (80% of it, 6.8 bytes per activation)"
               if opts.gpu_memory_gb else "CPU jobs: no shrinking")
        out.print(f"batch rule {opts.batch_rule}" + (f", {mem}" if opts.batch_rule == "fit" else ""), highlight=False)
        out.print("dry run: nothing launched", highlight=False)
        return
    if source.note and not as_json:
        err.print(source.note, highlight=False)

    todo = scale_mod.pending_models(store, scale_id, plan, opts.epochs)
    tracker = open_tracker(home, tracking_uri, experiment)
    h = home_mod.home_dir(home)
    home_mod.ensure_writable(h)
    info = resources = storage_path = None
    if todo:
        info, resources, storage_path = _connect_for_jobs(err, address, opts, storage, h)
    try:
        runner = scale_mod.ScaleRun(scale_id, source, coeffs, opts, plan, store=store, tracker=tracker)
        err.print(f"{title}\n{len(plan) - len(todo)} of {len(plan)} models finished earlier; training "
                  f"{', '.join(todo) or 'nothing'}"
                  + (f" ({resources.concurrency} at once, {resources.workers} "
                     f"{'GPU' if resources.use_gpu else 'CPU'} worker(s) each)" if resources else ""), highlight=False)
        with results_only_stdout(), ScaleProgress(opts.epochs) as progress:
            runner.on_change = progress.update
            try:
                outcome = scale_mod.run_scale(runner, cluster=info, resources=resources, storage_path=storage_path)
            except scale_mod.ScaleInputError as e:
                raise click.ClickException(str(e))
            except scale_mod.ScaleFailed as e:
                raise click.ClickException(str(e))
    finally:
        if info is not None:
            from orchestrator import cluster as cluster_mod

            cluster_mod.shutdown(info)
    models = [scale_mod.model_entry(m) for m in outcome.models]
    from orchestrator.tracking import compare_url

    url = compare_url("http://127.0.0.1:5000", tracker.experiment_id,
                      [m["mlflow_run_id"] for m in models if m["mlflow_run_id"]])
    if as_json:
        click.echo(json.dumps({"scale_id": outcome.scale_id, "mlflow_run_id": outcome.mlflow_run_id,
                               "search_id": outcome.search_id, "trial_id": outcome.trial_id, "status": outcome.status,
                               "alpha": t.alpha, "beta": t.beta, "gamma": t.gamma, "models": models,
                               "summary": outcome.summary, "compare_url": url}, indent=2, default=str))
    else:
        out = stdout_console()
        s = outcome.summary
        out.print(_models_table(models, f"scale {outcome.scale_id} {outcome.status}: {len(s['trained_now'])} trained "
                                        f"now, {len(s['done_before'])} earlier, {s['wall_s']:.0f}s wall"))
        from orchestrator.chart import print_family

        print_family(outcome.scale_id, models, reference=opts.mode == "compound")
        out.print(f"next: orch ui --scale {outcome.scale_id}   then open {url}\n"
                  f"  there: Scatter Plot, X-axis gmacs, Y-axis val_top1_final (the family); the parent run "
                  f"{outcome.scale_id} holds family.png under Artifacts", highlight=False)
    if outcome.status == "interrupted":
        raise SystemExit(130)


def _connect_for_jobs(err, address, opts, storage, home):
    """Ray and the jobs' resources, or a click error before anything is launched."""
    from orchestrator import cluster as cluster_mod
    from orchestrator.home import ray_storage

    default_storage = ray_storage(home)
    with err.status("starting Ray…"):
        try:
            info = cluster_mod.connect(address, home=home)
        except cluster_mod.ClusterError as e:
            raise click.BadParameter(str(e), param_hint="--address")
    try:
        resources = cluster_mod.plan_job_resources(info, gpus=opts.gpus, workers=opts.workers,
                                                   cpus_per_worker=opts.cpus_per_worker,
                                                   gpu_workers_asked=bool(opts.gpus_per_job))
        storage_path = cluster_mod.resolve_storage(info, storage, default_storage)
    except cluster_mod.ClusterError as e:
        cluster_mod.shutdown(info)
        raise click.UsageError(str(e))
    return info, resources, storage_path


# --------------------------------------------------------------------------- orch runs


@main.group()
def runs():
    """List and show searches and scales stored in the results store."""


def _search_entry(s) -> dict:
    return {"id": s.id, "kind": "search", "name": s.name, "status": s.status,
            "created_at": s.created_at.isoformat(), "finished_at": s.finished_at.isoformat() if s.finished_at else None,
            "mlflow_run_id": s.mlflow_run_id, "best_trial_id": s.best_trial_id,
            "best": (s.summary or {}).get("best")}


def _scale_entry(sc) -> dict:
    models = (sc.summary or {}).get("models", [])
    scored = [m for m in models if m.get("val_top1") is not None]
    best = max(scored, key=lambda m: m["val_top1"], default=None)
    return {"id": sc.id, "kind": "scale", "name": f"from {sc.search_id}", "status": sc.status,
            "created_at": sc.created_at.isoformat(), "finished_at": sc.finished_at.isoformat() if sc.finished_at else None,
            "mlflow_run_id": sc.mlflow_run_id, "search_id": sc.search_id, "trial_id": sc.trial_id,
            "models": [p["name"] for p in sc.plan], "best": best}


@runs.command("list")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50, show_default=True, help="Newest first.")
@home_option
@db_url_option
@json_option
def runs_list(limit, home, db_url, as_json):
    """List searches and scales, newest first."""
    store = open_store(home, db_url)
    entries = [_search_entry(s) for s in store.list_searches(limit)] + [_scale_entry(s) for s in store.list_scales(limit)]
    entries = sorted(entries, key=lambda e: e["created_at"], reverse=True)[:limit]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    from rich.table import Table

    table = Table()
    for c in ("id", "kind", "name", "status", "created", "best val_top1", "best α, β, γ / model"):
        table.add_column(c)
    for e in entries:
        b = e["best"] or {}
        if e["kind"] == "search":
            where = f"{b['alpha']:.3f}, {b['beta']:.3f}, {b['gamma']:.3f}" if b else "-"
        else:
            where = f"{b['name']} of {'-'.join([e['models'][0], e['models'][-1]])}" if b else "-"
        table.add_row(e["id"], e["kind"], e["name"], e["status"], e["created_at"][:19],
                      f"{b['val_top1']:.4f}" if b else "-", where)
    stdout_console().print(table)


@runs.command("show")
@click.argument("run_id", callback=_check_id)
@home_option
@db_url_option
@json_option
def runs_show(run_id, home, db_url, as_json):
    """Show one search and its trials, or one scale and its models (by id or MLflow run id)."""
    store = open_store(home, db_url)
    s = store.get_search(run_id) or store.find_search_by_mlflow_run(run_id)
    if s is None:
        sc = store.get_scale(run_id) or store.find_scale_by_mlflow_run(run_id)
        if sc is None:
            raise click.BadParameter(f"no search or scale {run_id!r} in {store.masked_url}; see `orch runs list`",
                                     param_hint="RUN_ID")
        return _show_scale(store, sc, as_json)
    from dataclasses import asdict

    trials = store.trials(s.id)
    entry = _search_entry(s) | {"config": s.config, "summary": s.summary, "error": s.error, "trials": [
        {k: v for k, v in asdict(t).items() if k != "search_id"} for t in trials]}
    if as_json:
        click.echo(json.dumps(entry, indent=2, default=str))
        return
    from rich.table import Table

    out = stdout_console()
    out.print(f"{s.id} ({s.name}) {s.status}, created {entry['created_at'][:19]}, MLflow run {s.mlflow_run_id}",
              highlight=False)
    if s.error:
        out.print(f"error: {s.error}", highlight=False)
    table = Table()
    for c in ("trial", "α", "β", "γ", "res", "×B0", "act M", "img/s", "epochs", "val_top1", "status"):
        table.add_column(c)
    for t in trials:
        notes = [f"reused {t.reused_from}"] if t.reused_from else []
        notes += ["paper point, off the surface"] if t.off_surface else []
        notes += [f"confirm, seed {t.seed}"] if t.phase == "confirm" else []
        table.add_row(t.trial_id + (" *" if t.trial_id == s.best_trial_id else ""), f"{t.alpha:.3f}", f"{t.beta:.3f}",
                      f"{t.gamma:.3f}", str(t.resolution), f"{t.flops_ratio:.2f}" if t.flops_ratio else "-",
                      f"{t.activations_m:.2f}" if t.activations_m is not None else "-",
                      f"{t.images_per_s:.0f}" if t.images_per_s is not None else "-",
                      str(t.epochs_done), f"{t.val_top1:.4f}" if t.val_top1 is not None else "-",
                      t.status + (f" ({'; '.join(notes)})" if notes else ""))
    out.print(table)
    if s.summary and s.summary.get("confirmation"):
        _print_confirmation(out, s.summary["confirmation"])


def _print_confirmation(out, conf: dict) -> None:
    """The confirmed networks, best mean first, and the verdict on the winner's margin."""
    from rich.table import Table

    table = Table(title="confirmation: the top networks again, fresh seeds, full budget")
    for c in ("trial", "α", "β", "γ", "search val_top1", "mean ± std", "seeds"):
        table.add_column(c)
    for c in conf["candidates"]:
        table.add_row(c["trial_id"], f"{c['alpha']:.3f}", f"{c['beta']:.3f}", f"{c['gamma']:.3f}",
                      f"{c['search_val_top1']:.4f}",
                      f"{c['mean']:.4f} ± {c['std']:.4f}" if c["mean"] is not None else "-",
                      ", ".join(str(x) for x in c["seeds"]) or "-")
    out.print(table)
    out.print(f"winner {conf['winner']}: {conf['verdict']}", highlight=False)


def _show_scale(store, sc, as_json: bool) -> None:
    runs_ = store.scale_runs(sc.id)
    models = [{"name": r.model, "phi": r.phi, "resolution": r.resolution, "params_m": round(r.params / 1e6, 3),
               "gmacs": r.gmacs, "batch_size": r.batch_size, "lr": r.lr, "workers": r.workers, "status": r.status,
               "epochs_done": r.epochs_done, "val_top1": r.val_top1, "best_val_top1": r.best_val_top1,
               "train_s": r.train_s, "images_per_s": r.images_per_s, "mlflow_run_id": r.mlflow_run_id,
               "error": r.error, "history": r.history} for r in runs_]
    entry = _scale_entry(sc) | {"config": sc.config, "error": sc.error, "models": models}
    if as_json:
        click.echo(json.dumps(entry, indent=2, default=str))
        return
    out = stdout_console()
    c = sc.config
    out.print(f"{sc.id} {sc.status}, from {sc.search_id} trial {sc.trial_id} (α={c.get('alpha'):.4f} "
              f"β={c.get('beta'):.4f} γ={c.get('gamma'):.4f}, {c.get('mode')}), created {entry['created_at'][:19]}, "
              f"MLflow run {sc.mlflow_run_id}", highlight=False)
    if sc.error:
        out.print(f"error: {sc.error}", highlight=False)
    out.print(_models_table(models, "models"))
    from orchestrator.chart import print_family

    print_family(sc.id, models, reference=c.get("mode") == "compound")


# --------------------------------------------------------------------------- orch ui


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                   for info in socket.getaddrinfo(host.strip("[]"), None))
    except (OSError, ValueError):
        return False


@main.command()
@click.option("--scale", "scale_id", default=None, callback=_check_id, metavar="ID",
              help="The scale whose models to compare (id or MLflow run id). Default: the newest scale.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. The UI has no authentication: keep it on 127.0.0.1 unless it sits "
              "behind an authenticating proxy; any other address also needs --expose.")
@click.option("--expose", is_flag=True,
              help="Allow a --host that is not loopback (the UI then serves every run to whoever reaches it).")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=5000, show_default=True, help="Port to listen on.")
@experiment_option
@home_option
@db_url_option
@tracking_option
def ui(scale_id, host, expose, port, experiment, home, db_url, tracking_uri):
    """Start the MLflow UI on the tracking store and print the URL of a scale's comparison.

    With a tracking server (--tracking-uri http://…) nothing is started: the URL on that server
    is printed. Ctrl-C stops the UI.

    \b
    orch ui                          # the newest scale, on http://127.0.0.1:5000
    orch ui --scale scale-0123abcd --port 5050
    """
    import subprocess
    from urllib.parse import urlparse

    from orchestrator import home as home_mod
    from orchestrator.tracking import check_reachable, compare_url

    if not _is_loopback(host):
        if not expose:
            raise click.BadParameter(
                f"{host} is not a loopback address: the MLflow UI has no authentication, so anyone who reaches "
                f"{host}:{port} reads and changes every run; add --expose if that is meant (behind an "
                f"authenticating proxy)", param_hint="--host")
        stderr_console().print(f"orch: warning: the MLflow UI on {host}:{port} has no authentication; anyone who "
                               f"can reach it reads and changes every run", highlight=False)
    store = open_store(home, db_url)
    if scale_id:
        sc = store.get_scale(scale_id) or store.find_scale_by_mlflow_run(scale_id)
        if sc is None:
            raise click.BadParameter(f"no scale {scale_id!r} in {store.masked_url}; see `orch runs list`",
                                     param_hint="--scale")
    else:
        scales = store.list_scales(1)
        sc = scales[0] if scales else None
    run_ids = [r.mlflow_run_id for r in store.scale_runs(sc.id) if r.mlflow_run_id] if sc else []
    tracker = open_tracker(home, tracking_uri, experiment)
    uri = tracker.uri
    if urlparse(uri).scheme in ("http", "https"):
        click.echo(compare_url(uri, tracker.experiment_id, run_ids))
        return
    base = f"http://{host}:{port}"
    h = home_mod.home_dir(home)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", home_mod.artifact_root(h).resolve().as_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    import socket
    import tempfile
    import time

    with socket.socket() as probe:  # a taken port is said at once, not after MLflow's ~20 s start
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise click.ClickException(f"the MLflow UI did not start on {base}: {e.strerror or e}; "
                                       f"if the port is taken, pick another with --port") from None
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:  # it exited: say why (the last line it printed)
                log.seek(0)
                lines = [ln.strip() for ln in log.read().splitlines() if ln.strip()]
                why = next((ln for ln in reversed(lines) if "address already in use" in ln.lower()), lines[-1] if lines else "")
                raise click.ClickException(f"the MLflow UI did not start on {base}: {why[:300]}; "
                                           f"if the port is taken, pick another with --port")
            try:
                check_reachable(base, timeout=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise click.ClickException(f"the MLflow UI did not answer on {base} within 90s; see --port")
        what = f"scale {sc.id}" if sc else "the experiment (no scale yet)"
        click.echo(f"MLflow UI on {base} (Ctrl-C stops it); {what}:")
        click.echo(compare_url(base, tracker.experiment_id, run_ids), nl=True)
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


# --------------------------------------------------------------------------- orch db


@main.group()
def db():
    """Manage the results store's schema (Alembic)."""


def _schema_op(home, db_url, op):
    """Run ``op(store)`` on a store opened without the schema check; store errors -> click."""
    from orchestrator import home as home_mod
    from orchestrator.store import ResultsStore, StoreError

    try:
        store = ResultsStore(db_url or home_mod.default_db_url(home_mod.home_dir(home)), check_schema=False)
        return store, op(store)
    except StoreError as e:
        raise click.ClickException(str(e))


@db.command("upgrade")
@home_option
@db_url_option
def db_upgrade(home, db_url):
    """Migrate the results store to the newest schema."""
    store, (before, after) = _schema_op(home, db_url, lambda st: st.upgrade())
    click.echo(f"{store.masked_url}: {before or 'empty'} -> {after}")


@db.command("current")
@home_option
@db_url_option
def db_current(home, db_url):
    """Print the store's schema revision and the newest one this orch knows."""
    from orchestrator.store import head_revision

    store, rev = _schema_op(home, db_url, lambda st: st.current_revision())
    head = head_revision()
    state = "up to date" if rev == head else "run `orch db upgrade`"
    click.echo(f"{store.masked_url}: revision {rev or 'none'} (head {head}, {state})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
