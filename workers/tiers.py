"""Tiers: a dataset split at one resolution as a uint8 file (N, 3, R, R) in a node-local cache,
built once per node and memory-mapped read-only by every trial there, so the page cache holds
one copy however many trials run on the node, no trial keeps a private copy, and nothing passes
through Ray's object store. The size limit is the cache's disk, not memory.

A tier is named by a digest of what it holds (its source's identity, split and resolution). The
first process that needs it builds it under a lock (an ``flock`` on ``<name>.lock``; the others
wait), into a temporary file that is renamed into place when whole: a tier that exists is
complete. The cache folder is ``ORCH_DATA_CACHE``, else ``$XDG_CACHE_HOME/orch/tiers`` (default
``~/.cache/orch/tiers``); delete it to reclaim the space. torch and numpy only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from workers.defaults import cache_folder


def cache_dir() -> Path:
    return cache_folder("ORCH_DATA_CACHE", "tiers")


def paths(key: str) -> tuple[Path, Path, Path]:
    """(images, labels, lock) of the tier named by ``key``."""
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    d = cache_dir()
    return d / f"{name}.u8", d / f"{name}.labels.npy", d / f"{name}.lock"


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def tier(key: str, n: int, resolution: int,
         fill: Callable[[np.ndarray, np.ndarray], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of the tier ``key``: ``n`` images of ``resolution``. Built once per node
    with ``fill(images, labels)`` writing into a (n, 3, R, R) uint8 map and an int64 array; then
    mapped. Images are a read-only mapped tensor (do not write into it); labels are in memory."""
    images_path, labels_path, lock_path = paths(key)
    shape = (n, 3, resolution, resolution)
    if not images_path.exists():
        images_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if not images_path.exists():
                for stale in images_path.parent.glob(f"{images_path.stem}.*tmp-*"):  # a killed build's
                    stale.unlink(missing_ok=True)  # (we hold the lock: no one else is building it)
                tmp = images_path.with_name(f"{images_path.name}.tmp-{os.getpid()}")
                tmp_labels = labels_path.with_name(f"{labels_path.stem}.tmp-{os.getpid()}.npy")
                try:
                    # The blocks are reserved first: a full disk is an OSError here, not a SIGBUS
                    # when a page of the map is written with no block left to hold it.
                    with open(tmp, "wb") as f:
                        if n:
                            os.posix_fallocate(f.fileno(), 0, int(np.prod(shape)))
                    mm = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape) if n else None
                    labels = np.zeros(n, dtype=np.int64)
                    if n:
                        fill(mm, labels)
                        mm.flush()
                        del mm
                    np.save(tmp_labels, labels)
                    _fsync_replace(tmp_labels, labels_path)
                    _fsync_replace(tmp, images_path)  # last: its presence means the tier is whole
                finally:
                    tmp.unlink(missing_ok=True)
                    tmp_labels.unlink(missing_ok=True)
    labels = torch.from_numpy(np.load(labels_path))
    if n == 0:
        return torch.empty(shape, dtype=torch.uint8), labels
    mm = np.memmap(images_path, dtype=np.uint8, mode="r", shape=shape)
    with warnings.catch_warnings():  # read-only by design: no one writes into a tier
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(mm)
    return images, labels
