"""The φ=1 search as a Ray Tune experiment: OptunaSearch proposes, ASHA stops weak trials early,
and a driver-side sink writes every trial to the results store and MLflow in batches, off the
training path. Picks the winner at the end.
"""

from __future__ import annotations

import csv
import io
import json
import math
import queue
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator import faultpoint, scaling, space, tunestate
from orchestrator.space import FLOPS_TOLERANCE
from orchestrator.tracking import EPOCH_METRICS, same_value
from workers import defaults

#: ASHA halves the field at each rung: with a handful of trials and epochs, 4 (Ray's default)
#: would stop almost everything at the grace period.
ASHA_REDUCTION = 2
#: How often the sink flushes queued results (seconds); results are also flushed at trial end.
SINK_FLUSH_S = 1.0
#: The sink of each search this driver runs, by search id (see SinkCallback).
_SINKS: dict[str, "Sink"] = {}


def new_search_id() -> str:
    return f"search-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"


@dataclass
class SearchOptions:
    name: str
    space: str = "surface"
    trials: int | None = None  # None: 16 for surface/band, every distinct network for grid
    epochs: int = defaults.EPOCHS
    grace_epochs: int = 1
    seed: int = 0
    tolerance: float = 0.1
    flops_tolerance: float = FLOPS_TOLERANCE
    grid_step: float = 0.05
    paper_point: bool = True
    dataset: str = "synthetic"
    base_resolution: int = defaults.SYNTHETIC_BASE_RESOLUTION
    num_classes: int = 10
    batch_size: int = defaults.BATCH_SIZE
    lr: float = defaults.LR
    gpus: float | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float = 1.0
    max_failures: int = 2
    experiment: str = "compound-scaling"
    synthetic_size: tuple[int, int] | None = None
    data_seed: int | None = None  # the synthetic task's data (None: seed)
    confirm_top: int = 3  # distinct networks trained again after the search (0: no confirmation)
    confirm_seeds: int = 2  # fresh seeds each
    work_s: float | None = None  # benchmarks only: each trial waits this long instead of training
    extra: dict = field(default_factory=dict)

    def as_config(self) -> dict:
        d = asdict(self)
        d["synthetic_size"] = list(self.synthetic_size) if self.synthetic_size else None
        return d


@dataclass
class TrialState:
    trial_id: str
    alpha: float
    beta: float
    gamma: float
    key: str
    resolution: int
    params: int
    gmacs: float
    flops_ratio: float
    run_id: str | None = None
    status: str = "running"
    history: dict = field(default_factory=dict)  # epoch -> metrics
    reused_from: str | None = None
    error: str | None = None
    started_at: object = None
    ended_at: object = None
    activations_m: float | None = None
    off_surface: bool = False
    phase: str = "search"
    seed: int | None = None

    @property
    def epochs_done(self) -> int:
        return max(self.history, default=0)

    def last(self, key: str):
        return self.history[self.epochs_done].get(key) if self.history else None


@dataclass
class SearchOutcome:
    search_id: str
    mlflow_run_id: str
    status: str
    n_trials: int
    best: dict | None
    summary: dict


def kept(result: dict) -> dict:
    """What of a trial's report the record keeps."""
    keep = {k: result[k] for k in ("epoch", "val_top1", "val_loss", "train_loss", "epoch_s", "train_s",
                                  "images_per_s", "gmacs", "params_m", "reused_from", "node_id",
                                  "peak_mem_mb", "diverged", "earlier") if k in result}
    if result.get("worker_pid") is not None:  # Tune's own "pid" is the reporting process's
        keep["pid"] = result["worker_pid"]
    return keep


