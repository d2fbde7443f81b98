"""`orch scale`: the family B0..Bk from a stored search, one Ray Train job per model.

The pieces, in order: ``resolve_source`` (which search/trial to scale), ``build_plan`` (the
measured plan plus each model's batch size and learning rate), ``scale_id_for`` (a scale is
identified by what it trains, so running the same command again continues it instead of
starting over), and ``run_scale`` (the jobs, the results store and MLflow).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator import datasource, faultpoint, scaling
from orchestrator.ctrlc import CtrlC
from orchestrator.errors import InputError, OrchError
from orchestrator.recorder import Recorder, Unit, now
from orchestrator.status import Status
from orchestrator.tracking import family_view
from workers import defaults
from orchestrator.home import driver_alive, driver_token

#: The per-model batch rules. ``fit`` (default): every member keeps B0's batch unless its
#: estimated training memory does not fit the GPU; never shrinks on CPU, where memory is not the
#: limit and BatchNorm suffers from small batches (measured: a CPU demo with the old rule trained
#: B1/B2 at batch 8 and they came out below B0). ``sqrt-flops``: the reference runs (B0 bs256,
#: B3 bs128, B5 bs48 on one H100) shrink the batch about as the square root of FLOPs; ``fixed``:
#: B0's batch everywhere. lr follows the global batch linearly (Goyal et al., 2017).
BATCH_RULES = ("fit", "sqrt-flops", "fixed")
#: Device bytes per counted activation element per image in training: B0@224 bs256 peaked at
#: 11.68 GB on an H200 (bf16 autocast, channels_last; benchmarks/train_throughput.py) with 6.75 M
#: activations per image (workers/cost.py): 6.8 bytes, saved intermediates included.
BYTES_PER_ACTIVATION = 6.8
#: Share of the GPU's memory a job plans to fill (allocator slack, cuDNN workspaces, eval).
MEMORY_SHARE = 0.8
#: Assumed GPU memory for jobs on a cluster whose GPUs the driver cannot see (an 80 GB H100).
DEFAULT_GPU_MEMORY_GB = 80.0
#: Never shrink below this per worker (BN statistics get noisy under it).
MIN_BATCH = 8
#: How often the driver collects the jobs' reports (seconds).
POLL_S = 0.5


class ScaleInputError(InputError):
    """The source or the plan cannot be scaled; the message says why and what to do."""


class ScaleFailed(OrchError):
    def __init__(self, scale_id: str, reason: str):
        super().__init__(f"scale {scale_id} failed: {reason}")
        self.scale_id, self.reason = scale_id, reason


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Source:
    """What is scaled: a search's winner, or one trial of it; ``scale`` when the id given was
    an earlier scale (then its options are the defaults)."""

    search: object  # SearchRecord
    trial: object  # TrialRecord
    via: str  # search | trial | scale
    scale: object | None = None  # ScaleRecord
    note: str | None = None


ACCEPTED = ("a search id, a scale id, a trial id, the MLflow run id of any of them, or 'latest' "
            "(see `orch runs list`)")


def resolve_source(store, ref: str) -> Source:
    """Find what ``--from-run`` names. Raises ScaleInputError with the reason otherwise."""
    if ref == "latest":
        for s in store.list_searches(1000):
            if s.status == Status.FINISHED and s.best_trial_id:
                return _from_search(store, s, "search")
        raise ScaleInputError(f"no finished search in {store.masked_url}; run `orch search` first")
    s = store.get_search(ref) or store.find_search_by_mlflow_run(ref)
    if s is not None:
        return _from_search(store, s, "search")
    sc = store.get_scale(ref) or store.find_scale_by_mlflow_run(ref)
    if sc is not None:
        search = store.get_search(sc.search_id)
        trial = next((t for t in store.trials(search.id) if t.trial_id == sc.trial_id), None)
        return Source(search, trial, "scale", scale=sc)
    t = store.get_trial(ref)
    if t is not None:
        search = store.get_search(t.search_id)
        if search.status == Status.RUNNING:
            raise ScaleInputError(f"trial {ref}'s search {search.id} is still running; wait for it to end")
        if not Status(t.status).trained or t.val_top1 is None:
            raise ScaleInputError(f"trial {ref} is {t.status}{': ' + t.error if t.error else ''}; "
                                  f"scale a trial that trained (see `orch runs show {search.id}`)")
        return Source(search, t, "trial")
    raise ScaleInputError(f"no search, scale or trial {ref!r} in {store.masked_url}; --from-run takes {ACCEPTED}")


def _from_search(store, s, via: str) -> Source:
    if s.status == Status.RUNNING:
        raise ScaleInputError(f"search {s.id} is still running; wait for it to finish, then scale it")
    if s.status == Status.FAILED:
        raise ScaleInputError(f"search {s.id} failed ({s.error or 'no reason recorded'}); scale a finished search, "
                              f"or one of its trials by trial id (see `orch runs show {s.id}`)")
    if not s.best_trial_id:
        raise ScaleInputError(f"search {s.id} has no finished trial to scale; run a longer search")
    trial = next((t for t in store.trials(s.id) if t.trial_id == s.best_trial_id), None)
    if trial is None:
        raise ScaleInputError(f"search {s.id} names winner {s.best_trial_id}, which is not in the store")
    note = f"search {s.id} was interrupted; scaling its best finished trial" if s.status == Status.INTERRUPTED else None
    return Source(s, trial, via, note=note)


# --------------------------------------------------------------------------- the plan


#: What a scale's stored config holds beside its options: the coefficients and what they came from
#: (and an ablation's targets and seeds).
SCALE_SOURCE_KEYS = ("alpha", "beta", "gamma", "search_id", "trial_id", "targets", "seeds")
#: Plan-row keys of an ablation's runs, kept in their scale_runs columns and MLflow params.
ARM_KEYS = ("arm", "target", "seed")


@dataclass
class ScaleOptions:
    mode: str = "compound"
    phis: list = field(default_factory=lambda: [float(p) for p in range(1, 8)])
    baseline: bool = True
    epochs: int = defaults.EPOCHS
    dataset: str = "synthetic"
    base_resolution: int = defaults.SYNTHETIC_BASE_RESOLUTION
    num_classes: int = 10
    network: str = "efficientnet-b0"  # the baseline scaled (orchestrator.baselines)
    batch_size: int = defaults.BATCH_SIZE  # B0's per-worker batch; the rule derives the others
    lr: float = defaults.LR  # B0's learning rate at batch_size on one worker
    batch_rule: str = "fit"
    gpu_memory_gb: float | None = None  # what the fit rule plans against; None: CPU jobs
    workers: int = 1  # data-parallel workers per job
    seed: int = 0
    synthetic_size: tuple | None = None
    # how it runs, not what it trains (kept out of the scale id):
    gpus: float | None = None
    gpus_per_job: int | None = None
    workers_per_job: int = 1
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    experiment: str = "compound-scaling"
    compile: str = defaults.COMPILE

    IDENTITY = ("mode", "phis", "baseline", "epochs", "dataset", "base_resolution", "num_classes", "batch_size",
                "lr", "batch_rule", "workers", "seed", "synthetic_size")

    def as_config(self) -> dict:
        d = asdict(self)
        d["synthetic_size"] = list(self.synthetic_size) if self.synthetic_size else None
        return d

    @classmethod
    def inherit(cls, source: Source, *, gpu_memory_gb: float | None, **given) -> "ScaleOptions":
        """The options of a scale of ``source``: each one given (not None) wins; else the earlier
        scale's when ``source`` names a scale, else the search's, else the default. ``seed`` is
        always the search's; the synthetic task's size follows the search's data."""
        from orchestrator.search import options_of

        cfg = options_of(source.search).as_config()  # strict: an option this orch does not know is an error
        prev = (source.scale.config or {}) if source.scale else {}
        unknown = sorted(set(prev) - set(cls.__dataclass_fields__) - set(SCALE_SOURCE_KEYS))
        if unknown:
            raise ScaleInputError(f"scale {source.scale.id} was stored with options this orch does not know "
                                  f"({', '.join(unknown)}); scale its search instead, or use the orch that made it")
        base = cls()

        def pick(name, fallback=None):
            if given.get(name) is not None:
                return given[name]
            return prev.get(name, cfg.get(name, getattr(base, name) if fallback is None else fallback))

        dataset = pick("dataset")
        syn = prev.get("synthetic_size", cfg.get("synthetic_size")) if dataset == cfg.get("dataset", "synthetic") else None
        workers = given.get("gpus_per_job") or given.get("workers_per_job")
        if workers is None:
            workers = int(prev.get("workers", 1)) if source.scale else 1
        from orchestrator.datasource import num_classes as num_classes_of
        from workers.datasets import DatasetError

        try:
            num_classes = num_classes_of(dataset)
        except DatasetError as e:  # the search's data, inherited, is gone or changed since
            raise ScaleInputError(f"the dataset of {source.search.id} cannot be read ({e}); pass --dataset") from None
        return cls(
            mode=given.get("mode") or prev.get("mode", base.mode),
            phis=given["phis"] if given.get("phis") is not None else prev.get("phis", base.phis),
            baseline=given["baseline"] if given.get("baseline") is not None else prev.get("baseline", base.baseline),
            epochs=pick("epochs"), dataset=dataset,
            base_resolution=pick("base_resolution", scaling.default_base_resolution(dataset)),
            num_classes=num_classes, network=pick("network"), batch_size=pick("batch_size"), lr=pick("lr"),
            batch_rule=given.get("batch_rule") or prev.get("batch_rule", base.batch_rule),
            gpu_memory_gb=gpu_memory_gb, workers=workers, seed=int(cfg.get("seed", 0)),
            synthetic_size=tuple(syn) if syn else None, gpus=given.get("gpus"), gpus_per_job=given.get("gpus_per_job"),
            workers_per_job=given.get("workers_per_job") or 1,
            cpus_per_worker=given.get("cpus_per_worker") or base.cpus_per_worker,
            max_failures=given["max_failures"] if given.get("max_failures") is not None else base.max_failures,
            experiment=given.get("experiment") or base.experiment,
            compile=pick("compile"),
        )


