"""Streaming a prepared dataset's encoded shards: what scaled jobs (B0…B7) train on.

Proxy trials read a pre-resized tier (``workers/data.py``); a scaled job trains longer, at up to
600 px, and needs a fresh random-resized crop of every image each epoch, so it reads the JPEG
shards ``orch data prepare`` wrote and decodes them as it goes:

- **Order.** Epoch ``e``'s order is a permutation drawn from ``(seed, e)`` alone, the same on
  every rank; rank ``r`` of ``w`` takes the ``r``-th slice of every global batch, so ranks read
  disjoint parts that together cover the epoch (less the ragged last global batch), and a job
  resumed at epoch ``e`` reads exactly the order an uninterrupted one would.
- **Augmentation.** Per image a random-resized crop (torchvision's rule: scale 0.08-1 of the
  area, aspect 3/4-4/3, ten tries then a centre crop) and a horizontal flip, drawn from
  ``(seed, epoch, index)``: the same crops whichever process or decoder reads the image. The
  crop box comes from the width and height in the shard index, before decoding.
- **CPU decoding** in DataLoader worker processes with Pillow: JPEG's DCT scaling decodes at
  1/2, 1/4 or 1/8 size when the crop still has ``resolution`` pixels there (``Image.draft``),
  then one crop-and-resize (bilinear, antialiased); batches are collated as uint8 (a quarter of
  float's bytes) and normalised on the device.
- **GPU decoding** (CUDA only): nvJPEG through torchvision's ``decode_jpeg`` on the device, the
  same crop boxes, resized on the device. ``decoder='auto'`` starts on the CPU and, after a short
  probe, switches when the loop waited for data more than ``WAIT_SHARE`` of the time (the CPUs
  cannot keep up with the step) and the GPU decoder is installed.

Validation is not streamed: it reads the split's tier (shorter side resized, centre crop), as
trials do. Torch, numpy and Pillow only.
"""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from workers import prepared as fmt
from workers.datasets import DatasetError

#: torchvision's RandomResizedCrop defaults (the ImageNet recipe's).
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
#: decoder 'auto' on CUDA: steps timed before deciding, after skipping the first few (start-up).
PROBE_SKIP, PROBE_STEPS = 3, 20
#: ... and the share of the probe's time spent waiting for batches above which it decodes on the GPU.
WAIT_SHARE = 0.10
DECODERS = ("auto", "cpu", "gpu")
#: Set to a folder to have every rank write the indices it trained on per epoch there
#: (``rank<r>-epoch<e>.npy``): a check that ranks read disjoint parts (tests use it).
SAMPLE_LOG = "ORCH_SAMPLE_LOG"
#: Shard maps a process keeps open (each holds a file descriptor).
MAPS = 64


class Shards:
    """The images of one split of a prepared dataset by global index: encoded bytes, label,
    stored size. Shard files are memory-mapped lazily, in each process that reads them (loader
    workers included); pickling drops the maps."""

    def __init__(self, root: str | os.PathLike, split: str, manifest: dict | None = None):
        self.root = Path(root)
        manifest = manifest or fmt.read_manifest(root)
        shards = manifest["splits"][split]["shards"]
        self.files = [s["data"] for s in shards]
        indexes = [np.load(self.root / s["index"]) for s in shards]
        self.index = (np.concatenate(indexes) if indexes else np.zeros((0, fmt.INDEX_COLUMNS), np.int64))
        self.shard = np.concatenate([np.full(len(x), k, np.int32) for k, x in enumerate(indexes)]) if indexes \
            else np.zeros(0, np.int32)
        self._maps: dict[int, np.memmap] = {}  # open shard maps, most recently used last (at most MAPS)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    @property
    def labels(self) -> np.ndarray:
        return self.index[:, fmt.LABEL]

    def size(self, i: int) -> tuple[int, int]:
        return int(self.index[i, fmt.WIDTH]), int(self.index[i, fmt.HEIGHT])

    def encoded(self, i: int) -> bytes:
        k = int(self.shard[i])
        mm = self._maps.pop(k, None)
        if mm is None:
            try:
                mm = np.memmap(self.root / self.files[k], dtype=np.uint8, mode="r")
            except OSError as e:
                raise DatasetError(f"cannot read {self.root / self.files[k]} ({e.strerror or e}); is the prepared "
                                   f"dataset still there?") from None
            if len(self._maps) >= MAPS:  # each map holds a file descriptor: keep a bounded set
                self._maps.pop(next(iter(self._maps)))
        self._maps[k] = mm
        off, n = int(self.index[i, fmt.OFFSET]), int(self.index[i, fmt.LENGTH])
        return mm[off:off + n].tobytes()

    def where(self, i: int) -> str:
        k = int(self.shard[i])
        return f"{self.root / self.files[k]}#{i - int(np.searchsorted(self.shard, k))}"


