"""Options and parameter types shared by the commands, and the checks between options, as click
callbacks and types (where click users look for them). Nothing heavy is imported here: `--help`
of every command answers without torch, Ray, MLflow or SQLAlchemy.
"""

from __future__ import annotations

import math
import re

import click

from orchestrator import scaling
from orchestrator.autoscale import DEFAULT_WAIT_S
from orchestrator.errors import InputError


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


ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


def check_id(ctx, param, value):
    if value is None:
        return None
    if not re.match(ID_RE, value):
        shown = value if len(value) <= 60 else value[:60] + "…"
        raise click.BadParameter(
            f"{shown!r} is not an id; ids are letters, digits and . _ : - (see `orch runs list`)"
        )
    return value


def check_dataset(ctx, param, value):
    """A dataset spec that exists and can be read (an image folder is scanned, not loaded)."""
    if value is None:
        return None
    from orchestrator.datasource import check
    from workers.datasets import DatasetError

    try:
        check(value)
    except DatasetError as e:
        raise click.BadParameter(str(e))
    return value


def check_model_name(ctx, param, value):
    """A registered-model name MLflow accepts (checked before anything trains)."""
    if value is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(value)
    except MlflowException as e:
        raise click.BadParameter(str(e).splitlines()[0]) from None
    if "'" in value or '"' in value or value != value.strip():
        raise click.BadParameter(f"{value!r}: use a name without quotes or surrounding spaces")
    return value


