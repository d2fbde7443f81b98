"""The SQL results store (SQLAlchemy + Alembic). Nothing outside this package imports sqlalchemy."""

from orchestrator.store.store import (  # noqa: F401
    ResultsStore,
    ScaleRecord,
    ScaleRunRecord,
    SchemaOutOfDate,
    SearchRecord,
    StoreError,
    TrialRecord,
    head_revision,
    mask_url,
)
