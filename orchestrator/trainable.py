"""The thin Ray Tune wrapper around ``workers.train.run``, and the per-search registry of
networks already trained (so a network is trained once per search).

Runs inside Ray workers: imports ray and the workers package, never mlflow or sqlalchemy.
"""

from __future__ import annotations

import tempfile
import time

import ray
from ray import tune

from orchestrator import space

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

    def snapshot(self) -> dict:
        return {"owner": dict(self.owner), "outcome": dict(self.outcome)}


def registry_name(search_id: str) -> str:
    return f"orch-registry-{search_id}"


def coefficients(config: dict) -> tuple[float, float, float]:
    c = config.get("point", config)
    return float(c["alpha"]), float(c["beta"]), float(c["gamma"])


def trial_fn(config: dict, settings: dict) -> None:
    """Tune function trainable. ``settings`` (via ``tune.with_parameters``) holds the search's
    training settings; ``config`` holds the coefficients."""
    from workers import train

    alpha, beta, gamma = coefficients(config)
    cand = space.candidate(alpha, beta, gamma, base_resolution=settings["base_resolution"],
                           num_classes=settings["num_classes"])
    trial_id = tune.get_context().get_trial_id()
    extra = {"network_key": cand.key}

    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = train.load_checkpoint(d)
    elif settings.get("dedupe", True):
        registry = ray.get_actor(registry_name(settings["search_id"]))
        owner = ray.get(registry.claim.remote(cand.key, trial_id))
        while owner is not None:
            done, history = ray.get(registry.result.remote(cand.key))
            if done and history is not None:
                # Same network, already trained in this search: replay its reports, train nothing.
                for metrics in history:
                    tune.report({**metrics, **extra, "reused_from": owner})
                return
            if done:  # the owner failed: train it here
                owner = ray.get(registry.claim.remote(cand.key, trial_id))
                break
            time.sleep(REUSE_POLL_S)

    def report(metrics: dict, ckpt: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as d:
            train.save_checkpoint(ckpt, d)
            tune.report({**metrics, **extra}, checkpoint=tune.Checkpoint.from_directory(d))

    cfg = dict(settings["train"], spec=cand.spec)
    train.run(cfg, report, state=state)
