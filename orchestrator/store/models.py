"""SQLAlchemy 2.x models of the results store. The schema is owned by Alembic (``migrations/``);
migrations carry frozen copies of these tables and never import this module."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Search(Base):
    __tablename__ = "searches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # orchestrator.status.Status
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    config: Mapped[dict] = mapped_column(JSON)  # every option the search ran with (SearchOptions), nothing else
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    best_trial_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # winner, timing, efficiency
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # how it runs (0004): the driver running it (host:pid), drivers since the first, where its
    # checkpoints and Tune state are, its phase (search | confirm), the networks it confirms,
    # its grid's counts, trials at once and GPUs each
    driver: Mapped[str | None] = mapped_column(String(200), nullable=True)
    resumes: Mapped[int] = mapped_column(Integer, default=0)
    storage_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    phase: Mapped[str] = mapped_column(String(16), default="search")
    confirm: Mapped[list | None] = mapped_column(JSON, nullable=True)
    grid: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {points, networks, infeasible}
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gpus_per_trial: Mapped[float | None] = mapped_column(Float, nullable=True)


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("search_id", "trial_id", name="uq_trials_search_trial"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    trial_id: Mapped[str] = mapped_column(String(128))  # Tune's trial id
    alpha: Mapped[float] = mapped_column(Float)
    beta: Mapped[float] = mapped_column(Float)
    gamma: Mapped[float] = mapped_column(Float)
    network_key: Mapped[str] = mapped_column(String(400))
    resolution: Mapped[int] = mapped_column(Integer)
    params: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gmacs: Mapped[float | None] = mapped_column(Float, nullable=True)
    flops_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(20))  # orchestrator.status.Status
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)  # last reported epoch
    best_val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # seconds in training steps
    history: Mapped[list] = mapped_column(JSON, default=list)  # one dict per epoch
    reused_from: Mapped[str | None] = mapped_column(String(128), nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # measured cost: activations (M elements per image), peak device memory (MB, CUDA only),
    # mean training images/s
    activations_m: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_mem_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    off_surface: Mapped[bool] = mapped_column(Boolean, default=False)  # the paper's point, as published
    phase: Mapped[str] = mapped_column(String(16), default="search")  # search | confirm
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Scale(Base):
    """One `orch scale`: a plan (φ list, mode) trained from a search's winner or one trial."""

    __tablename__ = "scales"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    trial_id: Mapped[str] = mapped_column(String(128))  # the scaled trial (the winner by default)
    status: Mapped[str] = mapped_column(String(20))  # orchestrator.status.Status
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    config: Mapped[dict] = mapped_column(JSON)  # the plan's options and coefficients
    plan: Mapped[list] = mapped_column(JSON)  # the measured plan rows
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    driver: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host:pid of the last driver
    kind: Mapped[str] = mapped_column(String(16), default="scale", server_default="scale")  # scale | ablation (0006)


class ScaleRun(Base):
    """One model (B0..B7) of a scale: one Ray Train job."""

    __tablename__ = "scale_runs"
    __table_args__ = (UniqueConstraint("scale_id", "model", name="uq_scale_runs_scale_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scale_id: Mapped[str] = mapped_column(ForeignKey("scales.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(32))  # B0, B1, ..., B0.5
    phi: Mapped[float] = mapped_column(Float)
    depth_mult: Mapped[float] = mapped_column(Float)
    width_mult: Mapped[float] = mapped_column(Float)
    resolution: Mapped[int] = mapped_column(Integer)
    network_key: Mapped[str] = mapped_column(String(400))
    params: Mapped[int] = mapped_column(Integer)
    gmacs: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)  # per worker
    lr: Mapped[float] = mapped_column(Float)
    workers: Mapped[int] = mapped_column(Integer)
    model_uri: Mapped[str | None] = mapped_column(Text, nullable=True)  # the logged MLflow model (0005)
    # an ablation's run (0006): its arm (baseline | compound | depth | width | resolution), the
    # FLOPs multiple of the baseline it matches, its seed; None for a scale's members
    arm: Mapped[str | None] = mapped_column(String(16), nullable=True)
    target: Mapped[float | None] = mapped_column(Float, nullable=True)
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(20))  # orchestrator.status.Status
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    history: Mapped[list] = mapped_column(JSON, default=list)  # one dict per epoch
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
