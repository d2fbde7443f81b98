"""searches and trials

Revision ID: 0001
Revises:
Create Date: 2026-11-27

A frozen copy of the tables as this revision creates them; never import the live models.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "searches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("best_trial_id", sa.String(128), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("search_id", sa.String(64), sa.ForeignKey("searches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("trial_id", sa.String(128), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("beta", sa.Float(), nullable=False),
        sa.Column("gamma", sa.Float(), nullable=False),
        sa.Column("network_key", sa.String(400), nullable=False),
        sa.Column("resolution", sa.Integer(), nullable=False),
        sa.Column("params", sa.Integer(), nullable=True),
        sa.Column("gmacs", sa.Float(), nullable=True),
        sa.Column("flops_ratio", sa.Float(), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("epochs_done", sa.Integer(), nullable=False),
        sa.Column("val_top1", sa.Float(), nullable=True),
        sa.Column("best_val_top1", sa.Float(), nullable=True),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("train_s", sa.Float(), nullable=True),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("reused_from", sa.String(128), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("search_id", "trial_id", name="uq_trials_search_trial"),
    )
    op.create_index("ix_trials_search_id", "trials", ["search_id"])


def downgrade() -> None:
    op.drop_index("ix_trials_search_id", table_name="trials")
    op.drop_table("trials")
    op.drop_table("searches")