def crop_box(width: int, height: int, rng: np.random.Generator,
             scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random-resized crop of a ``width`` x ``height``
    image: torchvision's ``RandomResizedCrop.get_params`` rule, with numpy's generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            return int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1)), cw, ch
    aspect = width / height  # ten misses (a very wide or tall image): a centre crop within the ratio
    if aspect < ratio[0]:
        cw, ch = width, max(1, round(width / ratio[0]))
    elif aspect > ratio[1]:
        cw, ch = max(1, round(height * ratio[1])), height
    else:
        cw, ch = width, height
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def draws(seed: int, epoch: int, i: int, width: int, height: int, flip: bool) -> tuple[tuple[int, int, int, int], bool]:
    """Image ``i``'s crop box and flip in ``epoch``: a function of (seed, epoch, i) only."""
    rng = np.random.default_rng((seed % 2**63, epoch, i))  # any int seed (numpy's take no negatives)
    box = crop_box(width, height, rng)
    return box, bool(flip and rng.random() < 0.5)


def decode_crop(data, box: tuple[int, int, int, int], resolution: int, flip: bool) -> np.ndarray:
    """JPEG ``data`` -> the ``box`` crop resized to ``resolution`` (uint8 (3, R, R)), decoded at
    the smallest DCT scale that keeps the crop at least ``resolution`` pixels wide and high."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    w, h = im.size
    left, top, cw, ch = box
    im.draft("RGB", (math.ceil(w * resolution / cw), math.ceil(h * resolution / ch)))
    sx, sy = im.size[0] / w, im.size[1] / h
    im = im.convert("RGB")
    out = im.resize((resolution, resolution), Image.BILINEAR,
                    box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def epoch_batches(n: int, batch: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of ``epoch``: the ``rank``-th slice of each global batch of a
    permutation drawn from ``(seed, epoch)`` (the ragged last global batch is dropped)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    gbs = batch * world
    return [perm[s * gbs + rank * batch:s * gbs + (rank + 1) * batch].tolist() for s in range(n // gbs)]


class _Crops(torch.utils.data.Dataset):
    """Items are (epoch, index): one loader, persistent workers, every epoch."""

    def __init__(self, shards: Shards, resolution: int, seed: int, flip: bool):
        self.shards, self.resolution, self.seed, self.flip = shards, resolution, seed, flip

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, int, int]:
        epoch, i = item
        box, flip = draws(self.seed, epoch, i, *self.shards.size(i), self.flip)
        data = self.shards.encoded(i)
        try:
            image = decode_crop(data, box, self.resolution, flip)
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"cannot decode image {self.shards.where(i)} ({e}); the shard is damaged: "
                               f"prepare the dataset again") from None
        return image, int(self.shards.labels[i]), i


def _collate(items: list[tuple[np.ndarray, int, int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    return (torch.from_numpy(np.stack([image for image, _, _ in items])),
            torch.tensor([label for _, label, _ in items], dtype=torch.int64), [i for _, _, i in items])


def _one_line(e: DatasetError) -> DatasetError:
    """A DatasetError raised in a loader process reaches this one wrapped by torch ('Caught
    DatasetError in DataLoader worker process 0.' and the worker's traceback): its own line again."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else str(e)
    return DatasetError(last.split("DatasetError: ", 1)[-1])


class _Order(torch.utils.data.Sampler):
    def __init__(self, stream: "Stream"):
        self.stream = stream

    def __iter__(self):
        s = self.stream
        return iter([[(s.epoch_now, i) for i in b] for b in s.batches(s.epoch_now)])

    def __len__(self) -> int:
        return self.stream.steps_per_epoch


