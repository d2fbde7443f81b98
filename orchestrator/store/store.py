"""ResultsStore: the only code that talks to the SQL results store.

One session scope commits, rolls back, closes, retries transient connection errors with
backoff, and turns SQLAlchemy errors into ``StoreError``. Callers get frozen dataclasses,
never rows or sessions. Trial writes are idempotent upserts keyed by (search, Tune trial id).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import OrchError
from orchestrator.status import Status
from orchestrator.store.models import Base, Scale, ScaleRun, Search, Trial

log = logging.getLogger("orch.store")

#: Transient errors (a restarting server, a locked SQLite file) are retried this many times.
WRITE_RETRIES = 6
#: pg_advisory_lock key that serialises schema checks and creation ("orch" in ASCII).
SCHEMA_LOCK_KEY = 0x6F726368


class StoreError(OrchError):
    """The results store cannot be used; the message says why and what to do."""


class SchemaOutOfDate(StoreError):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def alembic_config(url: str | None = None):
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise StoreError(f"the migrations have {len(heads)} heads; expected exactly one")
    return heads[0]


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


@dataclass(frozen=True)
class SearchRecord:
    id: str
    name: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    config: dict
    mlflow_run_id: str | None
    best_trial_id: str | None
    summary: dict | None
    error: str | None
    driver: str | None = None
    resumes: int = 0
    storage_path: str | None = None
    phase: str = "search"
    confirm: list | None = None
    grid: dict | None = None
    concurrency: int | None = None
    gpus_per_trial: float | None = None


@dataclass(frozen=True)
class UnitRecord:
    """What a trial and a scale's model have in common: how it ran and what it reported
    (``orchestrator.recorder.Unit.figures``)."""

    status: str
    epochs_done: int
    val_top1: float | None  # last reported epoch
    best_val_top1: float | None
    train_loss: float | None
    train_s: float | None  # seconds in training steps
    images_per_s: float | None  # mean over its epochs
    history: list  # one dict per epoch
    mlflow_run_id: str | None
    error: str | None
    started_at: datetime | None
    ended_at: datetime | None


@dataclass(frozen=True)
class TrialRecord(UnitRecord):
    search_id: str
    trial_id: str
    alpha: float
    beta: float
    gamma: float
    network_key: str
    resolution: int
    params: int | None
    gmacs: float | None
    flops_ratio: float | None
    reused_from: str | None
    activations_m: float | None = None
    peak_mem_mb: float | None = None
    off_surface: bool = False
    phase: str = "search"
    seed: int | None = None


@dataclass(frozen=True)
class ScaleRecord:
    id: str
    search_id: str
    trial_id: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    config: dict
    plan: list
    mlflow_run_id: str | None
    summary: dict | None
    error: str | None
    driver: str | None
    kind: str = "scale"  # scale | ablation


@dataclass(frozen=True)
class ScaleRunRecord(UnitRecord):
    scale_id: str
    model: str
    phi: float
    depth_mult: float
    width_mult: float
    resolution: int
    network_key: str
    params: int
    gmacs: float
    batch_size: int
    lr: float
    workers: int
    model_uri: str | None = None  # models:/<id>, the member's weights as an MLflow model
    arm: str | None = None  # an ablation's: which arm, FLOPs multiple and seed
    target: float | None = None
    seed: int | None = None


def _record(cls, row):
    """A frozen record of ``row``; datetimes come back UTC-aware (SQLite drops the zone)."""
    return cls(**{f.name: _aware(v) if isinstance(v := getattr(row, f.name), datetime) else v for f in fields(cls)})


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite drops the zone; everything stored is UTC.
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


class ResultsStore:
    """Open with ``ResultsStore(url)``; an empty database is migrated to head, an out-of-date
    one is refused with the command that fixes it (``orch db upgrade``)."""

    def __init__(self, url: str, *, check_schema: bool = True, connect_timeout: float = 10.0):
        self.url = url
        self.masked_url = mask_url(url)
        try:
            parsed = sa.engine.make_url(url)
        except sa_exc.ArgumentError:
            raise StoreError(f"cannot parse database URL {url!r}; use e.g. sqlite:////abs/path/orch.db or postgresql+psycopg://user@host/db") from None
        kwargs: dict = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        elif parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": int(connect_timeout)}
        try:
            self.engine = sa.create_engine(url, **kwargs)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as e:
            raise StoreError(f"cannot open database {self.masked_url}: {e}") from None
        if parsed.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if check_schema:
            self.check_schema()

    # ------------------------------------------------------------------ schema

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self._connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def _connect(self):
        try:
            return self.engine.connect()
        except sa_exc.SQLAlchemyError as e:
            raise StoreError(f"cannot connect to the results store {self.masked_url}: {_one_line(e)}") from None

    def upgrade(self) -> tuple[str | None, str]:
        """Migrate to head; returns (from, to)."""
        with self._schema_lock():
            return self._upgrade()

    def _upgrade(self) -> tuple[str | None, str]:
        from alembic import command

        before = self.current_revision()
        with self._connect() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, "head")
                conn.commit()
            except sa_exc.SQLAlchemyError as e:
                conn.rollback()
                raise StoreError(f"upgrading {self.masked_url} failed: {_one_line(e)}") from None
        return before, head_revision()

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """One process at a time checks and creates the schema: two `orch` processes opening a
        new, empty store at once would otherwise see each other's half-made schema. SQLite: a
        lock file beside the database; PostgreSQL: a session advisory lock."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            from orchestrator.home import file_lock

            with file_lock(f"{url.database}.orch-lock"):
                yield
        elif url.get_backend_name() == "postgresql":
            with self._connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
        else:
            yield

    def check_schema(self) -> None:
        with self._schema_lock():
            self._check_schema()

    def _check_schema(self) -> None:
        head = head_revision()
        rev = self.current_revision()
        if rev == head:
            return
        if rev is None:
            with self._connect() as conn:
                tables = sa.inspect(conn).get_table_names()
            ours = {t.name for t in Base.metadata.sorted_tables}
            if not tables:
                self._upgrade()  # only an empty database is created automatically
                return
            if ours & set(tables):
                raise SchemaOutOfDate(
                    f"the results store {self.masked_url} has orch tables but no schema revision; run `orch db upgrade`"
                )
            raise StoreError(
                f"{self.masked_url} already holds other tables ({', '.join(sorted(tables)[:5])}); give orch its own database"
            )
        if rev in known_revisions():
            raise SchemaOutOfDate(
                f"the results store {self.masked_url} is at schema revision {rev}, this orch needs {head}; run `orch db upgrade`"
            )
        raise StoreError(
            f"the results store {self.masked_url} is at revision {rev}, which this orch does not know; upgrade orch"
        )

    # ------------------------------------------------------------------ sessions

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except sa_exc.SQLAlchemyError as e:
            s.rollback()
            raise StoreError(f"results store {self.masked_url}: {_one_line(e)}") from e
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def _write(self, fn):
        """Run ``fn(session)`` in a transaction, retrying transient failures with backoff."""
        delay = 0.2
        for attempt in range(WRITE_RETRIES + 1):
            try:
                with self.session() as s:
                    return fn(s)
            except StoreError as e:
                transient = isinstance(e.__cause__, (sa_exc.OperationalError, sa_exc.InterfaceError)) or (
                    isinstance(e.__cause__, sa_exc.DBAPIError) and e.__cause__.connection_invalidated
                )
                if not transient or attempt == WRITE_RETRIES:
                    raise
                log.warning("%s; retrying in %.1fs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ searches

    def _create(self, model, record_cls, **values):
        """A new row, running since now; a duplicate id is a StoreError (nothing written)."""
        def fn(s: Session):
            row = model(status=Status.RUNNING, created_at=utcnow(), **values)
            s.add(row)
            s.flush()
            return _record(record_cls, row)

        return self._write(fn)

    def create_search(self, search_id: str, name: str, config: dict, *, mlflow_run_id: str | None = None,
                      **runtime) -> SearchRecord:
        """A new search: ``config`` its options, ``runtime`` how it runs (driver, storage_path, …)."""
        return self._create(Search, SearchRecord, id=search_id, name=name, config=config, mlflow_run_id=mlflow_run_id,
                            **runtime)

    def update_search(self, search_id: str, **values) -> None:
        self._update(Search, SearchRecord, search_id, values)

    def _update(self, model, record_cls, row_id: str, values: dict) -> None:
        allowed = {f.name for f in fields(record_cls)} - {"id", "created_at"}
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"unknown {model.__tablename__} fields: {sorted(bad)}")
        self._write(lambda s: s.execute(sa.update(model).where(model.id == row_id).values(**values)))

    def _one(self, model, record_cls, *where):
        """The first row of ``model`` matching ``where``, as a ``record_cls``; None if none."""
        with self.session() as s:
            row = s.scalars(sa.select(model).where(*where)).first()
            return _record(record_cls, row) if row else None

    def _newest(self, model, record_cls, limit: int, *where) -> list:
        with self.session() as s:
            rows = s.scalars(sa.select(model).where(*where).order_by(model.created_at.desc()).limit(limit)).all()
            return [_record(record_cls, r) for r in rows]

    def get_search(self, search_id: str) -> SearchRecord | None:
        return self._one(Search, SearchRecord, Search.id == search_id)

    def find_search_by_mlflow_run(self, run_id: str) -> SearchRecord | None:
        return self._one(Search, SearchRecord, Search.mlflow_run_id == run_id)

    def list_searches(self, limit: int = 100) -> list[SearchRecord]:
        return self._newest(Search, SearchRecord, limit)

    # ------------------------------------------------------------------ trials

    def upsert_trial(self, search_id: str, trial_id: str, **values) -> None:
        """Insert the trial or update it in place: one row per (search, trial) however often
        a result is written (retries, resumes)."""
        self._upsert(Trial, TrialRecord, {"search_id": search_id, "trial_id": trial_id},
                     {"status": Status.RUNNING, "epochs_done": 0, "history": [], "off_surface": False,
                      "phase": "search"}, values)

    def _upsert(self, model, record_cls, key: dict, defaults: dict, values: dict) -> None:
        """One row per ``key``: insert ``defaults | values`` or update ``values`` in place."""
        allowed = {f.name for f in fields(record_cls)} - set(key)
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"unknown {model.__tablename__} fields: {sorted(bad)}")
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:  # pragma: no cover - other dialects: read-then-write in one transaction
            insert = None
        row = {**defaults, **values, **key}

        def fn(s: Session):
            if insert is None:
                existing = s.scalars(sa.select(model).filter_by(**key)).first()
                if existing is None:
                    s.add(model(**row))
                else:
                    for k, v in values.items():
                        setattr(existing, k, v)
                return
            stmt = insert(model).values(**row)
            if values:
                stmt = stmt.on_conflict_do_update(index_elements=list(key), set_=values)
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
            s.execute(stmt)

        self._write(fn)

    def delete_trial(self, search_id: str, trial_id: str) -> None:
        """Drop a row that holds nothing: a trial its driver started as it was killed, which the
        resumed search never knew (see Sink.reconcile)."""
        self._write(lambda s: s.execute(
            sa.delete(Trial).where(Trial.search_id == search_id, Trial.trial_id == trial_id)))

    def trials(self, search_id: str) -> list[TrialRecord]:
        with self.session() as s:
            rows = s.scalars(sa.select(Trial).where(Trial.search_id == search_id).order_by(Trial.id)).all()
            return [_record(TrialRecord, r) for r in rows]

    def get_trial(self, trial_id: str) -> TrialRecord | None:
        """A trial by its Tune trial id or its MLflow run id."""
        return self._one(Trial, TrialRecord, sa.or_(Trial.trial_id == trial_id, Trial.mlflow_run_id == trial_id))

    # ------------------------------------------------------------------ scales

    def create_scale(self, scale_id: str, *, search_id: str, trial_id: str, config: dict, plan: list,
                     mlflow_run_id: str | None = None, driver: str | None = None, kind: str = "scale") -> ScaleRecord:
        return self._create(Scale, ScaleRecord, id=scale_id, search_id=search_id, trial_id=trial_id, config=config,
                            plan=plan, mlflow_run_id=mlflow_run_id, driver=driver, kind=kind)

    def update_scale(self, scale_id: str, **values) -> None:
        self._update(Scale, ScaleRecord, scale_id, values)

    def get_scale(self, scale_id: str) -> ScaleRecord | None:
        return self._one(Scale, ScaleRecord, Scale.id == scale_id)

    def find_scale_by_mlflow_run(self, run_id: str) -> ScaleRecord | None:
        return self._one(Scale, ScaleRecord, Scale.mlflow_run_id == run_id)

    def list_scales(self, limit: int = 100, *, search_id: str | None = None) -> list[ScaleRecord]:
        return self._newest(Scale, ScaleRecord, limit, *([Scale.search_id == search_id] if search_id else []))

    def upsert_scale_run(self, scale_id: str, model: str, **values) -> None:
        """One row per (scale, model), however often it is written (re-runs, resumes)."""
        self._upsert(ScaleRun, ScaleRunRecord, {"scale_id": scale_id, "model": model},
                     {"status": Status.PENDING, "epochs_done": 0, "history": []}, values)

    def scale_runs(self, scale_id: str) -> list[ScaleRunRecord]:
        with self.session() as s:
            rows = s.scalars(sa.select(ScaleRun).where(ScaleRun.scale_id == scale_id).order_by(ScaleRun.phi)).all()
            return [_record(ScaleRunRecord, r) for r in rows]


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets readers (orch runs list) and a writer (a running search) work at once, and two
    # searches share one file; busy_timeout turns lock contention into waiting, not errors.
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _one_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return text[0] if text else type(e).__name__
