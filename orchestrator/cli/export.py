"""`orch export`: a trained member as pt2, ONNX or safetensors, with a model card."""

from __future__ import annotations

import click

from orchestrator.cli.options import experiment_option, json_option, open_store, open_tracker, state_options, tracking_option
from orchestrator.cli.views import echo_json, results_only_stdout


@click.command("export")
@click.argument("ident", metavar="ID")
@click.option("--model", default=None, help="The member to export (B0, B3, …); needed with a scale id.")
@click.option("--format", "fmt", type=click.Choice(["pt2", "onnx", "safetensors"]), required=True,
              help="pt2: a torch.export program; onnx: through PyTorch's exporter (pip install 'orch[export]'); "
              "safetensors: the weights alone.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The file to write; the model card "
              "goes beside it as OUT.card.json and OUT.card.md.")
@state_options
@tracking_option
@experiment_option
@json_option
def export(ident, model, fmt, out, home, db_url, tracking_uri, experiment, as_json):
    """Export a trained member of a scale: ID is a scale id (with --model) or a member's MLflow run id.

    The batch dimension stays dynamic (pt2, ONNX). The card beside the file holds the
    coefficients, φ, resolution, the input's normalisation, class names, GMACs, parameters,
    accuracy, the dataset's digest and the command that trained it.

    \b
    orch export scale-ab12cd34ef56 --model B3 --format onnx --out b3.onnx
    orch export scale-ab12cd34ef56 --model B1 --format pt2 --out b1.pt2
    """
    from pathlib import Path

    from orchestrator.export import export as run_export

    store = open_store(home, db_url)
    tracker = open_tracker(home, tracking_uri, experiment)
    with results_only_stdout():  # the exporters print progress to stdout
        k = run_export(store, tracker, ident, model, fmt, Path(out))
    if as_json:
        echo_json(k)
    else:
        click.echo(f"{k['model']} of {k['scale_id']} ({k['resolution']} px, val top-1 "
                   f"{k['val_top1'] if k['val_top1'] is None else round(k['val_top1'], 4)}) -> {k['file']} ({fmt}); "
                   f"card: {k['file']}.card.md")
