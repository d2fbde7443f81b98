"""`orch register`: a scale's trained members in the MLflow model registry."""

from __future__ import annotations

import click

from orchestrator.cli.options import (
    check_id, check_model_name, experiment_option, json_option, open_store, open_tracker, state_options,
    tracking_option,
)
from orchestrator.cli.views import echo_json, print_registered, stdout_console


@click.command()
@click.argument("scale_id", callback=check_id)
@click.argument("name", callback=check_model_name)
@state_options
@tracking_option
@experiment_option
@json_option
def register(scale_id, name, home, db_url, tracking_uri, experiment, as_json):
    """Register the finished members of scale SCALE_ID as versions of the registered model NAME.

    Each member becomes one version with alias b0..b7 (B0.5: b0_5) and tags for φ, resolution,
    GMACs, parameters and val top-1, so models:/NAME@b3 loads B3. Registering the same scale again
    makes no new versions (the aliases are set again).

    \b
    orch register scale-ab12cd34ef56 pets-family
    python -c "import mlflow; m = mlflow.pytorch.load_model('models:/pets-family@b2')"
    """
    from orchestrator.scale import register_scale

    store = open_store(home, db_url)
    tracker = open_tracker(home, tracking_uri, experiment)
    done = register_scale(store, tracker, scale_id, name)
    if as_json:
        echo_json({"name": name, "scale_id": scale_id, "versions": done})
    else:
        print_registered(stdout_console(), name, done)
