"""The record of a search or a scale: a parent run with one unit per trial or per model, in the
results store and in MLflow, written the same way for both.

- ``open_parent``/``end_parent``: the parent's MLflow run, new, or the one an earlier driver made
  (reopened; or found by its tags when that driver died before recording its id); it ends
  before the row's final status is written (the caller's last write), so a driver killed in
  between leaves a record that reads unfinished and is completed by the next driver;
- ``start``/``epochs``/``end``: a unit's run starts (or continues: a retried trial, a re-run
  model), its epochs are logged, it ends. The order of the two writes is what a resume relies
  on: a start or an end goes to the store row first, then to the run (a driver killed between
  leaves a row whose run the resume adopts or settles, never a run nothing knows); epochs go to
  the run first, then to the row (what a row holds, MLflow has; epochs MLflow got and the row
  did not are found and not logged twice, see ``epochs``);
- ``settle``/``discard``: after a driver died, a run whose unit's end is recorded is ended as
  recorded; one no unit took up is marked discarded;
- ``close``: every unit still pending or running ends ``interrupted`` (Ctrl-C) or ``failed``,
  so nothing is left RUNNING.

What a unit is (a trial's coefficients, a model's plan row) and when it starts or ends belong to
``search.Sink`` (Tune's events) and ``scale.ScaleRun`` (the jobs it schedules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from orchestrator.status import Status
from orchestrator.tracking import EPOCH_METRICS, same_value


def now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Unit:
    """One trial of a search or one model of a scale, as the driver follows it."""

    id: str  # the trial id, or the model's name
    status: str = Status.PENDING
    history: dict = field(default_factory=dict)  # epoch -> metrics
    run_id: str | None = None
    error: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def replay(self) -> bool:
        """Its epochs are another unit's (a duplicate network): no time or throughput of its own."""
        return False

    @property
    def epochs_done(self) -> int:
        return max(self.history, default=0)

    def last(self, key: str):
        return self.history[self.epochs_done].get(key) if self.history else None

    def epochs(self) -> list[dict]:
        return [self.history[e] for e in sorted(self.history)]

    def figures(self) -> dict:
        """What the store row holds of how the unit ran: status, epochs and the figures drawn
        from them (last and best val top-1, training seconds, mean throughput, peak memory)."""
        hist = self.epochs()
        tops = [h["val_top1"] for h in hist if "val_top1" in h]
        mems = [h["peak_mem_mb"] for h in hist if h.get("peak_mem_mb") is not None]
        ips = [h["images_per_s"] for h in hist if h.get("images_per_s") is not None and not self.replay]
        return {
            "status": str(self.status), "epochs_done": self.epochs_done, "val_top1": tops[-1] if tops else None,
            "best_val_top1": max(tops) if tops else None, "train_loss": self.last("train_loss"),
            "train_s": 0.0 if self.replay else sum(h.get("train_s", 0.0) for h in hist),
            "images_per_s": sum(ips) / len(ips) if ips else None, "peak_mem_mb": max(mems) if mems else None,
            "history": hist, "mlflow_run_id": self.run_id, "error": self.error, "started_at": self.started_at,
            "ended_at": self.ended_at,
        }

    def closing_metrics(self) -> list[tuple[str, float, int]]:
        """The metrics its run ends with, at its last epoch."""
        if not self.history:
            return []
        f, last = self.figures(), self.epochs_done
        return [("val_top1_final", f["val_top1"], last), ("best_val_top1", f["best_val_top1"], last),
                ("train_s", f["train_s"], last), ("images_per_s_mean", f["images_per_s"], last)]

    def end_tags(self, extra: dict | None = None) -> dict:
        tags = {"orch.status": str(self.status)} | (extra or {})
        if self.error:
            tags["orch.error"] = self.error[:5000]
        return tags