def batch_and_lr(flops_ratio: float, *, base_batch: int, base_lr: float, workers: int, rule: str,
                 activations_m: float | None = None, gpu_memory_gb: float | None = None) -> tuple[int, float]:
    """(per-worker batch, learning rate) of a model ``flops_ratio`` times B0's FLOPs.

    ``fit``: the base batch, unless ``activations_m`` (M elements per image) x batch x
    BYTES_PER_ACTIVATION exceeds MEMORY_SHARE of ``gpu_memory_gb``; then the largest multiple of
    8 that fits (at least 8). ``gpu_memory_gb`` None (CPU): never shrinks. ``sqrt-flops``: batch =
    base / sqrt(ratio), down to a multiple of 8, never above the base nor below 8 (or the base,
    if that is smaller); ``fixed``: the base batch for every model. Either way lr = base_lr x
    global batch / base batch (the linear rule), global = batch x workers.
    """
    if rule not in BATCH_RULES:
        raise ValueError(f"unknown batch rule {rule!r}; use one of {', '.join(BATCH_RULES)}")
    batch = base_batch
    if rule == "fit" and gpu_memory_gb and activations_m:
        fits = int(MEMORY_SHARE * gpu_memory_gb * 1e9 / (activations_m * 1e6 * BYTES_PER_ACTIVATION))
        if fits < base_batch:
            batch = max(min(MIN_BATCH, base_batch), fits // 8 * 8 if fits >= 8 else fits)
    if rule == "sqrt-flops" and flops_ratio > 1:
        b = base_batch / math.sqrt(flops_ratio)
        batch = int(b // 8 * 8) if b >= 8 else int(b)
        batch = max(min(MIN_BATCH, base_batch), min(base_batch, batch))
    return batch, base_lr * batch * workers / base_batch


def gpu_memory_for(*, gpus: float | None, given_gb: float | None, address: str | None) -> float | None:
    """What the ``fit`` rule plans against: ``--gpu-memory`` if given; none for CPU jobs
    (``--gpus 0``, or the embedded instance on a machine without CUDA); else this machine's GPU 0,
    or DEFAULT_GPU_MEMORY_GB for a cluster whose GPUs the driver cannot see."""
    if given_gb is not None:
        return given_gb
    if gpus == 0:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    except Exception:  # noqa: BLE001 - no usable CUDA here: decided below
        pass
    return DEFAULT_GPU_MEMORY_GB if address else None


def plan_entries(opts: ScaleOptions, coeffs: scaling.Coefficients) -> list[scaling.PlanEntry]:
    if opts.mode == "official" and opts.network != "efficientnet-b0":
        raise ScaleInputError(f"--mode official is EfficientNet's B0..B7 table; scale {opts.network} with --mode "
                              f"compound", param="--mode")
    if opts.mode == "official":
        bad = [p for p in opts.phis if p != int(p) or p > 7]
        if bad:
            raise ScaleInputError(f"--mode official has B1..B7 only; --phis {bad[0]:g} is not one of 1..7")
        return scaling.official_plan(base_resolution=opts.base_resolution, num_classes=opts.num_classes,
                                     names=[f"B{int(p)}" for p in opts.phis], baseline=opts.baseline)
    return scaling.compound_plan(coeffs, opts.phis, base_resolution=opts.base_resolution,
                                 num_classes=opts.num_classes, baseline=opts.baseline, network=opts.network)


def build_plan(opts: ScaleOptions, coeffs: scaling.Coefficients) -> list[dict]:
    """The measured plan (the rows of `orch plan`), each with its batch size, lr and spec; the
    ``fit`` rule plans against ``opts.gpu_memory_gb`` (None: CPU jobs)."""
    entries = plan_entries(opts, coeffs)
    if not entries:
        raise ScaleInputError("the plan is empty: give --phis or drop --no-baseline")
    return measured_rows(opts, entries)


def measured_rows(opts: ScaleOptions, entries: list[scaling.PlanEntry]) -> list[dict]:
    """``entries`` measured (as `orch plan` shows them), each with its spec and the batch and lr
    ``opts``' rule gives it."""
    from orchestrator.plan import measure_entries

    rows = measure_entries(entries, base_resolution=opts.base_resolution, num_classes=opts.num_classes,
                           network=opts.network)
    for row, entry in zip(rows, entries):
        batch, lr = batch_and_lr(row["flops_ratio"], base_batch=opts.batch_size, base_lr=opts.lr,
                                 workers=opts.workers, rule=opts.batch_rule, activations_m=row["activations_m"],
                                 gpu_memory_gb=opts.gpu_memory_gb)
        row.update(batch_size=batch, lr=round(lr, 6), workers=opts.workers, spec=entry.spec)
    return rows


def scale_id_for(source: Source, coeffs: scaling.Coefficients, opts: ScaleOptions, *, extra: dict | None = None,
                 prefix: str = "scale") -> str:
    """A scale is named by what it trains: the same source, coefficients and plan options give
    the same id, so running the command again continues that scale (``extra``: what else names
    it, an ablation's targets and seeds)."""
    ident = {k: getattr(opts, k) for k in ScaleOptions.IDENTITY}
    if opts.gpu_memory_gb is not None:  # it sets the batches; absent (CPU) it leaves ids as they were
        ident["gpu_memory_gb"] = opts.gpu_memory_gb
    if opts.network != "efficientnet-b0":  # likewise: B0's scales keep the ids they had
        ident["network"] = opts.network
    ident["synthetic_size"] = list(opts.synthetic_size) if opts.synthetic_size else None
    ident |= {"search": source.search.id, "trial": source.trial.trial_id,
              "coefficients": [coeffs.alpha, coeffs.beta, coeffs.gamma]} | (extra or {})
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}-{digest[:12]}"


# --------------------------------------------------------------------------- running it


@dataclass
class ModelState(Unit):
    """A model of the plan as the driver follows it (``id``: its name)."""

    row: dict = field(default_factory=dict)  # the plan row
    wall_s: float | None = None
    earlier: bool = False  # finished by an earlier run of this scale
    model_uri: str | None = None  # its weights as an MLflow model, once it finished
    weights: str | None = None  # which the model holds: "raw" or "ema" (the moving average)

    @property
    def model_top1(self) -> float | None:
        """The val top-1 of the weights its model holds."""
        return self.last("ema_val_top1") if self.weights == "ema" else self.last("val_top1")

    @property
    def name(self) -> str:
        return self.id


@dataclass
class ScaleOutcome:
    scale_id: str
    mlflow_run_id: str
    search_id: str
    trial_id: str
    status: str
    models: list[ModelState]
    summary: dict


class ScaleRun:
    """The driver of one scale: launches jobs as resources allow, collects their reports, and
    records them (``orchestrator.recorder``) from this one thread. ``orchestrator.ablate``'s
    AblationRun is one too (KIND "ablation")."""

    KIND = "scale"

    def __init__(self, scale_id: str, source: Source, coeffs: scaling.Coefficients, opts: ScaleOptions,
                 plan: list[dict], *, store, tracker, on_change: Callable[[list], None] | None = None):
        self.scale_id, self.source, self.coeffs, self.opts, self.plan = scale_id, source, coeffs, opts, plan
        self.store, self.tracker, self.on_change = store, tracker, on_change
        self.models = [ModelState(row["name"], row=row) for row in plan]
        self.rec: Recorder | None = None

    @property
    def parent(self) -> str | None:
        return self.rec.parent if self.rec else None

    # -- setup: the scale's row and parent run, and what earlier runs already trained
    def open(self) -> None:
        existing = self.store.get_scale(self.scale_id)
        if existing is not None and existing.status == Status.RUNNING and driver_alive(existing.driver):
            raise ScaleInputError(f"scale {self.scale_id} is being run by process {existing.driver}; "
                                  f"wait for it, or stop it first", usage=False)
        config = self._config()
        plan_rows = [{k: v for k, v in r.items() if k != "spec"} for r in self.plan]
        self.rec = Recorder(self.store, self.tracker, kind="model", scope={"orch.scale_id": self.scale_id},
                            unit_tag="orch.model", write_row=self._write, adopt=existing is not None)
        if existing is None:
            # The row first, then the run: a driver killed in between leaves a scale that the same
            # command finds again (and which adopts the run), never a run that nothing knows.
            self.store.create_scale(self.scale_id, search_id=self.source.search.id,
                                    trial_id=self.source.trial.trial_id, config=config, plan=plan_rows,
                                    driver=driver_token(), kind=self.KIND)
        identity = {"orch.kind": self.KIND, "orch.scale_id": self.scale_id}
        self.rec.open_parent(
            self.scale_id, run_id=existing.mlflow_run_id if existing else None,
            adopt=identity if existing else None,
            params={k: v for k, v in config.items() if k != "phis"} | {"phis": ",".join(f"{p:g}" for p in self.opts.phis)},
            tags=identity | {"orch.search_id": self.source.search.id, "orch.trial_id": self.source.trial.trial_id,
                             "orch.search_run_id": self.source.search.mlflow_run_id or ""})
        self.store.update_scale(self.scale_id, status=Status.RUNNING, finished_at=None, error=None,
                                driver=driver_token(), plan=plan_rows, mlflow_run_id=self.parent)
        if self.KIND == "scale":
            self.tracker.save_view(*family_view(self.scale_id))  # what `orch ui` opens
        done = {r.model: r for r in self.store.scale_runs(self.scale_id)}
        for m in self.models:
            prev = done.get(m.name)
            if prev is None:
                continue
            m.history = {int(h["epoch"]): h for h in prev.history}
            m.run_id = prev.mlflow_run_id
            m.started_at = prev.started_at
            m.model_uri = prev.model_uri
            if finished_before(prev, self.opts.epochs):
                m.status, m.earlier, m.ended_at = Status.FINISHED, True, prev.ended_at
        if existing is not None:  # a dead driver may have recorded a model's end and died before ending its run
            open_runs = self.rec.open_runs()
            for m in self.models:
                if m.earlier and m.run_id in open_runs:
                    self.rec.settle(m)
        self._changed()

    def _config(self) -> dict:
        """What the store keeps as this scale's config: its options, coefficients and source."""
        return self.opts.as_config() | {"alpha": self.coeffs.alpha, "beta": self.coeffs.beta,
                                        "gamma": self.coeffs.gamma, "search_id": self.source.search.id,
                                        "trial_id": self.source.trial.trial_id}

    @property
    def pending(self) -> list[ModelState]:
        return [m for m in self.models if m.status != Status.FINISHED]

    # -- the jobs
    def run(self, *, cluster, resources, storage_path: str | Path) -> None:
        import ray

        from orchestrator.cluster import on_driver_node
        from orchestrator.trainable import ProgressBoard, fit_job

        board = ProgressBoard.options(**on_driver_node()).remote()
        queue = list(self.pending)
        in_flight: dict = {}  # ObjectRef -> ModelState
        try:
            with CtrlC() as ctrl_c:
                while queue or in_flight:
                    ctrl_c.check()  # a Ctrl-C that a library call swallowed still stops the scale
                    while queue and len(in_flight) < resources.concurrency:
                        m = queue.pop(0)
                        ref = fit_job.options(**on_driver_node()).remote(
                            m.name, self._train_cfg(m), workers=resources.workers, use_gpu=resources.use_gpu,
                            resources_per_worker=resources.per_worker, storage_path=str(storage_path),
                            run_name=f"{self.scale_id}-{m.name}", board=board, max_failures=self.opts.max_failures)
                        in_flight[ref] = m
                        self._start(m)
                    ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
                    self._apply(ray.get(board.drain.remote()))
                    for ref in ready:
                        m = in_flight.pop(ref)
                        self._apply(ray.get(board.drain.remote()))  # every report of the job is on the board
                        self._end(m, ray.get(ref))
        except BaseException:
            for ref, m in in_flight.items():
                ray.cancel(ref, force=True)
            try:
                self._apply(ray.get(board.drain.remote(), timeout=5))
            except Exception:
                pass
            for m in in_flight.values():
                self._stop(m, Status.INTERRUPTED, "the scale stopped before this model finished")
            raise
        finally:
            try:
                ray.kill(board)
            except Exception:
                pass

    def _train_cfg(self, m: ModelState) -> dict:
        o = self.opts
        # A prepared dataset is streamed (fresh random-resized crops each epoch, workers/stream.py);
        # the synthetic task has no encoded shards and reads its tier like a trial.
        return defaults.Training(o.dataset, o.epochs, m.row["batch_size"], m.row["lr"], m.row.get("seed", o.seed), o.seed,
                                 o.synthetic_size, o.compile).config() | {
            "spec": m.row["spec"], "ema_decay": defaults.EMA_DECAY, "dataset": datasource.for_workers(o.dataset),  # once per process
            "stream": o.dataset.startswith(("prepared:", "imagefolder:"))}  # an image folder is prepared first

    def _start(self, m: ModelState) -> None:
        r = m.row
        self.rec.start(
            m, name=m.name, tags={},
            params={"phi": r["phi"], "alpha": self.coeffs.alpha, "beta": self.coeffs.beta,
                    "gamma": self.coeffs.gamma, "depth_mult": r["depth_mult"], "width_mult": r["width_mult"],
                    "resolution": r["resolution"], "batch_size": r["batch_size"], "lr": r["lr"],
                    "workers": r["workers"], "network_key": r["network_key"], "dataset": self.opts.dataset,
                    "epochs": self.opts.epochs, "seed": self.opts.seed, "mode": self.opts.mode,
                    "scale_id": self.scale_id, "search_id": self.source.search.id, "compile": self.opts.compile,
                    "network": self.opts.network} | {k: r[k] for k in ARM_KEYS if k in r},
            metrics=[("gmacs", r["gmacs"], 0), ("params_m", r["params_m"], 0), ("flops_ratio", r["flops_ratio"], 0)])
        self._write(m)
        self._changed()

    def _apply(self, events: list[dict]) -> None:
        touched: dict[str, list] = {}
        for ev in events:
            m = next(x for x in self.models if x.name == ev["model"])
            ranks = ev["metrics"]
            head = dict(ranks[0])
            for k in ("rank", "pid", "samples", "world_size"):
                head.pop(k, None)
            if len(ranks) > 1:
                head["ranks"] = [{"rank": r.get("rank"), "pid": r.get("pid"), "samples": r.get("samples")} for r in ranks]
            epoch = int(head["epoch"])
            if epoch in m.history:  # a resumed job replays its checkpoint's epochs; these are recorded
                continue
            m.history[epoch] = head
            touched.setdefault(m.name, []).append(head)
        for name, new in touched.items():
            m = next(x for x in self.models if x.name == name)
            self.rec.epochs(m, new)
            self._write(m)
            faultpoint.reached("model-reported")
        if touched:
            self._changed()

    def _end(self, m: ModelState, result: dict) -> None:
        m.wall_s = result.get("wall_s")
        if not result["ok"]:
            self._stop(m, Status.FAILED, result["error"])
            return
        if m.epochs_done < self.opts.epochs:
            self._stop(m, Status.FAILED, f"the job ended after {m.epochs_done} of {self.opts.epochs} epochs")
            return
        try:
            m.model_uri = self._log_model(m, result.get("checkpoint"))
        except Exception as e:  # noqa: BLE001 - the weights are trained but not where a team can use them
            self._stop(m, Status.FAILED, f"logging its model to MLflow failed: {str(e).splitlines()[0] if str(e) else e!r}")
            return
        self.rec.end(m, Status.FINISHED)
        faultpoint.reached("model-ended")
        self._changed()

    def _log_model(self, m: ModelState, checkpoint) -> str:
        """The member's final weights (its job's last checkpoint) as an MLflow model on its run."""
        import numpy as np
        import workers
        from workers.model import build_model
        from workers.train import ema_weights, load_checkpoint

        if checkpoint is None:
            raise RuntimeError("its job saved no checkpoint")
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        model = build_model(m.row["spec"])
        # the better of the weights and their moving average, by the last epoch's val top-1
        averaged = ema_weights(state)
        m.weights = "ema" if averaged is not None and (m.last("ema_val_top1") or 0) > (m.last("val_top1") or 0) else "raw"
        model.load_state_dict(averaged if m.weights == "ema" else state["model"])
        model.eval()
        r = m.row
        res = int(r["resolution"])
        tags = {"orch.scale_id": self.scale_id, "orch.search_id": self.source.search.id, "orch.model": m.name,
                "orch.phi": f"{r['phi']:g}", "orch.resolution": str(res), "orch.gmacs": f"{r['gmacs']:.4f}",
                "orch.params": str(r["params"]), "orch.val_top1": str(m.model_top1), "orch.weights": m.weights,
                "orch.input": f"float32 (N, 3, {res}, {res}), RGB, (x / 255 - 0.5) / 0.25"}
        example = np.zeros((1, 3, res, res), dtype=np.float32)
        return self.tracker.log_torch_model(m.run_id, model, example=example, tags=tags,
                                            code_dir=Path(workers.__file__).parent)

    def _stop(self, m: ModelState, status: str, error: str) -> None:
        self.rec.end(m, status, error)
        self._changed()

    def _write(self, m: ModelState) -> None:
        r, f = m.row, m.figures()
        f.pop("peak_mem_mb")
        self.store.upsert_scale_run(
            self.scale_id, m.name, phi=r["phi"], depth_mult=r["depth_mult"], width_mult=r["width_mult"],
            resolution=r["resolution"], network_key=r["network_key"], params=r["params"], gmacs=r["gmacs"],
            batch_size=r["batch_size"], lr=r["lr"], workers=r["workers"], model_uri=m.model_uri,
            **{k: r[k] for k in ARM_KEYS if k in r}, **f)

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(self.models)

    # -- the end: summary, plot, plan.json, statuses
    def close(self, *, interrupted: bool, wall_s: float, error: str | None = None) -> ScaleOutcome:
        if self.rec.close(self.models, interrupted=interrupted, error=error):
            self._changed()
        failed = [m for m in self.models if m.status == Status.FAILED]
        if interrupted:
            status = Status.INTERRUPTED
        elif failed or error:
            status = Status.FAILED
            error = error or "; ".join(f"{m.name}: {m.error}" for m in failed)
        else:
            status = Status.FINISHED
        finished = [m for m in self.models if m.status == Status.FINISHED]
        summary = {
            "error": error,
            "wall_s": round(wall_s, 3),
            "n_models": len(self.models),
            "trained_now": [m.name for m in finished if not m.earlier],
            "done_before": [m.name for m in finished if m.earlier],
            "by_status": {str(s): sum(1 for m in self.models if m.status == s)
                          for s in sorted({m.status for m in self.models})},
            "models": [model_entry(m) for m in self.models],
        }
        self.tracker.log_text(self.parent, json.dumps(
            {"scale_id": self.scale_id, "search_id": self.source.search.id, "trial_id": self.source.trial.trial_id,
             "alpha": self.coeffs.alpha, "beta": self.coeffs.beta, "gamma": self.coeffs.gamma,
             "options": self.opts.as_config(),
             "models": [{k: v for k, v in r.items() if k != "spec"} | {"spec": r["spec"]} for r in self.plan]},
            indent=2), "plan.json")
        closing, metrics = self._closing(finished)
        summary |= closing
        self.rec.end_parent(status, [("wall_s", wall_s, 0), ("models_finished", len(finished), 0)]
                            + [(f"val_top1_{m.name}", m.last("val_top1"), 0) for m in finished] + metrics)
        self.store.update_scale(self.scale_id, status=status, finished_at=now(), summary=summary, error=error)
        return ScaleOutcome(self.scale_id, self.parent, self.source.search.id, self.source.trial.trial_id, status,
                            self.models, summary)

    def _closing(self, finished: list[ModelState]) -> tuple[dict, list]:
        """What the end adds: to the summary, and metrics of the parent run; a scale plots its family."""
        if finished:
            self._log_plot(finished)
        return {}, []

    def _log_plot(self, finished: list[ModelState]) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="orch-plot-") as d:
            path = Path(d) / "family.png"
            plot_family([(m.name, m.row["gmacs"], m.last("val_top1")) for m in finished], path,
                        title=f"{self.scale_id}: α={self.coeffs.alpha:.3f} β={self.coeffs.beta:.3f} "
                              f"γ={self.coeffs.gamma:.3f} ({self.opts.mode})")
            self.tracker.log_artifact(self.parent, path)