class Sink:
    """Receives Tune events on the driver and writes them from one background thread."""

    def __init__(self, store, tracker, search_id: str, parent_run: str, opts: SearchOptions, b0_macs: int,
                 registry, on_change: Callable[[dict], None] | None = None):
        self.store, self.tracker, self.search_id, self.parent_run = store, tracker, search_id, parent_run
        self.opts, self.b0_macs, self.registry, self.on_change = opts, b0_macs, registry, on_change
        self.trials: dict[str, TrialState] = {}
        self.adopt = False  # a resumed search: a trial's run may exist with no row yet (see Tracker.start_run)
        self._preloaded: set[str] = set()  # trials an earlier driver recorded (preload)
        self._logged: dict[str, dict[int, float]] = {}  # their val_top1 per epoch in MLflow, read once
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
                r.trial_id, r.alpha, r.beta, r.gamma, r.network_key, r.resolution, r.params, r.gmacs, r.flops_ratio,
                run_id=r.mlflow_run_id, status=r.status, history={int(h["epoch"]): h for h in r.history},
                reused_from=r.reused_from, error=r.error, started_at=r.started_at, ended_at=r.ended_at,
                activations_m=r.activations_m, off_surface=r.off_surface, phase=r.phase, seed=r.seed)
            self._preloaded.add(r.trial_id)

    # -- called from Tune's callback (driver thread): cheap, never blocks on I/O
    def started(self, trial_id: str, config: dict) -> None:
        self._q.put(("start", trial_id, dict(config), _now()))

    def result(self, trial_id: str, result: dict) -> None:
        self._q.put(("result", trial_id, kept(result), _now()))
        if result.get("epoch") == self.opts.epochs:
            faultpoint.reached("trial-last-report")

    def ended(self, trial_id: str, failed: bool, error: str | None = None) -> None:
        self._q.put(("end", trial_id, (failed, error), _now()))

    def reconcile(self, tune_trials: list[dict]) -> None:
        """After a resumed fit: Tune's own record of every trial (id, status, error). Ends trials
        Tune ended while no driver listened, and settles rows Tune never saved (started in the
        last moments of a killed driver: Tune and Optuna proposed afresh in their place)."""
        self._q.put(("reconcile", None, tune_trials, _now()))

    def sync(self, timeout: float = 120.0) -> None:
        """Wait until every event queued so far is in the store and MLflow."""
        done = threading.Event()
        self._q.put(("sync", None, done, _now()))
        done.wait(timeout)

    def close(self, interrupted: bool = False) -> None:
        self._q.put(("close", None, interrupted, _now()))
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
                if tid in self.trials:  # a retried or resumed trial starts again: same row, same run
                    st = self.trials[tid]
                    if st.status != "running" or st.ended_at is not None:
                        self.tracker.reopen(st.run_id)
                    st.status, st.error, st.ended_at = "running", None, None
                    dirty.setdefault(tid, [])
                    continue
                from orchestrator.trainable import coefficients

                a, b, g = coefficients(payload)
                cand = space.candidate(a, b, g, base_resolution=self.opts.base_resolution,
                                       num_classes=self.opts.num_classes)
                cost = self._cost(cand)
                st = TrialState(tid, a, b, g, cand.key, cand.resolution, cost.params, cost.gmacs,
                                cost.macs / self.b0_macs, started_at=at, activations_m=cost.activations / 1e6,
                                off_surface=cand.off_surface, phase=payload.get("phase", "search"),
                                seed=payload.get("seed", self.opts.seed))
                tags = {"orch.kind": "trial", "orch.search_id": self.search_id, "orch.trial_id": tid,
                        "orch.phase": st.phase}
                if cand.off_surface:
                    tags["orch.off_surface"] = "the paper's point, as published: not held to the FLOPs constraint"
                st.run_id = self.tracker.start_run(
                    tid, parent_id=self.parent_run,
                    adopt={"orch.search_id": self.search_id, "orch.trial_id": tid} if self.adopt else None,
                    params={"alpha": a, "beta": b, "gamma": g, "phi": 1, "depth_mult": a, "width_mult": b,
                            "resolution": cand.resolution, "network_key": cand.key, "dataset": self.opts.dataset,
                            "epochs": self.opts.epochs, "seed": st.seed, "search_id": self.search_id,
                            "phase": st.phase},
                    tags=tags,
                )
                self.tracker.log(st.run_id, [("gmacs", st.gmacs, 0), ("params_m", st.params / 1e6, 0),
                                             ("flops_ratio", st.flops_ratio, 0),
                                             ("activations_m", st.activations_m, 0)])
                self.trials[tid] = st
                dirty.setdefault(tid, [])
                if float(payload.get("flops_violation") or 0) > 0:  # never trained: ends here
                    st.status, st.ended_at = "infeasible", at
                    st.error = (f"no width brings it within ±{self.opts.flops_tolerance:.0%} of 2x B0's FLOPs at depth "
                                f"α={a:.3f} and {cand.resolution} px (counted {st.flops_ratio:.2f}x); not trained")
                    ended.append(tid)
            elif kind == "result":
                st = self.trials[tid]
                if st.status == "infeasible" or not ({"epoch", "diverged", "earlier"} & set(payload)):
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
                if st.status == "infeasible":  # ended when it started
                    continue
                if failed:
                    st.status, st.error = "failed", error
                elif st.error:  # it diverged
                    st.status = "failed"
                else:
                    st.status = "finished" if st.epochs_done >= self.opts.epochs else "stopped"
                st.ended_at = at
                dirty.setdefault(tid, [])
                ended.append(tid)
            elif kind == "reconcile":
                ended += self._reconcile(payload, dirty, at)
            elif kind == "sync":
                pass  # set once this batch is written (_loop)
            elif kind == "close":
                closing = True
                if self.adopt:
                    settle = self._settle_dead_driver_runs()
                for st in self.trials.values():
                    if st.status == "running":  # interrupted: never leave a run RUNNING
                        st.status, st.ended_at = ("interrupted" if payload else "failed"), at
                        st.error = st.error or "the search stopped before this trial ended"
                        dirty.setdefault(st.trial_id, [])
                        ended.append(st.trial_id)
        settle = [tid for tid in settle if tid not in ended]
        for tid, new in dirty.items():
            st = self.trials[tid]
            if new and tid in self._preloaded and self.adopt:
                # A dead driver may have logged these epochs and died before writing the row.
                if tid not in self._logged:
                    self._logged[tid] = self.tracker.metric_steps(st.run_id, "val_top1")
                have = self._logged[tid]
                new = [m for m in new if not same_value(have.get(int(m.get("epoch", 0))), m.get("val_top1"))]
            metrics = [(k, m[k], int(m.get("epoch", 0))) for m in new for k in EPOCH_METRICS if k in m]
            if metrics:
                self.tracker.log(st.run_id, metrics)
            self.store.upsert_trial(self.search_id, tid, **self._row(st))
        for tid in ended:
            st = self.trials[tid]
            faultpoint.reached("trial-ended")
            if st.phase == "confirm":
                faultpoint.reached("confirm-trial-ended")
            self.tracker.log(st.run_id, self._summary(st), tags=self._end_tags(st))
            self.tracker.end(st.run_id, st.status)
            if self.registry is not None and not st.reused_from:
                history = [st.history[e] for e in sorted(st.history)] if st.status in ("finished", "stopped") else None
                self.registry.finish.remote(st.key, tid, history)
        for tid in settle:  # its end is recorded; its dead driver never ended its run
            st = self.trials[tid]
            self.tracker.settle(st.run_id, st.status, [st.history[e] for e in sorted(st.history)], EPOCH_METRICS,
                                self._summary(st), self._end_tags(st))
        if self.on_change and (dirty or ended):
            self.on_change({"trials": list(self.trials.values())})
        return closing

    @staticmethod
    def _summary(st: TrialState) -> list:
        return [("val_top1_final", st.last("val_top1"), st.epochs_done)] if st.history else []

    @staticmethod
    def _end_tags(st: TrialState) -> dict:
        tags = {"orch.status": st.status}
        if st.reused_from:
            tags["orch.reused_from"] = st.reused_from
        if st.error:
            tags["orch.error"] = st.error[:5000]
        return tags

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
        open_runs = set(self.tracker.find_runs({"orch.search_id": self.search_id, "orch.kind": "trial"},
                                               running_only=True))
        known = {st.run_id for st in self.trials.values()} | {self.parent_run}
        for run_id in open_runs - known:
            self.tracker.log(run_id, [], tags={"orch.status": "discarded", "orch.error":
                                               "started as its driver was killed; never saved"})
            self.tracker.end(run_id, "interrupted")
        return [st.trial_id for st in self.trials.values() if st.run_id in open_runs and st.status != "running"]

    def _reconcile(self, tune_trials: list[dict], dirty: dict, at) -> list[str]:
        ended = []
        known = {t["trial_id"] for t in tune_trials}
        for t in tune_trials:
            st = self.trials.get(t["trial_id"])
            if st is None:  # created by Tune but never started
                continue
            if st.status in ("running", "interrupted") and t["status"] in ("TERMINATED", "ERROR"):
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
                    st.status, st.error = "failed", t.get("error") or "the trial failed"
                else:
                    st.status = "finished" if st.epochs_done >= self.opts.epochs else "stopped"
                st.ended_at = at
                dirty.setdefault(st.trial_id, [])
                ended.append(st.trial_id)
        for tid, st in list(self.trials.items()):
            # A replay copies another trial's reports: one Tune never saved (it can start and end
            # between two of Tune's saves) is no trial of the study and holds nothing of its own.
            replay = st.reused_from is not None and st.reused_from in self.trials
            if tid in known or (st.status not in ("running", "interrupted") and not replay):
                continue
            if st.history and not replay:  # it trained: keep what it reported
                st.status, st.ended_at = "interrupted", at
                st.error = "lost with a killed driver before Tune saved it; the resumed search proposed afresh"
                dirty.setdefault(tid, [])
                ended.append(tid)
            else:  # nothing of its own: not a trial of this search's study
                self.tracker.log(st.run_id, [], tags={"orch.status": "discarded",
                                                      "orch.error": "started as its driver was killed; never saved"})
                self.tracker.end(st.run_id, "interrupted")
                self.store.delete_trial(self.search_id, tid)
                del self.trials[tid]
                dirty.pop(tid, None)
        return ended

    def _row(self, st: TrialState) -> dict:
        hist = [st.history[e] for e in sorted(st.history)]
        tops = [h["val_top1"] for h in hist if "val_top1" in h]
        mems = [h["peak_mem_mb"] for h in hist if h.get("peak_mem_mb") is not None]
        ips = [h["images_per_s"] for h in hist if h.get("images_per_s") is not None and not st.reused_from]
        return {
            "alpha": st.alpha, "beta": st.beta, "gamma": st.gamma, "network_key": st.key,
            "resolution": st.resolution, "params": st.params, "gmacs": st.gmacs, "flops_ratio": st.flops_ratio,
            "status": st.status, "epochs_done": st.epochs_done, "val_top1": tops[-1] if tops else None,
            "best_val_top1": max(tops) if tops else None, "train_loss": st.last("train_loss"),
            "train_s": 0.0 if st.reused_from else sum(h.get("train_s", 0.0) for h in hist),
            "history": hist, "reused_from": st.reused_from, "mlflow_run_id": st.run_id, "error": st.error,
            "started_at": st.started_at, "ended_at": st.ended_at, "activations_m": st.activations_m,
            "peak_mem_mb": max(mems) if mems else None,
            "images_per_s": sum(ips) / len(ips) if ips else None, "off_surface": st.off_surface,
            "phase": st.phase, "seed": st.seed,
        }


