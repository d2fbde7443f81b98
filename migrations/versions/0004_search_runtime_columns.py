"""searches: the runtime state of a search in columns of its own (its driver, resumes, storage,
phase, confirmation candidates, grid counts, concurrency), taken out of its config, which keeps
only the options it ran with

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

A frozen copy of the columns this revision adds; never import the live models. The data step
moves each key out of ``config`` into its column (and drops ``extra``, an option that was never
used), so a config reads back as options only.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: config key -> column (the same name), with its type
MOVED = {"driver": sa.String(200), "resumes": sa.Integer(), "storage_path": sa.Text(), "phase": sa.String(16),
         "confirm": sa.JSON(), "concurrency": sa.Integer(), "gpus_per_trial": sa.Float()}
#: config keys that become the ``grid`` column: {points, networks, infeasible}
GRID = {"grid_points": "points", "grid_networks": "networks", "grid_infeasible": "infeasible"}
DROPPED = ("extra",)


def _table():
    return sa.table("searches", sa.column("id", sa.String), sa.column("config", sa.JSON),
                    *(sa.column(name, type_) for name, type_ in MOVED.items()), sa.column("grid", sa.JSON))


def upgrade() -> None:
    with op.batch_alter_table("searches") as t:
        t.add_column(sa.Column("driver", sa.String(200), nullable=True))
        t.add_column(sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"))
        t.add_column(sa.Column("storage_path", sa.Text(), nullable=True))
        t.add_column(sa.Column("phase", sa.String(16), nullable=False, server_default="search"))
        t.add_column(sa.Column("confirm", sa.JSON(), nullable=True))
        t.add_column(sa.Column("grid", sa.JSON(), nullable=True))
        t.add_column(sa.Column("concurrency", sa.Integer(), nullable=True))
        t.add_column(sa.Column("gpus_per_trial", sa.Float(), nullable=True))
    searches = _table()
    conn = op.get_bind()
    for row in conn.execute(sa.select(searches.c.id, searches.c.config)).all():
        config = row.config if isinstance(row.config, dict) else json.loads(row.config or "{}")
        values = {key: config.pop(key) for key in MOVED if key in config}
        grid = {name: config.pop(key) for key, name in GRID.items() if key in config}
        for key in DROPPED:
            config.pop(key, None)
        values = {k: v for k, v in values.items() if v is not None}
        conn.execute(sa.update(searches).where(searches.c.id == row.id).values(
            config=config, **values, **({"grid": grid} if grid else {})))


def downgrade() -> None:
    searches = _table()
    conn = op.get_bind()
    for row in conn.execute(sa.select(searches)).mappings().all():
        config = dict(row["config"] if isinstance(row["config"], dict) else json.loads(row["config"] or "{}"))
        config |= {key: row[key] for key in MOVED if row[key] is not None}
        config |= {key: (row["grid"] or {}).get(name) for key, name in GRID.items() if row["grid"]}
        conn.execute(sa.update(searches).where(searches.c.id == row["id"]).values(config=config))
    with op.batch_alter_table("searches") as t:
        for name in ("gpus_per_trial", "concurrency", "grid", "confirm", "phase", "storage_path", "resumes", "driver"):
            t.drop_column(name)