def model_entry(m: ModelState) -> dict:
    r = m.row
    return {"name": m.name, "phi": r["phi"], "resolution": r["resolution"], "params_m": r["params_m"],
            "gmacs": r["gmacs"], "batch_size": r["batch_size"], "lr": r["lr"], "workers": r["workers"],
            "val_top1": m.last("val_top1"), "epochs_done": m.epochs_done, "status": m.status,
            "done_before": m.earlier, "train_s": round(sum(h.get("train_s", 0.0) for h in m.history.values()), 3),
            "mlflow_run_id": m.run_id, "model_uri": m.model_uri, "ema_val_top1": m.last("ema_val_top1"),
            "weights": m.weights, "model_val_top1": m.model_top1, "error": m.error}


def plot_family(points: list[tuple[str, float, float]], path: Path, *, title: str) -> Path:
    """Accuracy against GMACs, log-scaled FLOPs axis, each point labelled with its model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = sorted(points, key=lambda p: p[1])
    ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", color="tab:blue")
    for name, x, y in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image (log scale)")
    ax.set_ylabel("validation top-1")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_scale(runner: ScaleRun, *, cluster=None, resources=None, storage_path: str | Path | None = None) -> ScaleOutcome:
    """Open the scale, train what is missing, close it. ``cluster``/``resources`` are needed
    only when something is missing (the caller connects to Ray then). Ctrl-C ends every open
    run KILLED and the scale ``interrupted``; the checkpoints stay, so running the same command
    again continues each model from its last epoch."""
    runner.open()
    t0 = time.monotonic()
    interrupted, error = False, None
    try:
        if runner.pending:
            runner.run(cluster=cluster, resources=resources, storage_path=storage_path)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    outcome = runner.close(interrupted=interrupted, wall_s=time.monotonic() - t0, error=error)
    if outcome.status == Status.FAILED:
        raise ScaleFailed(runner.scale_id, outcome.summary.get("error") or error or "a model failed")
    return outcome


def finished_before(run, epochs: int) -> bool:
    """A stored scale_runs row that needs no more training."""
    return run.status == Status.FINISHED and run.epochs_done >= epochs


def pending_models(store, scale_id: str, plan: list[dict], epochs: int) -> list[str]:
    """The plan's models an earlier run of this scale has not finished."""
    done = {r.model for r in store.scale_runs(scale_id) if finished_before(r, epochs)}
    return [r["name"] for r in plan if r["name"] not in done]


