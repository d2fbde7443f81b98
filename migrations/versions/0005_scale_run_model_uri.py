"""scale_runs: the MLflow model each trained member was logged as (its URI)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

A frozen copy of the column this revision adds; never import the live models.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scale_runs") as t:
        t.add_column(sa.Column("model_uri", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scale_runs") as t:
        t.drop_column("model_uri")
