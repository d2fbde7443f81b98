"""`orch ui`: the MLflow UI on the tracking store, and the URLs of a scale's family."""

from __future__ import annotations

import sys

import click

from orchestrator.cli.options import (
    check_id, db_url_option, experiment_option, home_option, open_store, open_tracker, tracking_option,
)
from orchestrator.cli.views import stderr_console


@click.command()
@click.option("--scale", "scale_id", default=None, callback=check_id, metavar="ID",
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
    """Start the MLflow UI on the tracking store and print the URLs of a scale's family.

    The first URL opens the family's runs (B0 first) with val top-1, GMACs, parameters, φ and
    resolution as columns; the second, its charts (val top-1 against GMACs). Both open MLflow's
    model-training view, not its GenAI overview. With a tracking server (--tracking-uri http://…)
    nothing is started: the URLs on that server are printed. Ctrl-C stops the UI.

    \b
    orch ui                          # the newest scale, on http://127.0.0.1:5000
    orch ui --scale scale-0123abcd --port 5050
    """
    from urllib.parse import urlparse

    from orchestrator import home as home_mod
    from orchestrator.tracking import UIServer, family_urls, family_view, is_loopback

    if not is_loopback(host):
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
    given = click.get_current_context().get_parameter_source("experiment") != click.core.ParameterSource.DEFAULT
    if sc is not None and not given:  # the scale's own experiment
        experiment = (sc.config or {}).get("experiment", experiment)
    tracker = open_tracker(home, tracking_uri, experiment)
    if sc is not None:
        tracker.save_view(*family_view(sc.id))  # a scale from before orch saved views
    if urlparse(tracker.uri).scheme in ("http", "https"):
        click.echo("\n".join(family_urls(tracker.uri, tracker.experiment_id, sc.id if sc else None)))
        return
    server = UIServer(tracker.uri, home_mod.artifact_root(home_mod.home_dir(home)), host, port)
    try:
        with server:
            what = f"scale {sc.id}" if sc else "the experiment (no scale yet)"
            click.echo(f"MLflow UI on {server.base} (Ctrl-C stops it); {what}:")
            click.echo("\n".join(family_urls(server.base, tracker.experiment_id, sc.id if sc else None)))
            sys.stdout.flush()
            server.wait()
    except KeyboardInterrupt:
        pass
