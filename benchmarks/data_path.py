"""The data path, measured: `orch data prepare` (issue #15, item 1), images/s per CPU core; the
scaled jobs' stream (item 3): the CPU loader's random-resized crops at 224 px per loader process,
against bare Pillow decoding of the same files; and the node-local tiers trials read (item 2):
gathering batches from a mapped tier, and the memory four processes mapping one tier hold
between them (from /proc/<pid>/smaps).

    python benchmarks/data_path.py            # 2,000 images of each kind, every CPU; a 128-px tier
    python benchmarks/data_path.py --quick    # 40 of each, 1 process; a 64-px tier (what CI runs)

Three kinds of source image, each prepared on its own so their costs show apart:
- `baseline JPEG`: 500x375 photo-sized JPEGs (ImageNet's median size), kept byte for byte: the
  cost is reading, checking and hashing;
- `PNG`: the same pictures as PNG, re-encoded to JPEG (what any non-JPEG source costs);
- `large JPEG`: 1600x1200 JPEGs, downscaled to the 640 px short side and re-encoded.
The pictures are smooth noise (a photo's entropy, not a flat colour). Prints, last, one line per
kind: images/s, images/s per process, and the prepared size against the source's.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _picture(rng, w: int, h: int):
    import numpy as np
    from PIL import Image

    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def make(root: Path, kind: str, n: int) -> int:
    """``n`` images of ``kind`` in ``root`` (an image folder, 4 classes); returns their bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    size, fmt = {"baseline JPEG": ((500, 375), "JPEG"), "PNG": ((500, 375), "PNG"),
                 "large JPEG": ((1600, 1200), "JPEG")}[kind]
    total = 0
    for i in range(n):
        split = "val" if i % 5 == 0 else "train"
        d = root / split / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        _picture(rng, *size).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        path = d / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        path.write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def mapping_kb(pid: int, path: Path) -> dict:
    """Rss and Pss (kB) of the mapping of ``path`` in process ``pid``, from /proc/<pid>/smaps.
    tests/test_tiers.py uses it too."""
    out, inside = {"Rss": 0, "Pss": 0}, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0] and len(head) >= 5:  # a mapping's header line
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and head and head[0].rstrip(":") in out:
            out[head[0].rstrip(":")] += int(head[1])
    return out


#: A process that maps a tier, reads all of it, says so and waits for stdin to close.
MAPPER = ("import sys, torch\nfrom workers import tiers\n"
          "images, labels = tiers.tier(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), None)\n"
          "print(int(images.sum(dtype=torch.int64)), flush=True)\nsys.stdin.read()\n")