def prepare_with_progress(source, dest, err, **kw):
    """``orchestrator.prepare.prepare`` with a progress bar per split and its notes on ``err``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from orchestrator import prepare as prep

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        tasks = {}

        def on_progress(split, done, total):
            if split not in tasks:
                tasks[split] = progress.add_task(f"{split:5}", total=total)
            progress.update(tasks[split], completed=done)

        return prep.prepare(source, dest, on_progress=on_progress,
                            on_note=lambda line: progress.console.print(line, highlight=False), **kw)


def prepare_dataset(dataset: str, err) -> None:
    """An image folder's implicit preparation (``datasource.for_workers``), shown on ``err``;
    nothing for other datasets."""
    from orchestrator import datasource

    if not dataset.startswith("imagefolder:"):
        return

    def prepare(source, dest):
        err.print(f"{dataset}: preparing it for training (once; kept in {dest}; see `orch data prepare`)",
                  highlight=False)
        out = prepare_with_progress(source, dest, err)
        if out.already:
            err.print("  prepared before and unchanged since: nothing to do", highlight=False)
        return out

    datasource.for_workers(dataset, prepare=prepare)


def num_classes_of(dataset: str) -> int:
    from orchestrator.datasource import num_classes

    return num_classes(dataset)


class CheckedCommand(click.Command):
    """A command with checks between its options (``checks``: functions of the context), run
    once every option is parsed: a callback cannot see options given after its own."""

    def __init__(self, *args, checks=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.checks = tuple(checks)

    def invoke(self, ctx):
        for check in self.checks:
            check(ctx)
        return super().invoke(ctx)


def not_above(name: str, limit: str, *, budget: bool = False):
    """A check: option ``name`` may not exceed option ``limit`` (``budget``: a GPU budget, which
    0 turns off, so the option needs none)."""
    flag, limit_flag = "--" + name.replace("_", "-"), "--" + limit.replace("_", "-")

    def check(ctx):
        v, top = ctx.params.get(name), ctx.params.get(limit)
        if budget and top == 0 and v:
            more = "above 0" if isinstance(v, float) else "to 1 or more"
            raise click.BadParameter(f"needs a GPU budget; drop it or set {limit_flag} {more}", param_hint=flag)
        if v is not None and top is not None and v > top:
            if budget:
                raise click.BadParameter(f"{v:g} is above the {limit_flag} budget {top:g}; lower it or raise "
                                         f"{limit_flag}", param_hint=flag)
            raise click.BadParameter(f"{v:g} is above {limit_flag} {top:g}; use at most {top:g}", param_hint=flag)

    return check


def only_with(name: str, other: str, value):
    """A check: option ``name`` applies only when option ``other`` is ``value``."""

    def check(ctx):
        if ctx.params.get(name) and ctx.params.get(other) != value:
            raise click.BadParameter(f"only applies to --{other.replace('_', '-')} {value}",
                                     param_hint="--" + name.replace("_", "-"))

    return check


def one_of(*names: str, why: str):
    """A check: at most one of these options."""

    def check(ctx):
        if sum(1 for n in names if ctx.params.get(n)) > 1:
            raise click.UsageError(why)

    return check


def alone_with(option: str, allowed: set[str], why: str):
    """A check: when ``option`` is given, no option outside ``allowed`` may be (``why``)."""

    def check(ctx):
        from click.core import ParameterSource

        if not ctx.params.get(option):
            return
        given = [p for p in ctx.command.params if p.name not in allowed | {option}
                 and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
        if given:
            flag = given[0].opts[0]
            own = next(p.opts[0] for p in ctx.command.params if p.name == option)
            raise click.UsageError(f"{flag} cannot be combined with {own}: {why}; drop {flag}")

    return check


# --------------------------------------------------------------------------- shared options

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


def _check_baseline(ctx, param, value):
    if value is None:
        return None
    from orchestrator.baselines import check_name
    from workers.defaults import BaselineError

    try:
        return check_name(value)
    except BaselineError as e:
        raise click.BadParameter(str(e)) from None


def baseline_option(default):
    """``--baseline NAME``: the network scaled (``orchestrator.baselines``)."""
    shown = f" Default: {default}." if default else " Default: the search's."
    return click.option(
        "--baseline", "network", default=default, callback=_check_baseline, metavar="NAME",
        help="The network scaled: efficientnet-b0, resnet-50, mobilenet-v2 (torchvision's, exactly, at multiplier "
        "1), or 'module.path:callable' for your own: callable(depth=, width=, resolution=, num_classes=) "
        "returning a torch nn.Module, importable on every node." + shown)


def check_network(network: str, *, base_resolution: int, num_classes: int) -> None:
    """A user's network builds, runs and grows with both multipliers, or a one-line error
    about --baseline (the built-in ones always do)."""
    from orchestrator.baselines import check_user
    from workers.defaults import BaselineError

    try:
        check_user(network, base_resolution=base_resolution, num_classes=num_classes)
    except BaselineError as e:
        raise InputError(str(e), param="--baseline") from None


def _env_option(flag: str, env: str, metavar: str, help: str):
    """An option that defaults to environment variable ``env`` (said in its help), else None."""
    return click.option(flag, envvar=env, default=None, metavar=metavar, help=f"{help.format(env=f'Env {env}')}")


home_option = _env_option("--home", "ORCH_HOME", "DIR", "State folder for the embedded defaults (results store, "
                          "MLflow store, Ray storage). {env}; default ./orch-runs.")
db_url_option = _env_option("--db-url", "ORCH_DB_URL", "URL", "Results store (any SQLAlchemy URL, e.g. "
                            "postgresql+psycopg://user@host/db). {env}; default sqlite:///<home>/orch.db.")
tracking_option = _env_option("--tracking-uri", "MLFLOW_TRACKING_URI", "URI", "MLflow tracking store or server. "
                              "{env}; default sqlite:///<home>/mlflow.db.")
storage_option = _env_option("--storage", "ORCH_STORAGE", "PATH|URI", "Where trials and jobs write checkpoints: a "
                             "path every node mounts, or s3://bucket/prefix. {env}; default <home>/ray, which only a "
                             "one-machine cluster can use.")
address_option = _env_option("--address", "RAY_ADDRESS", "ADDR", "Ray cluster to use ('auto', host:port, "
                             "ray://host:10001). {env}; default: start a local Ray instance on 127.0.0.1.")
wait_option = click.option(
    "--wait-for-resources", "wait_s", type=click.FloatRange(min=0.0), default=DEFAULT_WAIT_S, show_default=True,
    metavar="SECONDS", help="On an autoscaling cluster, how long to wait for the nodes that a --gpus budget above the "
    "GPUs up now asks the autoscaler for (cloud GPU nodes take minutes to boot and pull the image).")
experiment_option = click.option(
    "--experiment", default="compound-scaling", show_default=True, help="MLflow experiment name."
)


def state_options(f):
    """--home and --db-url: where the results store is."""
    return home_option(db_url_option(f))


def compile_option(what: str, default):
    """--compile, defined once (search: per trial; scale: per job)."""
    from workers.defaults import COMPILE, COMPILE_MODES

    shown = f" Default: {COMPILE}." if default is not None else f" Default: the search's (else {COMPILE})."
    return click.option(
        "--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default=default,
        help=f"torch.compile each {what}'s network (one graph; compiled graphs are cached and shared by the "
        "processes of a node). 'auto': on a GPU when the steps left after a short timed probe save more than "
        "twice what the compile costs, never on CPU; a failed compile continues eager with one warning." + shown)


def run_options(f):
    """What a command that runs work on the cluster and records it needs: --experiment, --home,
    --db-url, --tracking-uri, --address, --wait-for-resources, --storage and --json."""
    for option in reversed((experiment_option, home_option, db_url_option, tracking_option, address_option,
                            wait_option, storage_option, json_option)):
        f = option(f)
    return f


# --------------------------------------------------------------------------- opening the stores


def open_store(home, db_url):
    """The results store of ``--home``/``--db-url``; an OrchError that says what to do otherwise."""
    from orchestrator import home as home_mod
    from orchestrator.cluster import reap_state_folder
    from orchestrator.store import ResultsStore, SchemaOutOfDate, StoreError

    h = home_mod.home_dir(home)
    reap_state_folder(h)  # what a SIGKILLed driver's local Ray left running
    if not db_url:
        writable(h)
    try:
        return ResultsStore(db_url or home_mod.default_db_url(h))
    except SchemaOutOfDate:
        raise
    except StoreError as e:  # it could not be opened at all: the URL is what to fix
        e.param, e.usage = "--db-url", True
        raise


def writable(home) -> None:
    from orchestrator import home as home_mod

    try:
        home_mod.ensure_writable(home)
    except PermissionError as e:
        raise InputError(str(e), usage=False) from None


def open_tracker(home, tracking_uri, experiment):
    from orchestrator import home as home_mod
    from orchestrator.tracking import Tracker

    h = home_mod.home_dir(home)
    return Tracker(tracking_uri or home_mod.default_tracking_uri(h), experiment, home_mod.artifact_root(h))
