"""`orch data`: prepared datasets (orchestrator/prepare.py)."""

from __future__ import annotations

import click

from orchestrator.cli.options import json_option, prepare_with_progress
from orchestrator.cli.views import echo_json, stderr_console


@click.group()
def data():
    """Prepare datasets: sharded, checked, ready for any node of a cluster."""


@data.command("prepare")
@click.argument("source")
@click.argument("dest", type=click.Path(file_okay=False, writable=True))
@click.option("--short-side", type=click.IntRange(min=32, max=8192), default=None,
              help="Cap of an image's short side in pixels; larger images are downscaled to it. Default 640 "
              "(B7's 600 px crops at full detail).")
@click.option("--shard-size", "shard_mb", type=click.FloatRange(min=0.001, max=65536), default=None, metavar="MB",
              help="Largest shard, in MiB (a single larger image gets a shard of its own). Default 256.")
@click.option("--workers", type=click.IntRange(min=1, max=1024), default=None,
              help="Encoding processes. Default: every CPU.")
@click.option("--skip-bad", is_flag=True, help="Skip files that are not readable images (and val images of "
              "classes with no train images) instead of stopping at the first; the manifest lists them.")
@click.option("--image-column", default=None, help="parquet: the column that holds the images (detected by default).")
@click.option("--label-column", default=None, help="parquet: the column that holds the labels (detected by default).")
@json_option
def prepare(source, dest, short_side, shard_mb, workers, skip_bad, image_column, label_column, as_json):
    """Prepare SOURCE into the folder DEST: JPEG shards, an index per shard and a manifest.

    SOURCE is imagefolder:PATH (PATH/train/<class>/…, PATH/val/<class>/…) or parquet:PATH (a
    folder of Parquet files, train-….parquet and validation-….parquet, with an image column and a
    label column, as datasets are published on the Hugging Face Hub). Train with
    --dataset prepared:DEST. Running it again continues an unfinished preparation, does nothing
    when DEST is complete, and prepares again when SOURCE changed.

    \b
    orch data prepare imagefolder:~/data/pets ~/data/pets-prepared
    orch data prepare parquet:~/hf/food101/data ~/data/food101 --skip-bad
    """
    from pathlib import Path

    from orchestrator import prepare as prep

    err = stderr_console()
    with err.status("reading the source…"):
        src = prep.open_source(source, image_column=image_column, label_column=label_column)
    err.print(f"{source}: {len(src.classes)} classes, {src.counts['train']} train and {src.counts['val']} val images",
              highlight=False)
    out = prepare_with_progress(src, Path(dest).expanduser(), err, short_side=short_side or prep.SHORT_SIDE,
                                shard_mb=shard_mb or prep.SHARD_MB, workers=workers, skip_bad=skip_bad)
    m = out.manifest
    size = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"])
    if as_json:
        echo_json({"dest": str(out.dest), "already": out.already, "classes": len(m["classes"]),
                   "train": m["splits"]["train"]["count"], "val": m["splits"]["val"]["count"], "bytes": size,
                   "skipped": len(m["skipped"]), "reencoded": m["reencoded"]})
        return
    verb = "already prepared" if out.already else "prepared"
    click.echo(f"{out.dest}: {verb}: {m['splits']['train']['count']} train and {m['splits']['val']['count']} val "
               f"images of {len(m['classes'])} classes, {size / 2**20:.1f} MiB in "
               f"{sum(len(sp['shards']) for sp in m['splits'].values())} shards ({m['reencoded']} re-encoded, "
               f"{len(m['skipped'])} skipped); train with --dataset prepared:{out.dest}")
