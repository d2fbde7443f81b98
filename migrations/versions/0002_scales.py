"""scales and scale_runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

A frozen copy of the tables as this revision creates them; never import the live models.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scales",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("search_id", sa.String(64), sa.ForeignKey("searches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("trial_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("driver", sa.String(200), nullable=True),
    )
    op.create_index("ix_scales_search_id", "scales", ["search_id"])
    op.create_table(
        "scale_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("scale_id", sa.String(64), sa.ForeignKey("scales.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("phi", sa.Float(), nullable=False),
        sa.Column("depth_mult", sa.Float(), nullable=False),
        sa.Column("width_mult", sa.Float(), nullable=False),
        sa.Column("resolution", sa.Integer(), nullable=False),
        sa.Column("network_key", sa.String(400), nullable=False),
        sa.Column("params", sa.Integer(), nullable=False),
        sa.Column("gmacs", sa.Float(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("workers", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("epochs_done", sa.Integer(), nullable=False),
        sa.Column("val_top1", sa.Float(), nullable=True),
        sa.Column("best_val_top1", sa.Float(), nullable=True),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("train_s", sa.Float(), nullable=True),
        sa.Column("images_per_s", sa.Float(), nullable=True),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("scale_id", "model", name="uq_scale_runs_scale_model"),
    )
    op.create_index("ix_scale_runs_scale_id", "scale_runs", ["scale_id"])


def downgrade() -> None:
    op.drop_index("ix_scale_runs_scale_id", table_name="scale_runs")
    op.drop_table("scale_runs")
    op.drop_index("ix_scales_search_id", table_name="scales")
    op.drop_table("scales")
