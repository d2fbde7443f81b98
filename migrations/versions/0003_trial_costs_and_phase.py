"""trials: measured cost (activations, peak memory, images/s), the paper point's mark, and the
phase (search or confirmation) and seed a trial trained with

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

A frozen copy of the columns this revision adds; never import the live models.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as t:
        t.add_column(sa.Column("activations_m", sa.Float(), nullable=True))
        t.add_column(sa.Column("peak_mem_mb", sa.Float(), nullable=True))
        t.add_column(sa.Column("images_per_s", sa.Float(), nullable=True))
        t.add_column(sa.Column("off_surface", sa.Boolean(), nullable=False, server_default=sa.false()))
        t.add_column(sa.Column("phase", sa.String(16), nullable=False, server_default="search"))
        t.add_column(sa.Column("seed", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trials") as t:
        for name in ("seed", "phase", "off_surface", "images_per_s", "peak_mem_mb", "activations_m"):
            t.drop_column(name)
