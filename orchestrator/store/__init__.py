"""The SQL results store (SQLAlchemy + Alembic). Nothing outside this package imports sqlalchemy."""

from orchestrator.store.store import (  # noqa: F401
    ResultsStore,
    SchemaOutOfDate,
    SearchRecord,
    StoreError,
    TrialRecord,
    head_revision,
    mask_url,
)