class Recorder:
    """The writes of one search's or scale's record (see the module). ``kind`` names its units'
    runs (``trial`` or ``model``), ``scope`` the tags that identify its runs in MLflow, ``write_row``
    writes a unit's store row; ``adopt``: an earlier driver ran this record, so a unit's run may
    exist in MLflow with no row naming it yet."""

    def __init__(self, store, tracker, *, kind: str, scope: dict, unit_tag: str,
                 write_row: Callable[[Unit], None], adopt: bool = False):
        self.store, self.tracker, self.kind, self.scope, self.unit_tag = store, tracker, kind, scope, unit_tag
        self.write_row, self.adopt = write_row, adopt
        self.parent: str | None = None
        self._logged: dict[str, dict[int, float]] = {}

    # -- the parent
    def open_parent(self, name: str, *, run_id: str | None, params: dict, tags: dict,
                    adopt: dict | None = None) -> str:
        """The parent run: ``run_id`` reopened when an earlier driver recorded it; else a new one,
        or the one an earlier driver made with the tags ``adopt`` and died before recording."""
        if run_id:
            self.tracker.reopen(run_id)
            self.parent = run_id
        else:
            self.parent = self.tracker.start_run(name, adopt=adopt, tags=tags,
                                                 params={k: v for k, v in params.items() if v is not None})
        return self.parent

    def end_parent(self, status: str, metrics: list = (), params: dict | None = None, tags: dict | None = None) -> None:
        self.tracker.log(self.parent, list(metrics), params=params, tags={"orch.status": str(status)} | (tags or {}))
        self.tracker.end(self.parent, status)

    # -- units
    def start(self, u: Unit, *, name: str, params: dict, tags: dict, metrics: list = (), at=None) -> None:
        """``u`` runs: its run starts, or continues if it has one (reopened when it had ended)."""
        if u.run_id is None:
            u.run_id = self.tracker.start_run(
                name, parent_id=self.parent, params=params,
                adopt=self.scope | {self.unit_tag: u.id} if self.adopt else None,
                tags={"orch.kind": self.kind} | self.scope | {self.unit_tag: u.id} | tags)
            self.tracker.log(u.run_id, list(metrics))
        elif u.status != Status.RUNNING or u.ended_at is not None:
            self.tracker.reopen(u.run_id)
        u.status, u.error, u.ended_at = Status.RUNNING, None, None
        u.started_at = u.started_at or at or now()

    def epochs(self, u: Unit, new: list[dict], *, maybe_logged: bool = False) -> None:
        """Log ``new`` epochs of ``u`` to its run. ``maybe_logged``: a dead driver may have logged
        them already (and died before writing the row): those MLflow holds are not logged twice."""
        if maybe_logged:
            if u.id not in self._logged:
                self._logged[u.id] = self.tracker.metric_steps(u.run_id, EPOCH_METRICS[0])
            have = self._logged[u.id]
            new = [m for m in new if not same_value(have.get(int(m.get("epoch", 0))), m.get(EPOCH_METRICS[0]))]
        metrics = [(k, m[k], int(m.get("epoch", 0))) for m in new for k in EPOCH_METRICS if k in m]
        if metrics:
            self.tracker.log(u.run_id, metrics)

    def end(self, u: Unit, status: str | None = None, error: str | None = None, *, at=None,
            tags: dict | None = None, write: bool = True) -> None:
        """``u`` ended (``status``/``error`` when given): its row, then its run's closing metrics,
        tags and end status. ``write`` False: the caller wrote the row already."""
        if status is not None:
            u.status = status
        if error is not None:
            u.error = error
        u.ended_at = u.ended_at or at or now()
        if write:
            self.write_row(u)
        if u.run_id:
            self.tracker.log(u.run_id, u.closing_metrics(), tags=u.end_tags(tags))
            self.tracker.end(u.run_id, u.status)

    def settle(self, u: Unit, tags: dict | None = None) -> None:
        """End ``u``'s run as its row says it ended: a dead driver recorded the end and died
        before ending the run. Idempotent."""
        self.tracker.settle(u.run_id, u.status, u.epochs(), EPOCH_METRICS, u.closing_metrics(), u.end_tags(tags))

    def open_runs(self) -> set[str]:
        """This record's unit runs that are RUNNING in MLflow."""
        return set(self.tracker.find_runs(self.scope | {"orch.kind": self.kind}, running_only=True))

    def discard(self, run_id: str) -> None:
        """A run a killed driver started and nothing saved: marked, and ended."""
        self.tracker.log(run_id, [], tags={"orch.status": Status.DISCARDED,
                                           "orch.error": "started as its driver was killed; never saved"})
        self.tracker.end(run_id, Status.INTERRUPTED)

    def close(self, units, *, interrupted: bool, error: str | None = None, at=None, end: bool = True) -> list[Unit]:
        """Every unit still pending or running ends: ``interrupted`` (Ctrl-C) or ``failed``, with
        ``error`` or a line that says the work stopped. Returns them; ``end`` False: they are
        only marked, and the caller ends them (``end``) with its own writes."""
        stopped = [u for u in units if u.status in (Status.PENDING, Status.RUNNING)]
        for u in stopped:
            u.status = Status.INTERRUPTED if interrupted else Status.FAILED
            u.error = u.error or error or (f"the {'search' if self.kind == 'trial' else 'scale'} stopped before "
                                           f"this {self.kind} {'ended' if self.kind == 'trial' else 'finished'}")
            u.ended_at = at or now()
            if end:
                self.end(u)
        return stopped
