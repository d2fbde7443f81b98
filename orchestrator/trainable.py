"""The thin Ray wrappers around ``workers.train.run``: the Tune function trainable of a search
(with the per-search registry of networks already trained, so a network is trained once per
search), and the Ray Train job of one scaled model (``fit_job``: a data-parallel TorchTrainer).

Runs inside Ray workers: imports ray and the workers package, never mlflow or sqlalchemy.
"""

from __future__ import annotations

import os
import tempfile
import time

import ray
from ray import tune

from orchestrator import datasource, space

#: Poll interval of a trial waiting for the earlier trial of the same network.
REUSE_POLL_S = 0.5


@ray.remote(num_cpus=0)
class NetworkRegistry:
    """Which network key is trained by which trial, and its history once that trial ended."""

    def __init__(self):
        self.owner: dict[str, str] = {}
        self.outcome: dict[str, list | None] = {}  # key -> history (None: owner failed)

    def claim(self, key: str, trial_id: str) -> str | None:
        """None: train it yourself. Otherwise the trial id that trains (or trained) it."""
        owner = self.owner.get(key)
        if owner is None or owner == trial_id or (key in self.outcome and self.outcome[key] is None):
            self.owner[key] = trial_id
            self.outcome.pop(key, None)
            return None
        return owner

    def finish(self, key: str, trial_id: str, history: list | None) -> None:
        if self.owner.get(key) == trial_id:
            self.outcome[key] = history

    def result(self, key: str):
        """(done, history): history None with done=True means the owner failed."""
        if key in self.outcome:
            return True, self.outcome[key]
        return False, None

    def seed(self, trained: list[tuple[str, str, list]]) -> None:
        """Networks that earlier drivers of a resumed search trained: (key, trial id, history)."""
        for key, trial_id, history in trained:
            self.owner[key], self.outcome[key] = trial_id, history


def registry_name(search_id: str) -> str:
    return f"orch-registry-{search_id}"


def pin_threads() -> None:
    """As many torch threads as CPUs this trial or worker was given. Ray sets OMP_NUM_THREADS
    for its actors, but a torch imported before that (a worker setup hook, a reused process)
    uses every core and oversubscribes the machine (measured: 4x slower on 2 cores)."""
    import math

    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(math.floor(cpus))))


def coefficients(config: dict) -> tuple[float, float, float]:
    c = config.get("point", config)
    return float(c["alpha"]), float(c["beta"]), float(c["gamma"])


