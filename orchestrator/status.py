"""Every status a search, a scale, a trial or a model can have, in one place, and the MLflow run
status each ended one maps to. Values are the strings the results store holds (members compare
equal to them and print as them), so stored rows read back unchanged.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    PENDING = "pending"  # a model not started yet
    RUNNING = "running"
    FINISHED = "finished"  # ran every epoch
    STOPPED = "stopped"  # a trial ASHA stopped early (it ran as planned: it lost)
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C, or its driver was killed: resumable
    INFEASIBLE = "infeasible"  # a proposed trial no width brings within the FLOPs constraint: never trained
    DISCARDED = "discarded"  # an MLflow run a killed driver started and nothing saved (a tag, not a row)

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def ended(self) -> bool:
        return self not in (Status.PENDING, Status.RUNNING)

    @property
    def trained(self) -> bool:
        """Ran as planned and has results: finished, or stopped early by ASHA."""
        return self in (Status.FINISHED, Status.STOPPED)


#: An ended unit's status -> its MLflow run status.
MLFLOW_STATUS = {Status.FINISHED: "FINISHED", Status.STOPPED: "KILLED", Status.FAILED: "FAILED",
                 Status.INTERRUPTED: "KILLED", Status.INFEASIBLE: "KILLED", Status.DISCARDED: "KILLED"}
