"""Training and synthetic-task defaults, in one place, and ``Training``: what one trial or one
scaled model trains on and how. ``workers.train`` and ``workers.data`` run with them, the
orchestrator's option classes build their ``Training`` here, the CLI shows the defaults. No
torch, so the CLI reads them while parsing arguments. How they were chosen: README, "Default
trials learn" (``benchmarks/trial_defaults.py``)."""

from __future__ import annotations

from dataclasses import dataclass


class BaselineError(ValueError):
    """A ``--baseline`` that cannot be used (unknown, or a user's network that cannot be built or
    scaled); the message says why and what to do. Here, torch-free, for both sides."""

#: Per-trial (and B0's per-worker) batch: small enough for a CPU, per-step noise helps short runs.
BATCH_SIZE = 64
#: SGD-Nesterov peak rate at BATCH_SIZE (warm-up, then cosine). Measured at base 40, 3 epochs:
#: 0.1 gave 2x-B0 candidates 0.33-0.79 val top-1 where 0.03 gave 0.21-0.28 and 0.2 gave 0.21.
LR = 0.1
#: Maximum epochs per trial, and each scaled job's epochs. With zero-γ residual blocks
#: (workers.model) 2x-B0 candidates reach 0.53-0.85 val top-1 in 2 epochs and 0.98-1.00 in 3:
#: 3 saturates the task, so every candidate ties and the ranking is noise; 2 leaves room to rank
#: and costs two thirds.
EPOCHS = 2
#: Scaled jobs keep an exponential moving average of the weights with this decay (see
#: workers/train.py DEFAULTS['ema_decay'] for how short runs use it); the paper's recipe.
EMA_DECAY = 0.9999

#: --compile: 'auto' (compiled where it pays: on CUDA, when the run's remaining steps amortise the
#: compile time; see workers/compiled.py), 'on' or 'off'.
COMPILE_MODES = ("auto", "on", "off")
COMPILE = "auto"

#: Size of the synthetic task: big enough to rank candidates, small enough for a laptop CPU.
SYNTHETIC_TRAIN, SYNTHETIC_VAL, SYNTHETIC_CLASSES = 1536, 512, 10
#: B0's input size for the synthetic task (its images are 64 px). The high-frequency class of each
#: pair (64/3.6 ≈ 17.8 cycles per image) lies above the Nyquist limit of 32 px (16) and below that
#: of 40 px (20): at 32 default trials ended near 0.2 top-1 (before zero-γ blocks; with them B0
#: reached 0.94-0.97 at 34 px in 2 epochs); at 40 resolution can still grow within 2x B0, which
#: the measured FLOPs constraint does not allow at 32.
SYNTHETIC_BASE_RESOLUTION = 40


def cache_folder(variable: str, name: str):
    """A node-local cache folder: ``$variable`` when set, else ``$XDG_CACHE_HOME/orch/<name>``
    (default ``~/.cache/orch/<name>``)."""
    import os
    from pathlib import Path

    given = os.environ.get(variable)
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orch" / name


@dataclass(frozen=True)
class Training:
    """What a trial or a scaled model trains on and how. ``config()`` is the part of
    ``workers.train``'s config it sets (the network spec and the recipe's constants are added
    there)."""

    dataset: str = "synthetic"  # 'synthetic' or 'imagefolder:PATH'
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE  # per worker
    lr: float = LR  # peak SGD-Nesterov rate at batch_size on one worker
    seed: int = 0  # model init, batch order and augmentation
    data_seed: int | None = None  # the synthetic task's data; None: seed
    synthetic_size: tuple[int, int] | None = None  # (train, val) images; None: SYNTHETIC_TRAIN, SYNTHETIC_VAL
    compile: str = COMPILE  # one of COMPILE_MODES

    def config(self) -> dict:
        return {"dataset": self.dataset, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "seed": self.seed, "data_seed": self.seed if self.data_seed is None else self.data_seed,
                "synthetic_size": list(self.synthetic_size) if self.synthetic_size else None,
                "compile": self.compile}
