"""`orch search` end to end: the φ=1 search as Ray Tune experiments (``orchestrator.raytune``),
Optuna proposing and ASHA stopping weak trials, then the confirmation of the top networks with
fresh seeds. ``run_search`` opens the search's record (new or resumed), turns the search space
into Tune's trials, fits, and closes the record with the winner (``orchestrator.winner``); the
trials themselves are recorded by ``orchestrator.sink`` as Tune reports them.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from orchestrator import baselines, datasource, faultpoint, raytune, scaling, space
from orchestrator.errors import InputError, SearchFailed
from orchestrator.raytune import state as tunestate
from orchestrator.recorder import now
from orchestrator.sink import Sink, tune_trials
from orchestrator.space import FLOPS_TOLERANCE
from orchestrator.status import Status
from orchestrator.winner import confirm_candidates, confirm_seeds, explain_failure, summarise, trials_csv
from workers import defaults

#: ASHA halves the field at each rung: with a handful of trials and epochs, 4 (Ray's default)
#: would stop almost everything at the grace period.
ASHA_REDUCTION = 2


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
    network: str = "efficientnet-b0"  # the baseline scaled (orchestrator.baselines)
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
    compile: str = defaults.COMPILE  # how trials run, not what they train
    work_s: float | None = None  # benchmarks only: each trial waits this long instead of training

    def as_config(self) -> dict:
        d = asdict(self)
        d["synthetic_size"] = list(self.synthetic_size) if self.synthetic_size else None
        return d

    @property
    def training(self) -> defaults.Training:
        """What each trial trains on and how."""
        return defaults.Training(self.dataset, self.epochs, self.batch_size, self.lr, self.seed, self.data_seed,
                                 self.synthetic_size, self.compile)


@dataclass
class SearchOutcome:
    search_id: str
    mlflow_run_id: str
    status: str
    n_trials: int
    best: dict | None
    summary: dict


class SearchInputError(InputError):
    """A search cannot be resumed as asked; the message says why and what to do."""


def options_of(record) -> SearchOptions:
    """The options a stored search ran with, read strictly: a key this orch does not know (a
    newer orch's option, a hand-edited row) is an error that names it, not silently dropped."""
    unknown = sorted(set(record.config) - set(SearchOptions.__dataclass_fields__))
    if unknown:
        raise SearchInputError(f"search {record.id} was stored with options this orch does not know "
                               f"({', '.join(unknown)}); resume it with the orch that started it")
    kw = {"name": record.name} | dict(record.config)  # options added since an older orch: their defaults
    # ... except where the default changed what a search does: one stored before --compile ran
    # eager, and one stored before proxy trials were packed took the GPUs per trial it recorded.
    kw.setdefault("compile", "off")
    if kw.get("gpus_per_trial") is None and (record.gpus_per_trial or 0) > 0 and "compile" not in record.config:
        kw["gpus_per_trial"] = record.gpus_per_trial
    if kw.get("synthetic_size"):
        kw["synthetic_size"] = tuple(kw["synthetic_size"])
    return SearchOptions(**kw)


@dataclass(frozen=True)
class Resume:
    """How a stored search continues (``check_resumable``)."""

    record: object  # SearchRecord
    storage: str  # where its checkpoints and Tune state lie (a folder or a URI)
    path: str  # its Tune experiment: <storage>/<search id>
    restorable: bool  # Tune saved state there (if not, and nothing trained yet, it starts afresh)


def check_resumable(store, search_id: str, *, storage: str | None, home: Path) -> Resume:
    """How the stored search ``search_id`` continues; or SearchInputError that says why not.

    The folder is ``<storage>/<search id>``: ``storage`` is --storage/ORCH_STORAGE when given,
    else the one the search ran with. Tune restores pickled state from it (code runs on load), so
    it must lie inside the state folder or the storage the user named, links followed."""
    from orchestrator.home import confined, driver_alive

    rec = store.get_search(search_id)
    if rec is None:
        raise SearchInputError(f"no search {search_id!r} in {store.masked_url}; `orch runs list` shows the searches")
    if rec.status == Status.FINISHED:
        raise SearchInputError(f"search {search_id} already finished; `orch runs show {search_id}` shows it")
    if rec.status == Status.RUNNING and driver_alive(rec.driver):
        raise SearchInputError(f"search {search_id} is being run by process {rec.driver}; "
                               f"wait for it, or stop it first")
    ran_at = rec.storage_path
    root = storage or ran_at or str(home / "ray")
    path = _join(root, search_id)
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
    if copied is None and not raytune.can_restore(path):
        if any(t.epochs_done for t in store.trials(search_id)):
            raise SearchInputError(f"no Tune state for search {search_id} at {path}; pass the --storage it ran with")
        # Its driver died before Tune saved anything and no trial reported: start it afresh,
        # under the same id and options.
        return Resume(rec, root, path, False)
    return Resume(rec, root, path, True)


def run_search(opts: SearchOptions, *, store, tracker, cluster, storage_path: str | Path,
               on_change: Callable[[dict], None] | None = None, search_id: str | None = None,
               resume=None) -> SearchOutcome:
    """Run one search end to end; the store and MLflow hold everything when it returns.

    ``resume``: a :class:`Resume` from :func:`check_resumable`: continue
    that search (its Tune experiment, Optuna study, checkpoints, rows and MLflow runs) instead of
    a new one; not restorable: run it afresh under its id, dropping its empty rows."""
    import optuna
    import ray

    from orchestrator import cluster as cluster_mod
    from orchestrator.trainable import NetworkRegistry, registry_name, trial_fn
    from workers.flops import measure

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tunestate.quiet_upload_errors()
    gpt, cpt, concurrency = cluster_mod.plan_resources(
        cluster, gpus=opts.gpus, gpus_per_trial=opts.gpus_per_trial, cpus_per_trial=opts.cpus_per_trial,
        base_resolution=opts.base_resolution)

    b0 = measure(baselines.spec(opts.network, 1.0, 1.0, opts.base_resolution, num_classes=opts.num_classes,
                                dropout=0.0))
    grid = None
    if opts.space == "grid":  # before anything is recorded: an empty grid is the user's to fix
        grid = space.grid_candidates(opts.grid_step, opts.tolerance, base_resolution=opts.base_resolution,
                                     num_classes=opts.num_classes, paper_first=opts.paper_point,
                                     flops_tolerance=opts.flops_tolerance, network=opts.network)
        if len(grid[0]) <= int(opts.paper_point):
            raise SearchInputError(
                f"the grid has no point whose measured FLOPs are within ±{opts.flops_tolerance:.0%} of 2x B0 "
                f"({grid[1]} points within --tolerance {opts.tolerance:g} of the formula, {grid[2]} infeasible); "
                f"use a finer --grid-step, a larger --tolerance or --flops-tolerance")
    search_id = resume.record.id if resume is not None else (search_id or new_search_id())
    restore, experiment_path = (resume.restorable, resume.path) if resume is not None else (False, None)
    sink = Sink(store, tracker, search_id, opts, b0.macs, adopt=resume is not None, on_change=on_change)
    parent, phase, confirm, prior = _open_record(store, sink.rec, opts, search_id, resume, storage_path=storage_path,
                                                 concurrency=concurrency, gpus_per_trial=gpt)

    registry = NetworkRegistry.options(name=registry_name(search_id), **cluster_mod.on_driver_node()).remote()
    # Networks earlier drivers of this search trained: a resumed duplicate replays, not retrains.
    ray.get(registry.seed.remote([(t.network_key, t.trial_id, t.history) for t in prior
                                  if Status(t.status).trained and not t.reused_from and t.history]))
    sink.registry = registry
    sink.preload(prior)
    if resume is not None:
        faultpoint.reached("resumed")
    if resume is not None and not restore:
        sink.reconcile([])  # Tune knows no trial: the rows its dead driver began are dropped
    raytune.listen(search_id, sink)
    settings = {
        "search_id": search_id, "base_resolution": opts.base_resolution, "num_classes": opts.num_classes,
        "network": opts.network, "dedupe": not opts.work_s, "work_s": opts.work_s,
        "train": opts.training.config() | {"dataset": datasource.for_workers(opts.dataset)},  # an image folder: prepared
    }

    param_space, search_alg, num_samples, grid_counts = _proposals(opts, search_id, grid, concurrency)
    if grid_counts:
        store.update_search(search_id, grid=grid_counts)
    scheduler = raytune.asha(max_epochs=opts.epochs, grace_epochs=opts.grace_epochs, reduction_factor=ASHA_REDUCTION)
    t0 = time.monotonic()

    def experiment(name: str, restore_from: str | None, **tune_config):
        """Build one Tune experiment of this search, or restore it (``restore_from``)."""
        return raytune.experiment(trial_fn, settings, {"cpu": cpt, "gpu": gpt}, search_id=search_id, name=name,
                                  storage_path=str(storage_path), restore_from=restore_from,
                                  concurrency=concurrency, max_failures=opts.max_failures, **tune_config)

    confirm_path = _join(str(storage_path), f"{search_id}-confirm")
    phase_at_start = phase
    interrupted, error = False, None
    if phase == "search":
        interrupted, error = raytune.fit(lambda: experiment(
            search_id, experiment_path if restore else None, param_space=param_space, search_alg=search_alg,
            scheduler=scheduler, num_samples=num_samples))
    if not (interrupted or error) and opts.confirm_top > 0 and opts.confirm_seeds > 0:
        # The top networks again, at the full budget with fresh seeds: the winner is the best mean.
        sink.sync()
        picked = confirm or confirm_candidates(store.trials(search_id), opts)
        if picked:
            if phase != "confirm":
                phase, confirm = "confirm", picked
                store.update_search(search_id, phase=phase, confirm=confirm)
            seeds = confirm_seeds(opts)
            again = resume is not None and raytune.can_restore(confirm_path)
            interrupted, error = raytune.fit(lambda: experiment(
                f"{search_id}-confirm", confirm_path if again else None, param_space={
                    "point": raytune.grid([{k: c[k] for k in ("alpha", "beta", "gamma")} for c in picked]),
                    "seed": raytune.grid(seeds), "phase": "confirm"}))
    wall = time.monotonic() - t0
    try:
        if resume is not None and not error and (restore or phase_at_start == "confirm"):
            try:  # Tune's record of every trial of both experiments, against the rows
                known = tune_trials(experiment_path)
                if phase == "confirm" and raytune.can_restore(confirm_path):
                    known += tune_trials(confirm_path)
                sink.reconcile(known)
            except Exception as e:  # noqa: BLE001 - the rows keep what the sink saw; say why
                error = f"reading Tune's record of {experiment_path} failed: {e}"
        sink.close(interrupted=interrupted)
    finally:
        raytune.listen(search_id, None)
        try:
            ray.kill(registry)
        except Exception:
            pass

    trials = store.trials(search_id)
    best, summary = summarise(trials, confirm=confirm if phase == "confirm" else None, interrupted=interrupted,
                              flops_tolerance=opts.flops_tolerance)
    summary |= {"wall_s": round(wall, 3), "concurrency": concurrency, "b0_gmacs": b0.gmacs,
                # A resumed search's trials trained under earlier drivers too: this driver's wall
                # says nothing about their efficiency.
                "efficiency": (round(summary["train_s"] / (concurrency * wall), 4)
                               if wall > 0 and resume is None else None)}
    status = Status.FAILED if error else Status.INTERRUPTED if interrupted else (Status.FINISHED if best else Status.FAILED)
    if status == Status.FAILED:
        error = explain_failure(error, trials, storage_path)
    # The parent run's end first, the row's final status last (as a scale's): a driver killed in
    # between leaves a search that reads running with a dead driver, which `--resume` completes,
    # never one that reads finished while its MLflow run stays RUNNING.
    _log_outcome(tracker, sink.rec, status, trials, best, summary, wall)
    faultpoint.reached("search-ended")
    store.update_search(search_id, status=status, finished_at=now(), summary=summary,
                        best_trial_id=best.trial_id if best else None, error=error)
    if error and not interrupted:
        raise SearchFailed(search_id, error)
    return SearchOutcome(search_id, parent, status, len(trials), summary.get("best"), summary)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else str(Path(root) / name)


def _open_record(store, rec, opts: SearchOptions, search_id: str, resume: Resume | None, *, storage_path,
                 concurrency: int, gpus_per_trial: float) -> tuple[str, str, list | None, list]:
    """The search's row and parent run, new or continued: (parent run id, phase, confirmation
    candidates, the trials earlier drivers recorded)."""
    from orchestrator.home import driver_token

    identity = {"orch.kind": "search", "orch.search_id": search_id}
    params = opts.as_config() | {"concurrency": concurrency, "gpus_per_trial": gpus_per_trial}
    if resume is not None:
        record = resume.record
        # its run, or the one its driver made and died before recording
        parent = rec.open_parent(opts.name, run_id=record.mlflow_run_id, adopt=identity, params=params, tags=identity)
        store.update_search(search_id, status=Status.RUNNING, finished_at=None, error=None, mlflow_run_id=parent,
                            driver=driver_token(), resumes=record.resumes + 1)
        return parent, record.phase, record.confirm, store.trials(search_id)
    # The row first, then the run: a driver killed in between leaves a search that `--resume`
    # finds (and which adopts the run), never an MLflow run that nothing knows.
    store.create_search(search_id, opts.name, opts.as_config(), driver=driver_token(), storage_path=str(storage_path),
                        concurrency=concurrency, gpus_per_trial=gpus_per_trial)
    parent = rec.open_parent(opts.name, run_id=None, params=params, tags=identity)
    store.update_search(search_id, mlflow_run_id=parent)
    return parent, "search", None, []


def _proposals(opts: SearchOptions, search_id: str, grid, concurrency: int):
    """How the search space becomes Tune's trials: (param_space, search_alg, num_samples, grid
    counts). The grid: every distinct network once; surface and band: Optuna's TPE under the
    measured-FLOPs constraint, the paper's point first."""
    if opts.space == "grid":
        cands, n_points, n_infeasible = grid
        if opts.trials:
            cands = cands[:opts.trials]
        param_space = {"point": raytune.grid([{"alpha": c.alpha, "beta": c.beta, "gamma": c.gamma} for c in cands])}
        return param_space, None, 1, {"points": n_points, "networks": len(cands), "infeasible": n_infeasible}
    import optuna

    fn = space.DefineByRun(opts.space, opts.tolerance, base_resolution=opts.base_resolution,
                           num_classes=opts.num_classes, flops_tolerance=opts.flops_tolerance, network=opts.network)
    storage = optuna.storages.InMemoryStorage()
    study_name = f"orch-{search_id}"
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
    if opts.paper_point:
        study.enqueue_trial(fn.paper_params(), user_attrs={space.PAPER_ATTR: True})
    search_alg = raytune.optuna_searcher(fn, seed=opts.seed, constraints_func=space.flops_constraint,
                                         storage=storage, study_name=study_name, concurrency=concurrency)
    return None, search_alg, opts.trials or 16, None


def _log_outcome(tracker, rec, status, trials, best, summary: dict, wall: float) -> None:
    """The parent run's end: the winner, trials.csv, the confirmation, the timings, its status."""
    parent = rec.parent
    if best is not None:
        tracker.log(parent, [("best_val_top1", best.val_top1, 0), ("best_flops_ratio", best.flops_ratio, 0)],
                    params={"best_alpha": best.alpha, "best_beta": best.beta, "best_gamma": best.gamma,
                            "best_trial_id": best.trial_id})
    tracker.log_text(parent, trials_csv(trials), "trials.csv")
    confirmed = summary.get("confirmation")
    if confirmed:
        top = confirmed["candidates"][0]
        tracker.log(parent, [(k, v, 0) for k, v in (("confirm_best_mean", top["mean"]), ("confirm_best_std", top["std"]),
                                                    ("confirm_margin", confirmed["margin"]),
                                                    ("confirm_noise", confirmed["noise"])) if v is not None],
                    tags={"orch.confirmation": confirmed["verdict"]})
        tracker.log_text(parent, json.dumps(confirmed, indent=2), "confirmation.json")
    rec.end_parent(status, [("wall_s", wall, 0), ("train_s", summary["train_s"], 0), ("n_trials", len(trials), 0)]
                   + ([("efficiency", summary["efficiency"], 0)] if summary["efficiency"] is not None else []))
