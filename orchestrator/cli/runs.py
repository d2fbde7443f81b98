"""`orch runs`: the searches and scales in the results store."""

from __future__ import annotations

import click

from orchestrator.cli.options import check_id, json_option, open_store, state_options
from orchestrator.cli.views import (
    echo_json, model_json, print_scale, print_search, record_json, runs_table, scale_json, search_json,
    stdout_console,
)


@click.group()
def runs():
    """List and show searches and scales stored in the results store."""


@runs.command("list")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50, show_default=True, help="Newest first.")
@state_options
@json_option
def runs_list(limit, home, db_url, as_json):
    """List searches and scales, newest first."""
    store = open_store(home, db_url)
    entries = [search_json(s) for s in store.list_searches(limit)] + [scale_json(s) for s in store.list_scales(limit)]
    entries = sorted(entries, key=lambda e: e["created_at"], reverse=True)[:limit]
    if as_json:
        echo_json(entries)
    else:
        stdout_console().print(runs_table(entries))


@runs.command("show")
@click.argument("run_id", callback=check_id)
@state_options
@json_option
def runs_show(run_id, home, db_url, as_json):
    """Show one search and its trials, or one scale and its models (by id or MLflow run id)."""
    store = open_store(home, db_url)
    s = store.get_search(run_id) or store.find_search_by_mlflow_run(run_id)
    if s is not None:
        trials = store.trials(s.id)
        if as_json:
            echo_json(search_json(s, full=True) | {"trials": [record_json(t, drop=("search_id",)) for t in trials]})
        else:
            print_search(stdout_console(), s, trials)
        return
    sc = store.get_scale(run_id) or store.find_scale_by_mlflow_run(run_id)
    if sc is None:
        raise click.BadParameter(f"no search or scale {run_id!r} in {store.masked_url}; see `orch runs list`",
                                 param_hint="RUN_ID")
    models = [model_json(r) for r in store.scale_runs(sc.id)]
    if as_json:
        echo_json(scale_json(sc, full=True) | {"models": models})
    else:
        print_scale(stdout_console(), sc, models)
