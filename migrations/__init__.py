"""Alembic migrations of the results store, shipped inside the wheel.

``orchestrator.store.store.alembic_config`` finds this folder relative to the package (never
the working directory) and sets the database URL at run time.
"""