def alias_of(model: str) -> str:
    """The registry alias of a member: B3 -> b3, B0.5 -> b0_5 (aliases take no dots)."""
    return model.lower().replace(".", "_")


def register_scale(store, tracker, scale_id: str, name: str) -> list[dict]:
    """Every finished member of ``scale_id`` with a logged model as a version of the registered
    model ``name``, aliased b0…b7; registering the same scale again makes no new versions.
    Returns [{model, alias, version, created}]."""

    sc = store.get_scale(scale_id)
    if sc is None:
        raise InputError(f"no scale {scale_id!r}; `orch runs list` shows the scales", param="SCALE_ID")
    if sc.kind != "scale":
        raise InputError(f"{scale_id} is an {sc.kind}: its runs compare scaling strategies and are not a family to "
                         f"register; register a scale (`orch runs list` shows them)", param="SCALE_ID")
    members = [r for r in store.scale_runs(scale_id) if r.status == Status.FINISHED and r.model_uri]
    if not members:
        raise InputError(f"scale {scale_id} has no finished member with a logged model (members trained before "
                         f"orch logged models have none); run `orch scale` to train them", param="SCALE_ID")
    versions = [{"alias": alias_of(r.model), "model_uri": r.model_uri, "run_id": r.mlflow_run_id,
                 "key": {"orch.scale_id": scale_id, "orch.model": r.model},
                 "tags": {"orch.search_id": sc.search_id, "orch.phi": f"{r.phi:g}", "orch.resolution": str(r.resolution),
                          "orch.gmacs": f"{r.gmacs:.4f}", "orch.params": str(r.params),
                          "orch.val_top1": f"{r.val_top1:.4f}" if r.val_top1 is not None else ""}}
                for r in members]
    done = tracker.register(name, versions, tags={"orch.kind": "family"})
    return [{"model": r.model} | d for r, d in zip(members, done)]

