"""A search's trials as Tune reports them, recorded: a driver-side sink receives Tune's trial
events (``orchestrator.raytune``) and writes them to the results store and MLflow
(``orchestrator.recorder``) from one background thread, in batches, off the training path.
After a resumed fit it reconciles the rows with Tune's own record of the trials.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from orchestrator import faultpoint, raytune, space
from orchestrator.recorder import Recorder, Unit, now
from orchestrator.status import Status

#: How often the sink flushes queued results (seconds); results are also flushed at trial end.
SINK_FLUSH_S = 1.0


@dataclass
class TrialState(Unit):
    """A trial as the driver follows it (``id``: Tune's trial id)."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    key: str = ""  # the network's key (scaling.network_key)
    resolution: int = 0
    params: int = 0
    gmacs: float = 0.0
    flops_ratio: float = 0.0
    reused_from: str | None = None
    activations_m: float | None = None
    off_surface: bool = False
    phase: str = "search"
    seed: int | None = None

    @property
    def trial_id(self) -> str:
        return self.id

    @property
    def replay(self) -> bool:
        return self.reused_from is not None


def kept(result: dict) -> dict:
    """What of a trial's report the record keeps."""
    keep = {k: result[k] for k in ("epoch", "val_top1", "val_loss", "train_loss", "epoch_s", "train_s",
                                  "images_per_s", "gmacs", "params_m", "reused_from", "node_id",
                                  "peak_mem_mb", "compile_s", "compiled", "diverged", "earlier") if k in result}
    if result.get("worker_pid") is not None:  # Tune's own "pid" is the reporting process's
        keep["pid"] = result["worker_pid"]
    return keep


class Sink:
    """Receives Tune events on the driver and writes them from one background thread."""

    def __init__(self, store, tracker, search_id: str, opts: SearchOptions, b0_macs: int, *, adopt: bool,
                 on_change: Callable[[dict], None] | None = None):
        self.store, self.tracker, self.search_id = store, tracker, search_id
        self.opts, self.b0_macs, self.on_change = opts, b0_macs, on_change
        self.registry = None  # the search's NetworkRegistry actor, once there is one
        self.trials: dict[str, TrialState] = {}
        self.rec = Recorder(store, tracker, kind="trial", scope={"orch.search_id": search_id},
                            unit_tag="orch.trial_id", write_row=self._write, adopt=adopt)
        self._preloaded: set[str] = set()  # trials an earlier driver recorded (preload)
        self._q: queue.Queue = queue.Queue()
        self._costs: dict[str, object] = {}
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="orch-sink", daemon=True)
        self._thread.start()

    def preload(self, records) -> None:
        """A resumed search: the trials its earlier drivers recorded, so a trial that starts again
        continues its own row and MLflow run, and its recorded epochs are kept."""
        for r in records:
            self.trials[r.trial_id] = TrialState(
                r.trial_id, status=Status(r.status), history={int(h["epoch"]): h for h in r.history},
                run_id=r.mlflow_run_id, error=r.error, started_at=r.started_at, ended_at=r.ended_at,
                alpha=r.alpha, beta=r.beta, gamma=r.gamma, key=r.network_key, resolution=r.resolution,
                params=r.params, gmacs=r.gmacs, flops_ratio=r.flops_ratio, reused_from=r.reused_from,
                activations_m=r.activations_m, off_surface=r.off_surface, phase=r.phase, seed=r.seed)
            self._preloaded.add(r.trial_id)

    # -- called from Tune's callback (driver thread): cheap, never blocks on I/O
    def started(self, trial_id: str, config: dict) -> None:
        self._q.put(("start", trial_id, dict(config), now()))

    def result(self, trial_id: str, result: dict) -> None:
        self._q.put(("result", trial_id, kept(result), now()))
        if result.get("epoch") == self.opts.epochs:
            faultpoint.reached("trial-last-report")

    def ended(self, trial_id: str, failed: bool, error: str | None = None) -> None:
        self._q.put(("end", trial_id, (failed, error), now()))

    def reconcile(self, tune_trials: list[dict]) -> None:
        """After a resumed fit: Tune's own record of every trial (id, status, error). Ends trials
        Tune ended while no driver listened, and settles rows Tune never saved (started in the
        last moments of a killed driver: Tune and Optuna proposed afresh in their place)."""
        self._q.put(("reconcile", None, tune_trials, now()))

    def sync(self, timeout: float = 120.0) -> None:
        """Wait until every event queued so far is in the store and MLflow."""
        done = threading.Event()
        self._q.put(("sync", None, done, now()))
        done.wait(timeout)

    def close(self, interrupted: bool = False) -> None:
        self._q.put(("close", None, interrupted, now()))
        self._thread.join()
        if self._errors:
            raise self._errors[0]

    # -- background thread
    def _loop(self) -> None:
        closing = False
        while not closing:
            events = [self._q.get()]
            deadline = time.monotonic() + SINK_FLUSH_S
            while events[-1][0] not in ("end", "close", "sync") and time.monotonic() < deadline:
                try:
                    events.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                closing = self._apply(events)
            except BaseException as e:  # keep draining; report at close
                self._errors.append(e)
                closing = any(ev[0] == "close" for ev in events)
            finally:
                for kind, _, payload, _ in events:
                    if kind == "sync":
                        payload.set()

    def _cost(self, cand):
        from workers.flops import measure

        if cand.key not in self._costs:
            self._costs[cand.key] = measure(cand.spec)
        return self._costs[cand.key]

    def _apply(self, events: list) -> bool:
        dirty: dict[str, list] = {}
        ended: list[str] = []
        settle: list[str] = []
        closing = False
        for kind, tid, payload, at in events:
            if kind == "start":
                new = tid not in self.trials
                st = self.trials[tid] if not new else self._new_trial(tid, payload)
                self._start(st, at)
                dirty.setdefault(tid, [])
                if new and float(payload.get("flops_violation") or 0) > 0:
                    st.status, st.ended_at = Status.INFEASIBLE, at  # never trained: ends here
                    st.error = (f"no width brings it within ±{self.opts.flops_tolerance:.0%} of 2x B0's FLOPs at "
                                f"depth α={st.alpha:.3f} and {st.resolution} px (counted {st.flops_ratio:.2f}x); "
                                f"not trained")
                    ended.append(tid)
            elif kind == "result":
                st = self.trials[tid]
                if st.status == Status.INFEASIBLE or not ({"epoch", "diverged", "earlier"} & set(payload)):
                    continue  # not an epoch report (Tune's final result of a trial that reported nothing)
                if payload.get("diverged"):  # ends the trial: failed with the reason, no metrics kept
                    st.error = payload["diverged"]
                    dirty.setdefault(tid, [])
                    continue
                self._merge(st, payload.pop("earlier", None) or (), dirty)  # a resumed trial's checkpointed epochs
                epoch = int(payload.get("epoch", st.epochs_done + 1))
                if payload.get("reused_from"):
                    st.reused_from = payload.pop("reused_from")
                st.history[epoch] = payload
                dirty.setdefault(tid, []).append(payload)
            elif kind == "end":
                failed, error = payload
                st = self.trials[tid]
                if st.status == Status.INFEASIBLE:  # ended when it started
                    continue
                if failed:
                    st.status, st.error = Status.FAILED, error
                elif st.error:  # it diverged
                    st.status = Status.FAILED
                else:
                    st.status = Status.FINISHED if st.epochs_done >= self.opts.epochs else Status.STOPPED
                st.ended_at = at
                dirty.setdefault(tid, [])
                ended.append(tid)
            elif kind == "reconcile":
                ended += self._reconcile(payload, dirty, at)
            elif kind == "sync":
                pass  # set once this batch is written (_loop)
            elif kind == "close":
                closing = True
                if self.rec.adopt:
                    settle = self._settle_dead_driver_runs()
                # never leave a run RUNNING: interrupted (Ctrl-C) or failed
                for st in self.rec.close(self.trials.values(), interrupted=payload, at=at, end=False):
                    dirty.setdefault(st.trial_id, [])
                    ended.append(st.trial_id)
        settle = [tid for tid in settle if tid not in ended]
        for tid, new in dirty.items():  # epochs to the run, then the row
            st = self.trials[tid]
            # a resumed trial: a dead driver may have logged these epochs and died before writing the row
            self.rec.epochs(st, new, maybe_logged=self.rec.adopt and tid in self._preloaded)
            self._write(st)
        for tid in ended:  # rows written above: their runs end
            st = self.trials[tid]
            faultpoint.reached("trial-ended")
            if st.phase == "confirm":
                faultpoint.reached("confirm-trial-ended")
            self.rec.end(st, tags=self._end_tags(st), write=False)
            if self.registry is not None and not st.reused_from:
                self.registry.finish.remote(st.key, tid, st.epochs() if Status(st.status).trained else None)
        for tid in settle:  # its end is recorded; its dead driver never ended its run
            st = self.trials[tid]
            self.rec.settle(st, self._end_tags(st))
        if self.on_change and (dirty or ended):
            self.on_change({"trials": list(self.trials.values())})
        return closing

    def _new_trial(self, tid: str, config: dict) -> TrialState:
        """A trial Tune started for the first time: its candidate, measured (once per network)."""
        from orchestrator.trainable import coefficients

        a, b, g = coefficients(config)
        cand = space.candidate(a, b, g, base_resolution=self.opts.base_resolution, num_classes=self.opts.num_classes,
                               network=self.opts.network)
        cost = self._cost(cand)
        st = TrialState(tid, alpha=a, beta=b, gamma=g, key=cand.key, resolution=cand.resolution, params=cost.params,
                        gmacs=cost.gmacs, flops_ratio=cost.macs / self.b0_macs, activations_m=cost.activations / 1e6,
                        off_surface=cand.off_surface, phase=config.get("phase", "search"),
                        seed=config.get("seed", self.opts.seed))
        self.trials[tid] = st
        return st

    def _start(self, st: TrialState, at) -> None:
        """Its run starts (a new trial), or continues (a retried or resumed one: same row, same run)."""
        tags = {"orch.phase": st.phase}
        if st.off_surface:
            tags["orch.off_surface"] = "the paper's point, as published: not held to the FLOPs constraint"
        self.rec.start(
            st, name=st.trial_id, at=at, tags=tags,
            params={"alpha": st.alpha, "beta": st.beta, "gamma": st.gamma, "phi": 1, "depth_mult": st.alpha,
                    "width_mult": st.beta, "resolution": st.resolution, "network_key": st.key,
                    "dataset": self.opts.dataset, "epochs": self.opts.epochs, "seed": st.seed,
                    "search_id": self.search_id, "phase": st.phase, "compile": self.opts.compile},
            metrics=[("gmacs", st.gmacs, 0), ("params_m", st.params / 1e6, 0), ("flops_ratio", st.flops_ratio, 0),
                     ("activations_m", st.activations_m, 0)])

    @staticmethod
    def _end_tags(st: TrialState) -> dict:
        return {"orch.reused_from": st.reused_from} if st.reused_from else {}

    @staticmethod
    def _merge(st: TrialState, reports, dirty: dict) -> None:
        """Epochs a trial reported that its record lacks (reported while no driver listened)."""
        for h in reports:
            if int(h["epoch"]) not in st.history:
                st.history[int(h["epoch"])] = h
                dirty.setdefault(st.trial_id, []).append(h)

    def _settle_dead_driver_runs(self) -> list[str]:
        """A resumed search, at its end: the runs a dead driver left RUNNING. One whose trial's
        end is recorded (the driver died between writing the row and ending the run) is ended
        as recorded (returned, for ``Tracker.settle``); one that no row and no trial took up
        was started as its driver was killed and is marked discarded."""
        open_runs = self.rec.open_runs()
        known = {st.run_id for st in self.trials.values()} | {self.rec.parent}
        for run_id in open_runs - known:
            self.rec.discard(run_id)
        return [st.trial_id for st in self.trials.values() if st.run_id in open_runs and st.status != Status.RUNNING]

    def _reconcile(self, tune_trials: list[dict], dirty: dict, at) -> list[str]:
        ended = []
        known = {t["trial_id"] for t in tune_trials}
        for t in tune_trials:
            st = self.trials.get(t["trial_id"])
            if st is None:  # created by Tune but never started
                continue
            if st.status in (Status.RUNNING, Status.INTERRUPTED) and t["status"] in ("TERMINATED", "ERROR"):
                # Tune ended it while no driver listened: what it reported meanwhile comes from
                # Tune's record (its last result and checkpoint), as a live driver would have seen it.
                reported = t["reported"]()
                if reported.get("reused_from") and reported["reused_from"] in self.trials:
                    st.reused_from = reported["reused_from"]
                    owner = self.trials[st.reused_from]
                    self._merge(st, [dict(owner.history[e]) for e in sorted(owner.history)], dirty)
                else:
                    self._merge(st, reported["history"], dirty)
                if t["status"] == "ERROR":
                    st.status, st.error = Status.FAILED, t.get("error") or "the trial failed"
                else:
                    st.status = Status.FINISHED if st.epochs_done >= self.opts.epochs else Status.STOPPED
                st.ended_at = at
                dirty.setdefault(st.trial_id, [])
                ended.append(st.trial_id)
        for tid, st in list(self.trials.items()):
            # A replay copies another trial's reports: one Tune never saved (it can start and end
            # between two of Tune's saves) is no trial of the study and holds nothing of its own.
            replay = st.reused_from is not None and st.reused_from in self.trials
            if tid in known or (st.status not in (Status.RUNNING, Status.INTERRUPTED) and not replay):
                continue
            if st.history and not replay:  # it trained: keep what it reported
                st.status, st.ended_at = Status.INTERRUPTED, at
                st.error = "lost with a killed driver before Tune saved it; the resumed search proposed afresh"
                dirty.setdefault(tid, [])
                ended.append(tid)
            else:  # nothing of its own: not a trial of this search's study
                self.rec.discard(st.run_id)
                self.store.delete_trial(self.search_id, tid)
                del self.trials[tid]
                dirty.pop(tid, None)
        return ended

    def _write(self, st: TrialState) -> None:
        self.store.upsert_trial(
            self.search_id, st.trial_id, **st.figures(), alpha=st.alpha, beta=st.beta, gamma=st.gamma,
            network_key=st.key, resolution=st.resolution, params=st.params, gmacs=st.gmacs,
            flops_ratio=st.flops_ratio, reused_from=st.reused_from, activations_m=st.activations_m,
            off_surface=st.off_surface, phase=st.phase, seed=st.seed)


def tune_trials(experiment_path: str) -> list[dict]:
    """Tune's saved record of every trial of an experiment (id, status, error) with, on demand,
    what each reported (``reported()``, see :func:`_reported`)."""
    out = []
    for t in raytune.trial_statuses(experiment_path):
        saved = t.pop("saved")
        out.append(t | {"reported": (lambda saved=saved: _reported(saved()))})
    return out


def _reported(saved: dict) -> dict:
    """What an ended trial reported, as Tune saved it (``saved``: its last result and its latest
    checkpoint's epochs): its epochs (the checkpoint's history, completed by the last result,
    which also names the process it ran in) and, for a replay, the trial it replayed."""
    last = {k: v for k, v in kept(saved["last"]).items() if k not in ("earlier", "diverged")}
    if last.get("reused_from"):
        return {"history": [], "reused_from": last["reused_from"]}
    epochs = {int(h["epoch"]): dict(h) for h in saved["history"]}
    if "epoch" in last:
        epochs[int(last["epoch"])] = epochs.get(int(last["epoch"]), {}) | last
    return {"history": [epochs[e] for e in sorted(epochs)], "reused_from": None}
