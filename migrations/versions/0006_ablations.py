"""scales.kind (scale | ablation) and each ablation run's arm, FLOPs target and seed

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

An ablation (`orch ablate`) is stored as a scale of kind "ablation": its runs are scale_runs rows
that also say which arm (baseline, compound, depth, width, resolution), which FLOPs multiple of
the baseline and which seed they are. Rows written before are scales (server default).

A frozen copy of the columns this revision adds; never import the live models.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scales") as t:
        t.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="scale"))
    with op.batch_alter_table("scale_runs") as t:
        t.add_column(sa.Column("arm", sa.String(16), nullable=True))
        t.add_column(sa.Column("target", sa.Float(), nullable=True))
        t.add_column(sa.Column("seed", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scale_runs") as t:
        t.drop_column("seed")
        t.drop_column("target")
        t.drop_column("arm")
    with op.batch_alter_table("scales") as t:
        t.drop_column("kind")
