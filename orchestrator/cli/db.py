"""`orch db`: the results store's schema (Alembic)."""

from __future__ import annotations

import click

from orchestrator.cli.options import state_options


@click.group()
def db():
    """Manage the results store's schema (Alembic)."""


def _open(home, db_url):
    """The store, opened without the schema check (these commands are how it gets fixed)."""
    from orchestrator import home as home_mod
    from orchestrator.store import ResultsStore

    return ResultsStore(db_url or home_mod.default_db_url(home_mod.home_dir(home)), check_schema=False)


@db.command("upgrade")
@state_options
def db_upgrade(home, db_url):
    """Migrate the results store to the newest schema."""
    store = _open(home, db_url)
    before, after = store.upgrade()
    click.echo(f"{store.masked_url}: {before or 'empty'} -> {after}")


@db.command("current")
@state_options
def db_current(home, db_url):
    """Print the store's schema revision and the newest one this orch knows."""
    from orchestrator.store import head_revision

    store = _open(home, db_url)
    rev, head = store.current_revision(), head_revision()
    state = "up to date" if rev == head else "run `orch db upgrade`"
    click.echo(f"{store.masked_url}: revision {rev or 'none'} (head {head}, {state})")