def tiers_figures(n: int, res: int, cache: Path) -> list[str]:
    import subprocess

    import numpy as np
    import torch

    os.environ["ORCH_DATA_CACHE"] = str(cache)
    from workers import tiers

    key = f"bench|{n}|{res}"
    rng = np.random.default_rng(0)

    def fill(images, labels):
        for i in range(0, n, 1024):
            images[i:i + 1024] = rng.integers(0, 255, images[i:i + 1024].shape, dtype=np.uint8)
        labels[:] = np.arange(n) % 10

    images, labels = tiers.tier(key, n, res, fill)
    batch, reps = 256, 200
    g = torch.Generator().manual_seed(0)
    images[torch.randint(0, n, (batch,), generator=g)].sum()  # warm
    t0 = time.perf_counter()
    for _ in range(reps):
        x = images[torch.randint(0, n, (batch,), generator=g)]
    gather = batch * reps / (time.perf_counter() - t0)
    del x
    path = tiers.paths(key)[0]
    size_kb = path.stat().st_size / 1024
    procs = [subprocess.Popen([sys.executable, "-c", MAPPER, key, str(n), str(res)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(4)]
    try:
        for p in procs:
            p.stdout.readline()
        rows = [mapping_kb(p.pid, path) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
    pss = sum(r["Pss"] for r in rows)
    return [f"gather from a {res}-px tier ({n} images, {size_kb / 1024:.0f} MiB, page cache warm): "
            f"{gather:,.0f} images/s on 1 core (batches of {batch}, random rows)",
            f"4 processes mapping that tier: Pss summed {pss / 1024:.1f} MiB = {pss / size_kb:.2f} x the file "
            f"(each maps {min(r['Rss'] for r in rows) / 1024:.0f}-{max(r['Rss'] for r in rows) / 1024:.0f} MiB of it; "
            f"this process maps it too, so five share the pages)"]


def stream_figures(prepared: Path, res: int, workers: int, batch: int = 64) -> list[str]:
    """The scaled jobs' CPU loader (workers/stream.py) on the prepared shards at ``res`` with
    random-resized crops, in ``workers`` loader processes, against bare Pillow decoding (a full
    decode to RGB, no resize) of the same JPEG bytes on one core."""
    from PIL import Image

    from workers.stream import Stream

    s = Stream(prepared, res, batch=batch, seed=0, workers=workers)
    batch = s.batch = min(batch, len(s.shards))  # --quick has 32 training images
    s.steps_per_epoch = len(s.shards) // batch
    for _ in s.epoch(0):  # start the processes; the page cache warm
        pass
    t0 = time.perf_counter()
    images = 0
    for epoch in (1, 2):
        for x, _ in s.epoch(epoch):
            images += len(x)
    loader = images / (time.perf_counter() - t0)
    s.close()
    t0 = time.perf_counter()
    for i in range(len(s.shards)):
        Image.open(io.BytesIO(s.shards.encoded(i))).convert("RGB")
    bare = len(s.shards) / (time.perf_counter() - t0)
    return [f"CPU loader, {res} px random-resized crops + flip, {workers} loader processes, batches of {batch}: "
            f"{loader:,.0f} images/s = {loader / workers:,.0f} per loader process (target >= 250 per core); "
            f"bare Pillow full decode of the same JPEGs: {bare:,.0f} images/s on 1 core "
            f"(loader per process / bare = {loader / workers / bare:.2f})"]


def _step(spec: dict, device):
    """One training step of ``spec`` (SGD, bf16 autocast on CUDA, channels_last), as the loop runs
    it, on a uint8 batch."""
    import torch
    from torch.nn import functional as F

    from workers.model import build_model
    from workers.train import _normalize

    model = build_model(spec).to(device, memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **({"fused": True} if cuda else {}))

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
            loss = F.cross_entropy(model(_normalize(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _timed(step, batches, steps: int, device) -> float:
    """images/s of ``steps`` steps fed by the iterator ``batches`` (after 3 warm-up steps)."""
    import torch

    for _ in range(3):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        step(x, y)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def path_figures(prepared: Path, device_name: str, quick: bool) -> list[str]:
    """The scaled jobs' whole data path (stream: decode, crop, collate, copy, normalise) feeding
    the training step, against the bare step on one batch already on the device; and on CUDA,
    nvJPEG's batched decoding alone."""
    import itertools

    import torch

    from orchestrator.scaling import OFFICIAL, network_spec
    from workers.stream import Stream, gpu_decoder

    device = torch.device(device_name)
    rows = [("B0", 32, 8, 4)] if quick else [("B0", 224, 256, 30), ("B4", 380, 64, 30)]
    lines = []
    for name, res, batch, steps in rows:
        width, depth, _, _ = OFFICIAL[name]
        spec = network_spec(depth, width, res, num_classes=4)
        step = _step(spec, device)
        x = torch.randint(0, 255, (batch, 3, res, res), dtype=torch.uint8, device=device)
        y = torch.randint(0, 4, (batch,), device=device)
        bare = _timed(step, itertools.repeat((x, y)), steps, device)
        stream = Stream(prepared, res, batch=min(batch, 32 if quick else batch), device=device)
        if stream.steps_per_epoch == 0:
            return [f"data path: too few images for batches of {batch}; pass more --images"]

        def epochs(stream=stream):
            for e in itertools.count():
                yield from stream.epoch(e)
        fed = _timed(step, epochs(), steps, device)
        stream.close()
        lines.append(f"{name}@{res} bs{batch} on {device_name}: data path {fed:,.1f} images/s, bare step "
                     f"{bare:,.1f} -> {fed / bare:.2f} (targets on a GPU: B0@224 >= 0.90, B4@380 >= 0.95); "
                     f"decoder {stream.decoder}, {stream.workers} loader processes")
    decode = gpu_decoder() if device.type == "cuda" else None
    if decode is not None:
        s = Stream(prepared, 224, batch=256, device=device, workers=0)
        datas = [torch.frombuffer(bytearray(s.shards.encoded(i)), dtype=torch.uint8) for i in range(len(s.shards))]
        decode(datas[:64], device)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(0, len(datas), 256):
            decode(datas[i:i + 256], device)
        torch.cuda.synchronize(device)
        lines.append(f"nvJPEG (torchvision decode_jpeg, batches of 256) on {device_name}: "
                     f"{len(datas) / (time.perf_counter() - t0):,.0f} images/s (target >= 6,000 on an H100/H200)")
    elif device.type == "cuda":
        lines.append("nvJPEG: torchvision's decode_jpeg does not load here; not measured")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 images of each kind, 1 process (CI)")
    ap.add_argument("--images", type=int, default=2000, help="images of each kind")
    ap.add_argument("--workers", type=int, default=None, help="encoding processes (default: every CPU)")
    ap.add_argument("--device", default="cpu", help="where the data path feeds a training step: cpu or cuda "
                    "(on a GPU: --images 10000 --device cuda measures B0@224 and B4@380 and nvJPEG)")
    args = ap.parse_args()
    n = 40 if args.quick else args.images
    procs = 1 if args.quick else (args.workers or os.cpu_count() or 1)

    from orchestrator import prepare as prep
    from workers import prepared as fmt

    lines = []
    with tempfile.TemporaryDirectory(prefix="orch-data-") as tmp:
        for kind in ("baseline JPEG", "PNG", "large JPEG"):
            src, dest = Path(tmp) / kind.replace(" ", "-"), Path(tmp) / f"{kind.replace(' ', '-')}-prepared"
            source_bytes = make(src, kind, n)
            source = prep.open_source(f"imagefolder:{src}")
            t0 = time.perf_counter()
            out = prep.prepare(source, dest, workers=procs)
            wall = time.perf_counter() - t0
            m = out.manifest
            images = sum(m["splits"][s]["count"] for s in fmt.SPLITS)
            size = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"])
            assert images == n, (kind, images)
            lines.append(f"{kind:14} {images / wall:8.0f} images/s, {images / wall / procs:7.0f} per process "
                         f"({procs} processes, {n} images, {wall:.1f} s, pool start included); "
                         f"{m['reencoded']} re-encoded; prepared {size / 2**20:.1f} MiB = "
                         f"{size / source_bytes:.2f} x the source")
            if kind == "baseline JPEG":
                stream_lines = stream_figures(dest, 224, procs) + path_figures(dest, args.device, args.quick)
        tier_lines = tiers_figures(2000 if args.quick else 10000, 64 if args.quick else 128, Path(tmp) / "tiers")
    print(f"data prepare ({os.cpu_count()} CPUs here):")
    for line in lines:
        print("  " + line)
    print("scaled jobs' stream:")
    for line in stream_lines:
        print("  " + line)
    print("tiers:")
    for line in tier_lines:
        print("  " + line)


if __name__ == "__main__":
    main()