def explain_failure(error: str | None, trials, storage_path) -> str:
    """The one line a failed search ends with: the cause users can act on, when the trials' own
    errors name it (a full disk surfaces in Tune as whatever it broke next)."""
    failed = [t for t in trials if t.status == "failed" and t.error]
    texts = [error or ""] + [t.error for t in failed]
    if any("No space left on device" in x or "Errno 28" in x for x in texts):
        return (f"the disk is full (No space left on device) writing checkpoints under {storage_path}; "
                f"free space there or pass --storage with room")
    if error:
        return error
    if failed and len(failed) == len(trials):
        return f"no trial finished (trial {failed[0].trial_id}: {failed[0].error.splitlines()[0][:300]})"
    return "no trial finished"


def confirm_seeds(opts: SearchOptions) -> list[int]:
    """Fresh seeds for the confirmation runs: none of them is the search's own."""
    return [opts.seed + 1000 * (i + 1) for i in range(opts.confirm_seeds)]


def confirm_candidates(trials, opts: SearchOptions) -> list[dict]:
    """The top ``confirm_top`` distinct networks of the search phase, from the pool the winner
    rule draws on (trials that ran every epoch, within the FLOPs tolerance), best first."""
    done = [t for t in trials if t.phase == "search" and t.status in ("finished", "stopped")
            and t.val_top1 is not None and not t.reused_from]
    full = [t for t in done if t.status == "finished"] or done
    ok = [t for t in full if abs(t.flops_ratio - scaling.TARGET_FLOPS_FACTOR) <= opts.flops_tolerance * 2] or full
    best: dict[str, object] = {}
    for t in sorted(ok, key=lambda t: (-t.val_top1, t.flops_ratio, t.trial_id)):
        best.setdefault(t.network_key, t)
    return [{"trial_id": t.trial_id, "network_key": t.network_key, "alpha": t.alpha, "beta": t.beta,
             "gamma": t.gamma, "search_val_top1": t.val_top1} for t in list(best.values())[:opts.confirm_top]]


