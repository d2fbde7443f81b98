"""orch's adapter to Ray Tune: the only place that builds, fits and restores Tune experiments and
reads what Tune saved. Its surface is narrow:

- :func:`experiment` builds a Tune experiment of a search (or restores one from its folder);
- :func:`fit` fits it and says whether it was interrupted or failed;
- :func:`trial_statuses` reads Tune's saved record of an experiment's trials;
- :func:`can_restore` says whether a folder holds a restorable experiment;
- :class:`Listener`/:func:`listen`: Tune's trial events reach whichever object listens for the
  search in this driver (a resumed search's too: Tune pickles its callbacks with its state).

``orchestrator.raytune.state`` keeps orch's consistent copy of Tune's driver state. Both reach into
interfaces of Tune that are not public (named where used); ``pyproject.toml`` pins Ray to the
version this was tested against.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Protocol

from orchestrator import faultpoint
from orchestrator.ctrlc import CtrlC
from orchestrator.raytune import state

#: The listener of each search this driver runs, by search id (see ``_callback_class``).
_LISTENERS: dict[str, "Listener"] = {}


class Listener(Protocol):
    """What receives a search's trial events (called on Tune's driver thread: must not block)."""

    def started(self, trial_id: str, config: dict) -> None: ...

    def result(self, trial_id: str, result: dict) -> None: ...

    def ended(self, trial_id: str, failed: bool, error: str | None = None) -> None: ...


def listen(search_id: str, listener: Listener | None) -> None:
    """``listener`` receives the events of search ``search_id``'s experiments from now on (None: stop)."""
    if listener is None:
        _LISTENERS.pop(search_id, None)
    else:
        _LISTENERS[search_id] = listener


def listener_of(search_id: str) -> "Listener | None":
    """The listener of search ``search_id`` in this driver, if any."""
    return _LISTENERS.get(search_id)


def experiment(trial_fn: Callable, settings: dict, resources: dict, *, search_id: str, name: str, storage_path: str,
               restore_from: str | None = None, concurrency: int = 1, max_failures: int = 0,
               param_space: dict | None = None, search_alg=None, scheduler=None, num_samples: int = 1):
    """A Tune experiment of search ``search_id`` named ``name`` under ``storage_path``: trials of
    ``trial_fn(config, settings=settings)`` with ``resources`` each; or, with ``restore_from``,
    the one saved there, continued."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trial_fn, settings=settings), resources)
    if restore_from:
        # The driver state from orch's copy (Tune's own may be torn by a kill during its
        # upload), then Tune restores the trials, their checkpoints, the searcher (the Optuna
        # study, which continues) and the scheduler; errored trials stay failed (retries used up).
        state.put_back(restore_from)
        return tune.Tuner.restore(restore_from, trainable, resume_unfinished=True)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=num_samples),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage_path), verbose=0,
            callbacks=[_callback_class()(search_id)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    )


def grid(points: list) -> dict:
    """A Tune grid over ``points`` (every one, once)."""
    from ray import tune

    return tune.grid_search(points)


def optuna_searcher(space_fn, *, seed: int, constraints_func, storage, study_name: str, concurrency: int):
    """Optuna's TPE (seeded, with a constraint) as Tune's searcher, at most ``concurrency`` trials at once."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=space_fn, metric="val_top1", mode="max", storage=storage, study_name=study_name,
                            sampler=optuna.samplers.TPESampler(seed=seed, constraints_func=constraints_func))
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)


def asha(*, max_epochs: int, grace_epochs: int, reduction_factor: int):
    """ASHA on val_top1, one rung unit per reported epoch."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", metric="val_top1", mode="max", max_t=max_epochs,
                         grace_period=grace_epochs, reduction_factor=reduction_factor)


def can_restore(path: str) -> bool:
    """Whether ``path`` holds an experiment to continue: orch's copy of its state, or Tune's own."""
    from ray import tune

    return state.exists(path) or tune.Tuner.can_restore(path)


def fit(build: Callable) -> tuple[bool, str | None]:
    """Fit the Tune experiment ``build()`` makes: (interrupted, error line)."""
    try:
        tuner = build()
        with _SigintWatch() as sigint:
            result = tuner.fit()
        return sigint.fired or _unfinished(result), None
    except KeyboardInterrupt:
        return True, None
    except Exception as e:  # the search itself failed: the caller records it
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def trial_statuses(experiment_path: str) -> list[dict]:
    """Tune's saved record of every trial of an experiment: id, status (Tune's: TERMINATED, ERROR,
    …), error line, and ``saved()``: what it reported as Tune saved it, read on demand
    (``{"last": its last result, "history": its latest checkpoint's epochs}``)."""
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
    return [{"trial_id": trial.trial_id, "status": trial.status,
             "error": _trial_error(trial) if trial.status == "ERROR" else None,
             "saved": (lambda trial=trial: _saved(trial))} for trial in analysis.trials]


def _saved(trial) -> dict:
    history: list = []
    checkpoint = trial.checkpoint
    if checkpoint is not None:
        from workers.train import load_checkpoint

        with checkpoint.as_directory() as d:
            history = list(load_checkpoint(d).get("history", []))
    return {"last": dict(trial.last_result or {}), "history": history}


def _callback_class():
    from ray import tune

    class ListenerCallback(tune.Callback):
        """Forwards Tune's trial events to the search's listener. Tune pickles its experiment
        state, the callbacks included, so this holds only the search id and finds the listener
        (threads, connections) of whichever driver runs the search now: a resumed one too."""

        def __init__(self, search_id: str):
            self.__setstate__({"search_id": search_id})

        def __getstate__(self):
            return {"search_id": self.search_id}

        def __setstate__(self, saved):
            self.search_id = saved["search_id"]
            self.snapshots = state.Snapshots()

        @property
        def listener(self):
            # Through a module-level function: Tune pickles this class by value (cloudpickle),
            # which would copy a global it named directly (the listeners: threads, connections).
            return listener_of(self.search_id)

        def on_step_begin(self, iteration, trials, **info):
            self.snapshots.watch(trials)

        def get_state(self):
            # Tune calls this at the end of each save of its driver state, right after writing
            # the state files: the moment to copy them, consistent (orchestrator/raytune/state.py).
            self.snapshots()
            return None  # nothing of its own to restore

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.listener:
                self.listener.started(trial.trial_id, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.listener:
                self.listener.result(trial.trial_id, result)

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            faultpoint.reached("checkpoint")

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.listener:
                self.listener.ended(trial.trial_id, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.listener:
                self.listener.ended(trial.trial_id, failed=True, error=_trial_error(trial))

    return ListenerCallback


class _SigintWatch(CtrlC):
    """Tells whether Ctrl-C stopped ``Tuner.fit``. Tune installs its own SIGINT handler (a
    graceful stop that saves the experiment) and, when it fires, puts back the handler it found:
    ours. So if ours is current after fit, Tune's fired; if ours is called, a second Ctrl-C
    came (or Tune installed none) and it raises KeyboardInterrupt as usual."""

    def __init__(self):
        super().__init__()
        self.tune_handles = self._active and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))

    @property
    def fired(self) -> bool:
        return self.pressed

    def __exit__(self, *exc):
        import signal

        if self.tune_handles and signal.getsignal(signal.SIGINT) == self._handler:
            self.pressed = True
        return super().__exit__(*exc)


def _unfinished(result_grid) -> bool:
    try:
        from ray.tune.experiment import Trial

        trials = result_grid._experiment_analysis.trials  # noqa: SLF001 - Tune exposes no public status list
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
