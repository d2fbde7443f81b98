"""Node-local dataset tiers (workers/tiers.py): one copy per node, shared by every process that
maps it (measured from /proc/<pid>/smaps, not assumed), built once under a lock, never half."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.data_path import mapping_kb
from workers import data as data_mod
from workers import tiers

ROOT = Path(__file__).resolve().parents[1]

#: A child that maps the tier ``key`` (building it if needed, with a fill that records who built
#: it in ``built``), reads every page, says so, and waits for stdin to close.
CHILD = """
import os, sys, numpy as np
from workers import tiers
key, n, res, built, die = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "die"
def fill(images, labels):
    with open(built, "a") as f:
        f.write(f"{os.getpid()}\\n")
    for i in range(n):
        images[i] = (i * 7) % 251
        labels[i] = i % 10
        if die and i == n // 2:
            os.kill(os.getpid(), 9)
images, labels = tiers.tier(key, n, res, fill)
print(int(images.sum(dtype=__import__("torch").int64)), int(labels.sum()), flush=True)
sys.stdin.read()
"""


def _child(key, n, res, built, die=False):
    return subprocess.Popen([sys.executable, "-c", CHILD, key, str(n), str(res), str(built), "die" if die else "-"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_processes_mapping_one_tier_hold_one_copy(tmp_path):
    key, n, res = "test-share|1", 1200, 64  # 14.7 MB
    built = tmp_path / "built"
    children = [_child(key, n, res, built) for _ in range(3)]
    try:
        sums = [c.stdout.readline().split() for c in children]
        assert len({tuple(s) for s in sums}) == 1 and sums[0], [c.stderr.read() for c in children]
        assert len(built.read_text().split()) == 1  # built once, under the lock; the others waited
        images_path = tiers.paths(key)[0]
        size_kb = images_path.stat().st_size / 1024
        rows = [mapping_kb(c.pid, images_path) for c in children]
        assert all(r["Rss"] >= 0.99 * size_kb for r in rows), rows  # each process reads all of it
        pss = sum(r["Pss"] for r in rows)
        assert pss / size_kb <= 1.1, (pss, size_kb, rows)  # and the three hold one copy between them
    finally:
        for c in children:
            c.stdin.close()
            c.wait(timeout=30)


def test_a_build_killed_half_way_leaves_no_tier_and_the_next_one_builds_it(tmp_path):
    key, n, res = "test-killed|1", 200, 32
    built = tmp_path / "built"
    c = _child(key, n, res, built, die=True)
    assert c.wait(timeout=60) == -9
    images_path, labels_path, _ = tiers.paths(key)
    assert not images_path.exists()
    c = _child(key, n, res, built)
    try:
        total, labels = map(int, c.stdout.readline().split())
    finally:
        c.stdin.close()
        c.wait(timeout=30)
    assert total == sum((i * 7) % 251 for i in range(n)) * 3 * res * res and labels == sum(i % 10 for i in range(n))
    assert len(built.read_text().split()) == 2
    assert not [p for p in images_path.parent.iterdir() if ".tmp-" in p.name]  # the dead build's file is gone


def test_datasets_are_tiers_built_once(tmp_path, monkeypatch):
    """The synthetic task goes through the same path: a second load (another process, another
    trial) maps the tier instead of generating the images again."""
    monkeypatch.setenv("ORCH_DATA_CACHE", str(tmp_path / "cache"))
    a = data_mod.load_synthetic(40, seed=3, synthetic_size=(96, 32))
    files = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".u8")
    assert len(files) == 2  # train and val
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    time.sleep(0.01)
    generate = data_mod.make_synthetic
    calls = []
    monkeypatch.setattr(data_mod, "make_synthetic", lambda *a, **k: calls.append(1))
    b = data_mod.load_synthetic(40, seed=3, synthetic_size=(96, 32))
    assert calls == [] and {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == mtimes
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    # the same pixels and labels as generating and resizing in memory
    ref = data_mod.resize_split(generate(3, n_train=96, n_val=32).train, 40)
    assert a.train.images.shape == (96, 3, 40, 40)
    assert torch.equal(a.train.images, ref.images) and torch.equal(a.train.labels, ref.labels)


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch, tmpfs):
    full = tmpfs(1)
    monkeypatch.setenv("ORCH_DATA_CACHE", str(full))
    with pytest.raises(data_mod.DatasetError, match="ORCH_DATA_CACHE"):
        data_mod.load_synthetic(64, seed=0, synthetic_size=(512, 64))  # 6 MB: the 1 MB disk is full
    assert not [p for p in full.iterdir() if p.suffix == ".u8"]
