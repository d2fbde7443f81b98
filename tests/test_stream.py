"""Scaled jobs stream the encoded shards (workers/stream.py): random-resized crops decoded at
reduced size, an epoch order that ranks split disjointly and a resumed job repeats, and the GPU
decoding path (its nvJPEG decoder stood in for by Pillow on the CPU: no GPU here)."""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.prepare import open_source, prepare
from workers import stream as st
from tests.conftest import _free_port
from workers.datasets import DatasetError


def _photo(rng, w, h) -> bytes:
    small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared dataset of 2 classes, 30 + 8 images each, of varied sizes (1x1 and very wide
    ones included), in 3 train shards."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (400, 12), (12, 300)] + [(int(rng.integers(40, 260)), int(rng.integers(40, 260))) for _ in range(80)]
    k = 0
    for split, n in (("train", 30), ("val", 8)):
        for cls in ("a", "b"):
            (root / "src" / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / "src" / split / cls / f"{i}.jpg").write_bytes(_photo(rng, *sizes[k % len(sizes)]))
                k += 1
    prepare(open_source(f"imagefolder:{root / 'src'}"), root / "prep", workers=1, shard_mb=0.02)
    return root / "prep"


def test_crop_boxes_follow_the_random_resized_crop_rule():
    rng = np.random.default_rng(1)
    areas, aspects = [], []
    for _ in range(2000):
        w, h = int(rng.integers(200, 900)), int(rng.integers(200, 900))  # a draw within ten tries: near sure
        left, top, cw, ch = st.crop_box(w, h, rng)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw >= 1 and ch >= 1
        areas.append(cw * ch / (w * h))
        aspects.append(cw / ch)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and 0.25 < np.median(areas) < 0.6  # large draws that do not fit are drawn again
    assert np.mean((aspects > 0.7) & (aspects < 1.4)) > 0.95
    # extreme shapes fall back to a centre crop inside the image
    assert st.crop_box(1, 1, rng) == (0, 0, 1, 1)
    left, top, cw, ch = st.crop_box(4000, 10, np.random.default_rng(2))
    assert (top, ch) == (0, 10) and cw == round(10 * 4 / 3) and left == (4000 - cw) // 2
    # the same (seed, epoch, index) draws the same crop, another epoch another one
    assert st.draws(3, 1, 17, 500, 375, True) == st.draws(3, 1, 17, 500, 375, True)
    assert len({st.draws(3, e, 17, 500, 375, True) for e in range(6)}) > 1


def test_reduced_size_decoding_matches_a_full_decode():
    data = _photo(np.random.default_rng(3), 800, 600)
    box = (100, 50, 640, 480)  # a 640 x 480 crop shown at 64 px
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (math.ceil(800 * 64 / 640), math.ceil(600 * 64 / 480)))
    assert im.size == (200, 150)  # decoded at 1/4 scale (1/8 would leave the crop 60 px high)
    fast = st.decode_crop(data, box, 64, flip=False)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BILINEAR, box=(100, 50, 740, 530))
    full = np.asarray(full).transpose(2, 0, 1)
    assert fast.shape == (3, 64, 64) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 6  # same picture, DCT-scaled
    flipped = st.decode_crop(data, box, 64, flip=True)
    assert np.array_equal(flipped, fast[:, :, ::-1])