def confirmation(trials, picked: list[dict]) -> dict:
    """Each confirmed network's final val top-1 over its fresh seeds (mean, sample std), best
    mean first, and whether the best is ahead of the second by more than the noise: the margin
    against twice the standard error of the difference of the two means (about 95%)."""
    import statistics

    rows = []
    for c in picked:
        runs = sorted((t for t in trials if t.phase == "confirm" and t.network_key == c["network_key"]
                       and t.status == "finished" and t.val_top1 is not None), key=lambda t: t.seed or 0)
        values = [t.val_top1 for t in runs]
        rows.append(c | {"seeds": [t.seed for t in runs], "values": values,
                         "mean": statistics.fmean(values) if values else None,
                         "std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)})
    rows.sort(key=lambda r: (r["mean"] is None, -(r["mean"] or 0.0), -r["search_val_top1"]))
    done = [r for r in rows if r["mean"] is not None]
    out = {"candidates": rows, "winner": done[0]["trial_id"] if done else None, "margin": None, "noise": None,
           "ahead": None}
    if len(done) >= 2:
        a, b = done[0], done[1]
        out["margin"] = a["mean"] - b["mean"]
        if len(a["values"]) > 1 and len(b["values"]) > 1:
            out["noise"] = 2 * math.sqrt(a["std"] ** 2 / len(a["values"]) + b["std"] ** 2 / len(b["values"]))
            out["ahead"] = out["margin"] > out["noise"]
    if out["ahead"] is None:
        out["verdict"] = "no noise estimate (fewer than 2 seeds or 2 networks)"
    else:
        out["verdict"] = (f"ahead of the second by {out['margin']:.4f}, more than the noise ({out['noise']:.4f})"
                          if out["ahead"] else
                          f"ahead of the second by {out['margin']:.4f}, within the noise ({out['noise']:.4f}): "
                          f"a tie at this budget")
    return out


def pick_winner(trials, *, target: float = scaling.TARGET_FLOPS_FACTOR, flops_tolerance: float = FLOPS_TOLERANCE):
    """The best val top-1 among trials that ran every epoch and whose *measured* FLOPs ratio to
    B0 is within ``flops_tolerance`` (relative) of the target; stopped trials only if none
    finished. Returns (trial, within_tolerance) or (None, False)."""
    done = [t for t in trials if t.status in ("finished", "stopped") and t.val_top1 is not None
            and getattr(t, "phase", "search") == "search"]
    if not done:
        return None, False
    full = [t for t in done if t.status == "finished"] or done
    ok = [t for t in full if abs(t.flops_ratio - target) <= flops_tolerance * target]
    pool = ok or full
    best = max(pool, key=lambda t: (t.val_top1, -t.flops_ratio))
    return best, bool(ok)


def trials_csv(trials) -> str:
    cols = ["trial_id", "phase", "seed", "alpha", "beta", "gamma", "resolution", "network_key", "params", "gmacs",
            "flops_ratio", "activations_m", "images_per_s", "peak_mem_mb", "off_surface", "status", "epochs_done",
            "val_top1", "best_val_top1", "train_loss", "train_s", "reused_from", "error"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for t in trials:
        w.writerow([getattr(t, c) for c in cols])
    return buf.getvalue()


class SearchInputError(Exception):
    """A search cannot be resumed as asked; the message says why and what to do."""


def options_of(record) -> SearchOptions:
    """The options a stored search ran with."""
    names = {f for f in SearchOptions.__dataclass_fields__}
    kw = {k: v for k, v in record.config.items() if k in names}
    if kw.get("synthetic_size"):
        kw["synthetic_size"] = tuple(kw["synthetic_size"])
    return SearchOptions(**kw)


def check_resumable(store, search_id: str, *, storage: str | None, home: Path) -> tuple[object, str, bool]:
    """The stored search, the Tune experiment folder to restore it from, and whether Tune saved
    state there (if not, and nothing was trained yet, the search starts afresh); or SearchInputError.

    The folder is ``<storage>/<search id>``: ``storage`` is --storage/ORCH_STORAGE when given,
    else the one the search ran with. Tune restores pickled state from it (code runs on load), so
    it must lie inside the state folder or the storage the user named, links followed."""
    from ray.tune import Tuner

    from orchestrator.home import confined, driver_alive

    rec = store.get_search(search_id)
    if rec is None:
        raise SearchInputError(f"no search {search_id!r} in {store.masked_url}; `orch runs list` shows the searches")
    if rec.status == "finished":
        raise SearchInputError(f"search {search_id} already finished; `orch runs show {search_id}` shows it")
    if rec.status == "running" and driver_alive(rec.config.get("driver")):
        raise SearchInputError(f"search {search_id} is being run by process {rec.config['driver']}; "
                               f"wait for it, or stop it first")
    ran_at = rec.config.get("storage_path")
    root = storage or ran_at or str(home / "ray")
    path = root.rstrip("/") + "/" + search_id if "://" in root else str(Path(root) / search_id)
    if not confined(path, [str(home), storage]):
        raise SearchInputError(
            f"search {search_id}'s Tune state is at {path}, outside the state folder {home}; Tune loads "
            f"pickled state from it, so pass --storage {root} if you trust that folder")
    copy = tunestate.snapshot_path(path)
    if not confined(copy, [str(home), storage]):  # a link out of it: the folder was confined
        raise SearchInputError(
            f"search {search_id}'s saved Tune state {copy} links outside {root}; Tune loads pickled "
            f"state from it, so replace the link with the file if you trust it")
    try:
        copied = tunestate.read(path)
    except Exception as e:  # noqa: BLE001 - not orch's own writing: altered or damaged since
        raise SearchInputError(f"orch's copy of search {search_id}'s Tune state, {copy}, is unreadable ({e}); "
                               f"remove it to resume from Tune's own files") from None
    if copied is None and not Tuner.can_restore(path):
        if any(t.epochs_done for t in store.trials(search_id)):
            raise SearchInputError(f"no Tune state for search {search_id} at {path}; pass the --storage it ran with")
        # Its driver died before Tune saved anything and no trial reported: start it afresh,
        # under the same id and options.
        return rec, path, False
    return rec, path, True


def run_search(opts: SearchOptions, *, store, tracker, cluster, storage_path: str | Path,
               on_change: Callable[[dict], None] | None = None, search_id: str | None = None,
               resume=None) -> SearchOutcome:
    """Run one search end to end; the store and MLflow hold everything when it returns.

    ``resume``: ``(record, experiment path, restorable)`` from :func:`check_resumable`: continue
    that search (its Tune experiment, Optuna study, checkpoints, rows and MLflow runs) instead of
    a new one; not restorable: run it afresh under its id, dropping its empty rows."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator import cluster as cluster_mod
    from orchestrator.trainable import NetworkRegistry, registry_name, trial_fn
    from workers.flops import measure

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tunestate.quiet_upload_errors()
    gpt, cpt, concurrency = cluster_mod.plan_resources(
        cluster, gpus=opts.gpus, gpus_per_trial=opts.gpus_per_trial, cpus_per_trial=opts.cpus_per_trial)
    from orchestrator.home import driver_token

    b0 = measure(scaling.network_spec(1.0, 1.0, opts.base_resolution, num_classes=opts.num_classes))
    grid = None
    if opts.space == "grid":  # before anything is recorded: an empty grid is the user's to fix
        grid = space.grid_candidates(opts.grid_step, opts.tolerance, base_resolution=opts.base_resolution,
                                     num_classes=opts.num_classes, paper_first=opts.paper_point,
                                     flops_tolerance=opts.flops_tolerance)
        if len(grid[0]) <= int(opts.paper_point):
            raise SearchInputError(
                f"the grid has no point whose measured FLOPs are within ±{opts.flops_tolerance:.0%} of 2x B0 "
                f"({grid[1]} points within --tolerance {opts.tolerance:g} of the formula, {grid[2]} infeasible); "
                f"use a finer --grid-step, a larger --tolerance or --flops-tolerance")
    prior = []
    restore = False
    def parent_run(adopt: bool) -> str:
        return tracker.start_run(
            opts.name, adopt={"orch.kind": "search", "orch.search_id": search_id} if adopt else None,
            params={k: v for k, v in (opts.as_config() | {"concurrency": concurrency, "gpus_per_trial": gpt}).items()
                    if k not in ("extra",) and v is not None},
            tags={"orch.kind": "search", "orch.search_id": search_id},
        )

    if resume is not None:
        record, experiment_path, restore = resume
        search_id, parent = record.id, record.mlflow_run_id
        config = dict(record.config) | {"driver": driver_token(), "resumes": record.config.get("resumes", 0) + 1}
        if parent:
            tracker.reopen(parent)
        else:  # its driver died between recording the search and its MLflow run's id
            parent = parent_run(adopt=True)
        store.update_search(search_id, status="running", finished_at=None, error=None, config=config,
                            mlflow_run_id=parent)
        prior = store.trials(search_id)
    else:
        search_id = search_id or new_search_id()
        config = opts.as_config() | {"concurrency": concurrency, "gpus_per_trial": gpt,
                                     "storage_path": str(storage_path), "driver": driver_token()}
        # The row first, then the run: a driver killed in between leaves a search that
        # `--resume` finds (and which adopts the run), never an MLflow run that nothing knows.
        store.create_search(search_id, opts.name, config)
        parent = parent_run(adopt=False)
        store.update_search(search_id, mlflow_run_id=parent)

    registry = NetworkRegistry.options(name=registry_name(search_id), **cluster_mod.on_driver_node()).remote()
    # Networks earlier drivers of this search trained: a resumed duplicate replays, not retrains.
    ray.get(registry.seed.remote([(t.network_key, t.trial_id, t.history) for t in prior
                                  if t.status in ("finished", "stopped") and not t.reused_from and t.history]))
    sink = Sink(store, tracker, search_id, parent, opts, b0.macs, registry, on_change)
    sink.adopt = resume is not None
    sink.preload(prior)
    if resume is not None:
        faultpoint.reached("resumed")
    if resume is not None and not restore:
        sink.reconcile([])  # Tune knows no trial: the rows its dead driver began are dropped
    _SINKS[search_id] = sink
    settings = {
        "search_id": search_id, "base_resolution": opts.base_resolution, "num_classes": opts.num_classes,
        "dedupe": not opts.work_s, "work_s": opts.work_s,
        "train": {"dataset": opts.dataset, "epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr,
                  "seed": opts.seed, "data_seed": opts.seed if opts.data_seed is None else opts.data_seed,
                  "synthetic_size": opts.synthetic_size},
    }

    if opts.space == "grid":
        cands, n_points, n_infeasible = grid
        if opts.trials:
            cands = cands[:opts.trials]
        param_space = {"point": tune.grid_search([{"alpha": c.alpha, "beta": c.beta, "gamma": c.gamma} for c in cands])}
        search_alg, num_samples = None, 1
        config["grid_points"], config["grid_networks"], config["grid_infeasible"] = n_points, len(cands), n_infeasible
        store.update_search(search_id, config=config)
    else:
        fn = space.DefineByRun(opts.space, opts.tolerance, base_resolution=opts.base_resolution,
                               num_classes=opts.num_classes, flops_tolerance=opts.flops_tolerance)
        storage = optuna.storages.InMemoryStorage()
        study_name = f"orch-{search_id}"
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
        if opts.paper_point:
            study.enqueue_trial(fn.paper_params(), user_attrs={space.PAPER_ATTR: True})
        searcher = OptunaSearch(space=fn, metric="val_top1", mode="max", storage=storage, study_name=study_name,
                                sampler=optuna.samplers.TPESampler(seed=opts.seed,
                                                                   constraints_func=space.flops_constraint))
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=concurrency)
        param_space, num_samples = None, opts.trials or 16

    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_top1", mode="max", max_t=opts.epochs,
                              grace_period=opts.grace_epochs, reduction_factor=ASHA_REDUCTION)

    resources = {"cpu": cpt, "gpu": gpt}
    t0 = time.monotonic()
    trainable = tune.with_resources(tune.with_parameters(trial_fn, settings=settings), resources)

    def experiment(name: str, restore_from: str | None, **tune_config):
        """Build one Tune experiment of this search, or restore it (``restore_from``)."""
        if restore_from:
            # The driver state from orch's copy (Tune's own may be torn by a kill during its
            # upload), then Tune restores the trials, their checkpoints, the searcher (the Optuna
            # study, which continues) and ASHA; errored trials stay failed (retries used up).
            tunestate.put_back(restore_from)
            return tune.Tuner.restore(restore_from, trainable, resume_unfinished=True)
        return tune.Tuner(
            trainable, param_space=tune_config.pop("param_space", None),
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency, **tune_config),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage_path), verbose=0,
                callbacks=[_callback_class()(search_id)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            ),
        )

    phase = config.get("phase", "search")
    confirm_path = _join(str(storage_path), f"{search_id}-confirm")
    interrupted, error = False, None
    if phase == "search":
        interrupted, error = _fit(lambda: experiment(
            search_id, experiment_path if restore else None, param_space=param_space, search_alg=search_alg,
            scheduler=scheduler, num_samples=num_samples))
    if not (interrupted or error) and opts.confirm_top > 0 and opts.confirm_seeds > 0:
        # The top networks again, at the full budget with fresh seeds: the winner is the best mean.
        sink.sync()
        picked = config.get("confirm") or confirm_candidates(store.trials(search_id), opts)
        if picked:
            if phase != "confirm":
                config |= {"phase": "confirm", "confirm": picked}
                store.update_search(search_id, config=config)
            seeds = confirm_seeds(opts)
            again = resume is not None and (tunestate.exists(confirm_path) or tune.Tuner.can_restore(confirm_path))
            interrupted, error = _fit(lambda: experiment(
                f"{search_id}-confirm", confirm_path if again else None, param_space={
                    "point": tune.grid_search([{k: c[k] for k in ("alpha", "beta", "gamma")} for c in picked]),
                    "seed": tune.grid_search(seeds), "phase": "confirm"}))
    wall = time.monotonic() - t0
    try:
        if resume is not None and not error and (restore or phase == "confirm"):
            try:  # Tune's record of every trial of both experiments, against the rows
                known = _tune_trials(experiment_path)
                if config.get("phase") == "confirm" and (tunestate.exists(confirm_path)
                                                        or tune.Tuner.can_restore(confirm_path)):
                    known += _tune_trials(confirm_path)
                sink.reconcile(known)
            except Exception as e:  # noqa: BLE001 - the rows keep what the sink saw; say why
                error = f"reading Tune's record of {experiment_path} failed: {e}"
        sink.close(interrupted=interrupted)
    finally:
        _SINKS.pop(search_id, None)
        try:
            ray.kill(registry)
        except Exception:
            pass

    trials = store.trials(search_id)
    best, within = pick_winner(trials, flops_tolerance=opts.flops_tolerance)
    confirmed = confirmation(trials, config.get("confirm") or []) if config.get("phase") == "confirm" else None
    if confirmed and confirmed["winner"] and not interrupted:
        best = next(t for t in trials if t.trial_id == confirmed["winner"])
    train_s = sum(t.train_s or 0.0 for t in trials)
    summary = {
        "wall_s": round(wall, 3),
        "train_s": round(train_s, 3),
        "concurrency": concurrency,
        # A resumed search's trials trained under earlier drivers too: this driver's wall says
        # nothing about their efficiency.
        "efficiency": round(train_s / (concurrency * wall), 4) if wall > 0 and resume is None else None,
        "n_trials": len(trials),
        "n_networks": len({t.network_key for t in trials}),
        "n_reused": sum(1 for t in trials if t.reused_from),
        "by_status": {s: sum(1 for t in trials if t.status == s) for s in sorted({t.status for t in trials})},
        "winner_within_tolerance": within,
        "b0_gmacs": b0.gmacs,
        "confirmation": confirmed,
    }
    if best is not None:
        summary["best"] = {"trial_id": best.trial_id, "alpha": best.alpha, "beta": best.beta, "gamma": best.gamma,
                           "val_top1": best.val_top1, "flops_ratio": best.flops_ratio,
                           "resolution": best.resolution, "network_key": best.network_key,
                           "activations_m": best.activations_m, "images_per_s": best.images_per_s}
        if confirmed and confirmed["winner"] == best.trial_id:
            top = confirmed["candidates"][0]
            summary["best"] |= {"confirm_mean": top["mean"], "confirm_std": top["std"], "confirm_seeds": top["seeds"]}
    status = "failed" if error else "interrupted" if interrupted else ("finished" if best else "failed")
    if status == "failed":
        error = explain_failure(error, trials, storage_path)
    store.update_search(search_id, status=status, finished_at=_now(), summary=summary,
                        best_trial_id=best.trial_id if best else None, error=error)
    if best is not None:
        tracker.log(parent, [("best_val_top1", best.val_top1, 0), ("best_flops_ratio", best.flops_ratio, 0)],
                    params={"best_alpha": best.alpha, "best_beta": best.beta, "best_gamma": best.gamma,
                            "best_trial_id": best.trial_id})
    tracker.log(parent, [("wall_s", wall, 0), ("train_s", train_s, 0), ("n_trials", len(trials), 0)]
                + ([("efficiency", summary["efficiency"], 0)] if summary["efficiency"] is not None else []),
                tags={"orch.status": status})
    tracker.log_text(parent, trials_csv(trials), "trials.csv")
    if confirmed:
        top = confirmed["candidates"][0]
        tracker.log(parent, [(k, v, 0) for k, v in (("confirm_best_mean", top["mean"]), ("confirm_best_std", top["std"]),
                                                    ("confirm_margin", confirmed["margin"]),
                                                    ("confirm_noise", confirmed["noise"])) if v is not None],
                    tags={"orch.confirmation": confirmed["verdict"]})
        tracker.log_text(parent, json.dumps(confirmed, indent=2), "confirmation.json")
    tracker.end(parent, status)
    if error and not interrupted:
        from orchestrator.errors import SearchFailed

        raise SearchFailed(search_id, error)
    return SearchOutcome(search_id, parent, status, len(trials), summary.get("best"), summary)


def sink_of(search_id: str):
    """The sink of a search this driver runs (module level: pickled callbacks refer to it by name)."""
    return _SINKS.get(search_id)


def _callback_class():
    from ray import tune

    class SinkCallback(tune.Callback):
        """Forwards Tune's trial events to the sink. Tune pickles its experiment state, the
        callbacks included, so this holds only the search id and finds the sink (threads,
        connections) of whichever driver runs the search now: a resumed one too."""

        def __init__(self, search_id: str):
            self.__setstate__({"search_id": search_id})

        def __getstate__(self):
            return {"search_id": self.search_id}

        def __setstate__(self, state):
            from orchestrator.tunestate import Snapshots

            self.search_id = state["search_id"]
            self.snapshots = Snapshots()

        @property
        def sink(self):
            return sink_of(self.search_id)

        def on_step_begin(self, iteration, trials, **info):
            self.snapshots.watch(trials)

        def get_state(self):
            # Tune calls this at the end of each save of its driver state, right after writing
            # the state files: the moment to copy them, consistent (orchestrator/tunestate.py).
            self.snapshots()
            return None  # nothing of its own to restore

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.sink:
                self.sink.started(trial.trial_id, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.sink:
                self.sink.result(trial.trial_id, result)

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            faultpoint.reached("checkpoint")

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.sink:
                self.sink.ended(trial.trial_id, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.sink:
                self.sink.ended(trial.trial_id, failed=True, error=_trial_error(trial))

    return SinkCallback


class _SigintWatch:
    """Tells whether Ctrl-C stopped ``Tuner.fit``. Tune installs its own SIGINT handler (a
    graceful stop that saves the experiment) and, when it fires, puts back the handler it found:
    ours. So if ours is current after fit, Tune's fired; if ours is called, a second Ctrl-C
    came (or Tune installed none) and it raises KeyboardInterrupt as usual."""

    def __init__(self):
        import os
        import threading

        self.fired = False
        self.active = threading.current_thread() is threading.main_thread()
        self.tune_handles = self.active and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))

    def _handler(self, signum, frame):
        self.fired = True
        raise KeyboardInterrupt

    def __enter__(self):
        import signal

        if self.active:
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self.active:
            if self.tune_handles and signal.getsignal(signal.SIGINT) == self._handler:
                self.fired = True
            signal.signal(signal.SIGINT, self._previous)
        return False


def _tune_trials(experiment_path: str) -> list[dict]:
    """Tune's saved record of every trial of an experiment: id, status, error."""
    import logging

    from ray.tune import ExperimentAnalysis

    # Without Tune's file loggers (orch records results itself) it warns once per trial that it
    # found no result files; the trials and their statuses are what this needs.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        analysis = ExperimentAnalysis(experiment_path)
    finally:
        quiet.setLevel(level)
    # Its per-trial results are not read: orch turns Tune's file loggers off, and epochs a dead
    # driver missed come with the resumed trial's first report (trainable.trial_fn).
    return [{"trial_id": trial.trial_id, "status": trial.status,
             "error": _trial_error(trial) if trial.status == "ERROR" else None,
             "reported": (lambda trial=trial: _reported(trial))} for trial in analysis.trials]


def _reported(trial) -> dict:
    """What an ended trial reported, as Tune saved it: its epochs (the latest checkpoint's
    history, completed by the last result, which also names the process it ran in) and, for a
    replay, the trial it replayed."""
    last = {k: v for k, v in kept(trial.last_result or {}).items() if k not in ("earlier", "diverged")}
    if last.get("reused_from"):
        return {"history": [], "reused_from": last["reused_from"]}
    epochs: dict[int, dict] = {}
    checkpoint = trial.checkpoint
    if checkpoint is not None:
        from workers.train import load_checkpoint

        with checkpoint.as_directory() as d:
            epochs = {int(h["epoch"]): dict(h) for h in load_checkpoint(d).get("history", [])}
    if "epoch" in last:
        epochs[int(last["epoch"])] = epochs.get(int(last["epoch"]), {}) | last
    return {"history": [epochs[e] for e in sorted(epochs)], "reused_from": None}


def _fit(build) -> tuple[bool, str | None]:
    """Fit the Tune experiment ``build()`` makes: (interrupted, error line)."""
    try:
        tuner = build()
        with _SigintWatch() as sigint:
            grid = tuner.fit()
        return sigint.fired or _unfinished(grid), None
    except KeyboardInterrupt:
        return True, None
    except Exception as e:  # the search itself failed: recorded, then SearchFailed
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else str(Path(root) / name)


def _unfinished(grid) -> bool:
    try:
        from ray.tune.experiment import Trial

        trials = grid._experiment_analysis.trials  # noqa: SLF001 - Tune exposes no public status list
        return any(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials)
    except Exception:
        return False


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    # The last line of a traceback names the exception and its message.
    return (lines[-1] if lines else "the trial failed")[:2000]


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)
