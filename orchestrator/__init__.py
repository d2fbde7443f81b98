"""orch: distributed experiment orchestrator for compound model scaling."""

__version__ = "0.1.0"