def trial_fn(config: dict, settings: dict) -> None:
    """Tune function trainable. ``settings`` (via ``tune.with_parameters``) holds the search's
    training settings; ``config`` holds the coefficients."""
    from workers import train

    if float(config.get("flops_violation") or 0) > 0:
        # Infeasible (no width brings its measured FLOPs within the tolerance): never trained.
        # Ending without a report tells Optuna so (a pruned trial whose constraint it records).
        return
    pin_threads()
    alpha, beta, gamma = coefficients(config)
    cand = space.candidate(alpha, beta, gamma, base_resolution=settings["base_resolution"],
                           num_classes=settings["num_classes"], network=settings.get("network", "efficientnet-b0"))
    trial_id = tune.get_context().get_trial_id()
    # "worker_pid", not "pid": Tune overwrites a result's "pid" with the reporting process's,
    # which for a replayed trial is not where it was trained. The driver stores it as "pid".
    extra = {"network_key": cand.key, "node_id": ray.get_runtime_context().get_node_id(), "worker_pid": os.getpid()}
    if settings.get("work_s"):  # benchmarks/bookkeeping.py: fixed work instead of training
        _fixed_work(alpha, beta, gamma, settings["work_s"], settings["train"]["epochs"], extra)
        return

    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = train.load_checkpoint(d)
    elif settings.get("dedupe", True) and config.get("phase") != "confirm":  # confirmation: a fresh seed, trained
        registry = ray.get_actor(registry_name(settings["search_id"]))
        owner = ray.get(registry.claim.remote(cand.key, trial_id))
        while owner is not None:
            done, history = ray.get(registry.result.remote(cand.key))
            if done and history is not None:
                # Same network, already trained in this search: replay its reports, train nothing.
                for metrics in history:  # with the node and process it was trained in
                    tune.report({**extra, **metrics, "worker_pid": metrics.get("pid"), "reused_from": owner})
                return
            if done:  # the owner failed: train it here
                owner = ray.get(registry.claim.remote(cand.key, trial_id))
                break
            time.sleep(REUSE_POLL_S)

    # A trial resumed from a checkpoint sends the checkpoint's epochs along with its first report:
    # a driver that died between the checkpoint and writing those epochs gets them now (it
    # ignores epochs it has). Re-reporting them one by one would advance ASHA's clock.
    earlier = {"earlier": state["history"]} if state and state.get("history") else {}

    def report(metrics: dict, ckpt: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as d:
            train.save_checkpoint(ckpt, d)
            tune.report({**metrics, **extra, **earlier}, checkpoint=tune.Checkpoint.from_directory(d))
        earlier.clear()

    cfg = dict(settings["train"], spec=cand.spec)
    if config.get("seed") is not None:  # a confirmation run: fresh initialisation and batch order, same data
        cfg["seed"] = int(config["seed"])
    try:
        with datasource.in_use(cfg["dataset"]) as dataset:  # a URL's or network mount's node-local copy
            train.run(dict(cfg, dataset=dataset), report, state=state)
        if earlier:  # the checkpoint was already at the last epoch: nothing was reported
            tune.report({**state["history"][-1], **extra, **earlier})
    except train.TrialDiverged as e:
        # Deterministic: a retry from the last checkpoint diverges again, so end the trial now
        # (no --max-failures retries) with the reason. NaN tells Optuna the trial failed; ASHA
        # ignores it. The driver marks the trial failed.
        tune.report({"val_top1": float("nan"), "diverged": str(e), **extra})


def _fixed_work(alpha: float, beta: float, gamma: float, work_s: float, epochs: int, extra: dict) -> None:
    """``work_s`` seconds of waiting over ``epochs`` reports, with a deterministic score, so a
    benchmark measures the orchestration around a trial and nothing else. It sleeps, as a
    trial whose work runs on a GPU leaves the CPU to the driver (Ray's own bookkeeping test
    does the same)."""
    import math

    per_epoch = work_s / epochs
    for epoch in range(1, epochs + 1):
        time.sleep(per_epoch)
        score = 0.5 + 0.1 * math.sin(7 * alpha + 3 * beta + 5 * gamma) + 0.02 * epoch
        tune.report({"epoch": epoch, "val_top1": score, "train_loss": 1 - score, "train_s": per_epoch,
                     "epoch_s": per_epoch, **extra})


# --------------------------------------------------------------------------- scale jobs (Ray Train)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Per-epoch reports of the scale's jobs, collected for the driver (which polls ``drain``)."""

    def __init__(self):
        self.events: list[dict] = []

    def push(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        events, self.events = self.events, []
        return events


def _board_callback(board, model: str):
    from ray.train.v2.api.callback import UserCallback

    class BoardCallback(UserCallback):
        """Runs in the Train controller after every report: hands every rank's metrics to the
        board. Synchronous, so all of a job's reports are on the board before ``fit`` returns."""

        def after_report(self, run_context, metrics, checkpoint):
            ray.get(board.push.remote({"model": model, "metrics": list(metrics)}))

    return BoardCallback()


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: resume from the job's latest checkpoint if there is one, train, and
    report every epoch (rank 0 with the checkpoint)."""
    import ray.train
    import ray.train.torch

    from workers import train

    pin_threads()
    rank = ray.train.get_context().get_world_rank()
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = train.load_checkpoint(d)

    def report(metrics: dict, ckpt: dict) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as d:
            train.save_checkpoint(ckpt, d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    if state is not None:
        # Replay what the checkpoint already holds, so a driver that died before recording
        # those epochs gets them now (it ignores epochs it has); a job whose checkpoint is
        # already at the last epoch then still reports it.
        for metrics in state.get("history", []):
            ray.train.report(dict(metrics), checkpoint=None)
    with datasource.in_use(config["train"]["dataset"]) as dataset:  # a URL's or network mount's node-local copy
        train.run(dict(config["train"], dataset=dataset), report, state=state, device=ray.train.torch.get_device())


@ray.remote(num_cpus=0, max_retries=0)
def fit_job(model: str, train_cfg: dict, *, workers: int, use_gpu: bool, resources_per_worker: dict,
            storage_path: str, run_name: str, board, max_failures: int) -> dict:
    """One model as a Ray Train job. A task, so that several jobs run at once and cancelling
    it (force) takes the job's controller and workers down with it. Never raises: returns
    ``{"ok": bool, "error": str | None, "wall_s": float, "checkpoint": the last one (a Ray Train
    Checkpoint, where the storage is) or None}``. A job started again under the same
    ``run_name`` and storage continues from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    # One worker needs no process group: TorchTrainer would start torch.distributed's rendezvous
    # store anyway, a TCP listener on all interfaces (torch has no bind address for it), so a
    # one-worker job runs under the plain trainer and opens no port at all.
    trainer_cls = TorchTrainer if workers > 1 else DataParallelTrainer
    trainer = trainer_cls(
        train_loop_per_worker,
        train_loop_config={"train": train_cfg},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=[_board_callback(board, model)],
        ),
    )
    t0 = time.monotonic()
    try:
        result = trainer.fit()
    except Exception as e:  # the job failed (out of retries): its reason, in one line
        return {"ok": False, "error": job_error(e), "wall_s": time.monotonic() - t0, "checkpoint": None}
    return {"ok": True, "error": None, "wall_s": time.monotonic() - t0, "checkpoint": result.checkpoint}


def job_error(e: BaseException) -> str:
    """The worker's own exception line out of Ray Train's error (which embeds tracebacks)."""
    import re

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    exc = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Diverged|Interrupt)\b.*", line)]
    return (exc[-1] if exc else (lines[0] if lines else type(e).__name__))[:2000]