def test_ranks_take_disjoint_parts_that_cover_the_epoch():
    n, batch, world = 103, 8, 3
    for epoch in range(3):
        parts = [sum(st.epoch_batches(n, batch, r, world, seed=5, epoch=epoch), []) for r in range(world)]
        seen = sum(parts, [])
        assert len(seen) == len(set(seen)) == (n // (batch * world)) * batch * world
        assert all(len(p) == len(parts[0]) for p in parts)
    assert st.epoch_batches(n, batch, 1, world, 5, 2) == st.epoch_batches(n, batch, 1, world, 5, 2)
    assert st.epoch_batches(n, batch, 1, world, 5, 2) != st.epoch_batches(n, batch, 1, world, 5, 1)


def test_the_stream_yields_labelled_crops_from_loader_processes(prepared):
    s = st.Stream(prepared, 24, batch=8, seed=1, workers=2)
    assert s.steps_per_epoch == 60 // 8
    labels = s.shards.labels
    batches = list(s.epoch(0))
    assert len(batches) == 7 and s.epoch_now == 0
    for (x, y), idx in zip(batches, s.batches(0), strict=True):
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.uint8
        assert y.tolist() == labels[idx].tolist()
    # each image again, by itself: the loader processes crop exactly what (seed, epoch, index) says
    idx = s.batches(0)[2]
    one = np.stack([st.decode_crop(s.shards.encoded(i), *st.draws(1, 0, i, *s.shards.size(i), True)[:1], 24,
                                   st.draws(1, 0, i, *s.shards.size(i), True)[1]) for i in idx])
    assert np.array_equal(batches[2][0].numpy(), one)
    # a new epoch: new crops of the same images
    again = next(iter(s.epoch(1)))[0]
    assert not torch.equal(again, batches[0][0])
    s.close()


def test_the_gpu_path_crops_what_the_cpu_path_crops(prepared):
    """The GPU decoder's batches, with nvJPEG replaced by Pillow on the CPU (the only stand-in in
    this file: no GPU here), equal the loader's up to resampling."""
    def pillow_decode(datas, device):
        return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(d.numpy().tobytes())).convert("RGB")).transpose(2, 0, 1).copy())
                for d in datas]

    cpu = st.Stream(prepared, 32, batch=8, seed=2, workers=0)
    gpu = st.Stream(prepared, 32, batch=8, seed=2, workers=0)
    gpu.decoder, gpu._gpu_decode = "gpu", pillow_decode
    for (a, ya), (b, yb) in zip(cpu.epoch(0), gpu.epoch(0), strict=True):
        assert torch.equal(ya, yb) and a.shape == b.shape
        assert (a.float() - b.float()).abs().mean() < 12
    # 'auto' switches only when the loop waited for data and the decoder is there
    assert gpu.choose(waited=0.5, elapsed=1.0) == "gpu" and gpu.choose(waited=0.05, elapsed=1.0) == "cpu"
    assert cpu.choose(waited=0.5, elapsed=1.0) == "cpu"  # no GPU decoder: stays on the CPU
    with pytest.raises(DatasetError, match="decoder 'gpu' needs CUDA"):
        st.Stream(prepared, 32, batch=8, decoder="gpu")


def test_a_damaged_shard_is_one_line_naming_it(prepared, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(prepared, copy)
    shard = sorted(copy.glob("train-*.jpgs"))[0]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    for workers in (0, 1):  # read here, and in a loader process (whose error torch wraps in a traceback)
        s = st.Stream(copy, 24, batch=4, workers=workers)
        with pytest.raises(DatasetError) as err:
            list(s.epoch(0))
        s.close()
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value), str(err.value)
        assert re.fullmatch(r"cannot decode image .*train-00000\.jpgs#\d+ .*prepare the dataset again", str(err.value))


def _rank(rank: int, world: int, port: int, root: str, log: str, epochs: int, state_path: str | None, out: str):
    import torch.distributed as dist

    from orchestrator import scaling
    from workers import train

    os.environ[st.SAMPLE_LOG] = log
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state = torch.load(state_path, weights_only=False)[0] if state_path else None
        spec = scaling.network_spec(1.0, 1.0, 32, num_classes=2)
        saved = []
        train.run({"spec": spec, "dataset": f"prepared:{root}", "epochs": epochs, "batch_size": 4, "stream": True,
                   "loader_workers": 1, "seed": 7}, lambda m, c: saved.append((m, c)), state=state)
        if rank == 0:
            torch.save([c for _, c in saved], out)  # every epoch's checkpoint
    finally:
        dist.destroy_process_group()


def _job(world, root, log, epochs, state_path, out):
    torch.multiprocessing.start_processes(_rank, args=(world, _free_port(), str(root), str(log), epochs, state_path, str(out)),
                                          nprocs=world, start_method="spawn")


def test_two_gloo_ranks_read_disjoint_parts_and_a_resumed_job_repeats_the_order(prepared, tmp_path):
    """train.run as a scaled job runs it (Ray Train's TorchTrainer initialises the same gloo group)."""
    _job(2, prepared, tmp_path / "whole", 2, None, tmp_path / "whole.pt")
    n = 60
    for epoch in (0, 1):
        r0, r1 = (np.load(tmp_path / "whole" / f"rank{r}-epoch{epoch}.npy") for r in (0, 1))
        assert len(r0) == len(r1) == (n // 8) * 4
        assert not set(r0) & set(r1) and len(set(r0) | set(r1)) == (n // 8) * 8
    e0, e1 = (np.concatenate([np.load(tmp_path / "whole" / f"rank{r}-epoch{e}.npy") for r in (0, 1)]) for e in (0, 1))
    assert not np.array_equal(e0, e1)  # a new order each epoch
    # resumed from its checkpoint after epoch 1 (as a restarted job is), it reads epoch 2 as the whole one did
    _job(2, prepared, tmp_path / "resumed", 2, str(tmp_path / "whole.pt"), tmp_path / "resumed.pt")
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["rank0-epoch1.npy", "rank1-epoch1.npy"]
    for r in (0, 1):
        assert np.array_equal(np.load(tmp_path / "resumed" / f"rank{r}-epoch1.npy"),
                              np.load(tmp_path / "whole" / f"rank{r}-epoch1.npy"))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)[-1]
    assert [m["epoch"] for m in resumed["history"]] == [1, 2]
    assert all("data_wait_s" in m and m["gpu_decoded"] == 0.0 for m in resumed["history"])
