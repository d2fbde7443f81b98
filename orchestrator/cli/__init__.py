"""The ``orch`` command line: the root group, and one module per command (group), attached with
``add_command``. ``options`` holds the options and checks the commands share, ``views`` what
they print.

Heavy libraries (torch, ray, mlflow, sqlalchemy) are imported inside command bodies so that
``orch --help`` answers at once. Every ``OrchError`` (``orchestrator.errors``) becomes a one-line
click error here, in ``OrchGroup``, never a traceback: a mistake in what was asked exits 2, a
failure of the work exits 1.
"""

from __future__ import annotations

import sys

import click

from orchestrator import __version__
from orchestrator.errors import OrchError


def as_click_error(e: OrchError) -> click.ClickException:
    if not e.usage:
        return click.ClickException(str(e))
    if e.param:
        return click.BadParameter(str(e), param_hint=e.param)
    return click.UsageError(str(e))


class OrchGroup(click.Group):
    """The root group: runs a command and turns the project's errors into click's."""

    def invoke(self, ctx):
        from workers.datasets import DatasetError
        from workers.defaults import BaselineError

        try:
            return super().invoke(ctx)
        except OrchError as e:
            raise as_click_error(e) from None
        except BaselineError as e:  # a user's network that fails at a multiplier no check tried
            raise click.BadParameter(str(e), param_hint="--baseline") from None
        except DatasetError as e:  # found once the command runs (the cluster it reached, a source file)
            raise click.BadParameter(str(e), param_hint="--dataset") from None


@click.group(cls=OrchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="orch")
def main():
    """orch: find EfficientNet compound-scaling coefficients on your data, then train the family.

    \b
    orch plan                      show a scaled family: repeats, channels, params, GMACs
    orch search --gpus 8           the φ=1 search as Ray Tune trials (Optuna + ASHA)
    orch scale --from-run <id>     train B1..B7 from a search's winner
    orch ablate --from-run <id>    compound vs depth/width/resolution-only scaling at equal FLOPs
    orch register <scale> NAME     the family in the MLflow model registry (models:/NAME@b3)
    orch export <scale> --model B3 --format onnx --out b3.onnx
    orch ui                        compare the family in the MLflow UI
    orch data prepare SRC DEST     shard an image folder or Parquet set for training
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


def _attach() -> None:
    from orchestrator.cli.ablate import ablate
    from orchestrator.cli.data import data
    from orchestrator.cli.db import db
    from orchestrator.cli.export import export
    from orchestrator.cli.plan import plan
    from orchestrator.cli.register import register
    from orchestrator.cli.runs import runs
    from orchestrator.cli.scale import scale
    from orchestrator.cli.search import search
    from orchestrator.cli.ui import ui

    for command in (plan, search, scale, ablate, register, export, runs, ui, data, db):
        main.add_command(command)


_attach()