def default_workers(world: int) -> int:
    """Loader processes per rank: this process's CPUs shared by the node's ranks, one left for
    the rank itself, at most 8."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    return max(1, min(8, len(os.sched_getaffinity(0)) // max(1, local) - 1))


def gpu_decoder() -> Callable | None:
    """nvJPEG batch decoding (torchvision), or None when it is not installed or does not load."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # not installed, or built against another torch
        return None
    return lambda datas, device: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def crops_on_device(images: list[torch.Tensor], boxes, flips, resolution: int) -> torch.Tensor:
    """Decoded images (uint8 (3, h, w) on one device) -> their crops resized to ``resolution``
    (uint8 (n, 3, R, R)), flipped where asked: the GPU path's counterpart of ``decode_crop``."""
    out = torch.empty((len(images), 3, resolution, resolution), dtype=torch.uint8, device=images[0].device)
    for k, (im, (left, top, cw, ch), flip) in enumerate(zip(images, boxes, flips, strict=True)):
        crop = im[:, top:top + ch, left:left + cw].unsqueeze(0).float()
        crop = F.interpolate(crop, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        out[k] = (crop.flip(-1) if flip else crop)[0].round_().clamp_(0, 255).to(torch.uint8)
    return out


class Stream:
    """The training split of a prepared dataset, batch by batch, for one rank of a job."""

    def __init__(self, root: str | os.PathLike, resolution: int, *, batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, flip: bool = True, device: torch.device | None = None, workers: int | None = None,
                 decoder: str = "auto", manifest: dict | None = None):
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: use one of {DECODERS}")
        self.shards = Shards(root, "train", manifest)
        self.resolution, self.batch, self.rank, self.world, self.seed = resolution, batch, rank, world, seed
        self.flip = flip
        self.device = device or torch.device("cpu")
        cuda = self.device.type == "cuda"
        self.decoder = "cpu" if decoder == "auto" and not cuda else decoder
        self._gpu_decode = gpu_decoder() if cuda and self.decoder != "cpu" else None
        if self.decoder == "gpu" and self._gpu_decode is None:
            raise DatasetError("decoder 'gpu' needs CUDA and torchvision's decode_jpeg (nvJPEG); "
                               "install torchvision for your torch, or use decoder 'cpu'")
        self.steps_per_epoch = len(self.shards) // (batch * world)
        self.workers = default_workers(world) if workers is None else workers
        self.epoch_now = 0
        self.waited = 0.0  # seconds the consumer waited for batches (all epochs)
        self._loader = None
        self._log = os.environ.get(SAMPLE_LOG)
        self._steps, self._probe_start, self._probe_wait = 0, 0.0, 0.0

    def batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.shards), self.batch, self.rank, self.world, self.seed, epoch)

    def _cpu_loader(self):
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _Crops(self.shards, self.resolution, self.seed, self.flip), batch_sampler=_Order(self),
                num_workers=self.workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0, prefetch_factor=2 if self.workers > 0 else None)
        return self._loader

    def _gpu_batch(self, epoch: int, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        boxes, flips = zip(*(draws(self.seed, epoch, i, *self.shards.size(i), self.flip) for i in idx))
        datas = [torch.frombuffer(bytearray(self.shards.encoded(i)), dtype=torch.uint8) for i in idx]
        try:
            images = self._gpu_decode(datas, self.device)
        except RuntimeError as e:
            raise DatasetError(f"GPU decoding of images {self.shards.where(idx[0])}… failed "
                               f"({str(e).splitlines()[0]}); run with decoder 'cpu'") from None
        labels = torch.from_numpy(self.shards.labels[idx].copy())
        return crops_on_device(images, boxes, flips, self.resolution), labels, idx

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images (B, 3, R, R), int64 labels) on the device, ``steps_per_epoch`` of them."""
        self.epoch_now = epoch
        order = self.batches(epoch)
        cpu = iter(self._cpu_loader()) if self.decoder != "gpu" else None
        delivered: list[int] = []
        for s, idx in enumerate(order):
            t0 = time.perf_counter()
            try:
                x, y, got = next(cpu) if cpu is not None else self._gpu_batch(epoch, idx)
            except DatasetError as e:
                raise _one_line(e) from None
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            waited = time.perf_counter() - t0
            self.waited += waited
            delivered += got
            if cpu is not None and self.decoder == "auto" and self._probe(t0, waited):
                cpu = None  # the rest of this epoch: same order, same crops, on the GPU
                self._close_loader()
            if self._log and s == len(order) - 1:  # what the loader delivered, in order (tests check ranks' parts)
                Path(self._log).mkdir(parents=True, exist_ok=True)
                np.save(Path(self._log) / f"rank{self.rank}-epoch{epoch}.npy", np.array(delivered, dtype=np.int64))
            yield x, y

    def _probe(self, t0: float, waited: float) -> bool:
        """decoder 'auto': count steps across epochs; after PROBE_SKIP + PROBE_STEPS, decide once.
        True when the job switches to the GPU decoder now."""
        self._steps += 1
        if self._steps == PROBE_SKIP + 1:
            self._probe_start, self._probe_wait = t0, 0.0
        elif self._steps > PROBE_SKIP + 1:
            self._probe_wait += waited
            if self._steps == PROBE_SKIP + 1 + PROBE_STEPS:
                self.decoder = self.choose(self._probe_wait, time.perf_counter() - self._probe_start)
                return self.decoder == "gpu"
        return False

    def choose(self, waited: float, elapsed: float) -> str:
        """'gpu' when the probe waited for data more than WAIT_SHARE of its time and nvJPEG
        decodes one of the images here, else 'cpu' (for the rest of the job)."""
        if self._gpu_decode is None or waited <= WAIT_SHARE * elapsed:
            return "cpu"
        try:
            self._gpu_decode([torch.frombuffer(bytearray(self.shards.encoded(0)), dtype=torch.uint8)], self.device)
        except Exception:  # a driver or library that cannot decode here: stay on the CPU
            return "cpu"
        return "gpu"

    def _close_loader(self) -> None:
        if self._loader is not None and self._loader._iterator is not None:
            self._loader._iterator._shutdown_workers()
        self._loader = None

    def close(self) -> None:
        self._close_loader()
