"""Datasets for trials: ``synthetic`` (default), ``imagefolder:PATH`` and ``prepared:PATH``
(``orch data prepare``).

Every one ends up as uint8 tensors (N, 3, H, W) plus int64 labels: node-local tiers
(``workers/tiers.py``), built once per node and resolution and memory-mapped by every trial
there. The loop gathers batches from them and augments on the device (real images: a
random-resized crop and flip as one batched resampling; the synthetic task: a random shift within
a reflection padding), so it never waits for a data loader. Torch, numpy and
Pillow only.

``synthetic`` is generated deterministically from a seed, with no download. Each class is a
textured object (an oriented grating of a class frequency, inside a soft ellipse at a random
place and scale) on a noisy background with a weaker distractor texture of another class.
Classes come in pairs that differ *only* in frequency, one of them high: at a low input
resolution the high one aliases into its partner, so resolution matters; the random position,
scale and clutter make depth and width matter. Pixel noise keeps the task from saturating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from workers import tiers

#: Native resolution of the synthetic images before resizing to a trial's resolution.
SYNTHETIC_NATIVE = 64
from workers.datasets import (  # noqa: F401 - re-exported: the torch-free part of this module
    IMAGE_SUFFIXES, DatasetError, files_digest, num_classes_of, parse_spec, scan_imagefolder,
)
from workers.defaults import SYNTHETIC_CLASSES, SYNTHETIC_TRAIN, SYNTHETIC_VAL  # noqa: F401 - re-exported
#: Bumped whenever the synthetic generator changes what it draws: old tiers are not reused.
SYNTHETIC_VERSION = "v1"


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    name: str
    num_classes: int
    train: Split
    val: Split
    # Synthetic classes are told apart by texture orientation, which a mirror would change.
    flip: bool = True
    # Trials' augmentation on the device: 'rrc' (random-resized crop and flip, one batched
    # resampling: gpu_resized_crop) for real images; 'pad' (shifts within a reflection padding:
    # gpu_augment) for the synthetic task, whose objects sit anywhere already and whose classes
    # differ by a spatial frequency a rescaling would move.
    augment: str = "rrc"


def _decode_into(items, resolution: int, images, labels) -> None:
    """Decode ``items`` ((path, label) or (encoded bytes, label, where)) into rows of ``images``
    (uint8 (n, 3, R, R), a tier's map) and ``labels``: the shorter side resized to the
    resolution, then a centred square crop."""
    import io

    from PIL import Image  # Pillow: only needed for image files

    for i, (src, label, *where) in enumerate(items):
        path = where[0] if where else src
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = resolution / min(w, h)
                im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - resolution) // 2, (h - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
                images[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot decode image {str(path)!r}: {e}") from None
        labels[i] = label


def _tier_split(key: str, n: int, resolution: int, fill) -> Split:
    try:
        return Split(*tiers.tier(key, n, resolution, fill))
    except OSError as e:
        raise DatasetError(f"cannot write the dataset cache {tiers.cache_dir()} ({e.strerror or e}); free space "
                           f"there or point ORCH_DATA_CACHE at a local disk with room") from None


def load_imagefolder(root: str, resolution: int) -> Dataset:
    """An image folder at ``resolution``, as node-local tiers (keyed by every file's path, size
    and modification time: a changed folder gets a new tier)."""
    classes, splits = scan_imagefolder(root)
    out = {}
    for split, files in splits.items():
        key = f"imagefolder-v1|{files_digest(files)}|{split}|{resolution}"
        out[split] = _tier_split(key, len(files), resolution,
                                 lambda im, lab, files=files: _decode_into(files, resolution, im, lab))
    return Dataset(f"imagefolder:{root}", len(classes), out["train"], out["val"])


def load_prepared(root: str, resolution: int, *, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """A dataset ``orch data prepare`` made, at ``resolution``, as node-local tiers (keyed by
    its manifest, which names every shard's checksum). A split not in ``splits`` is left empty
    (a scaled job streams its training split: ``workers/stream.py``)."""
    from workers.prepared import PreparedError, iter_split, manifest_digest, read_manifest

    try:
        manifest = read_manifest(root)
        digest = manifest_digest(root)
        empty = Split(torch.empty((0, 3, resolution, resolution), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
        out = {split: empty for split in ("train", "val") if split not in splits}
        for split in splits:
            key = f"prepared-v1|{digest}|{split}|{resolution}"
            out[split] = _tier_split(key, manifest["splits"][split]["count"], resolution,
                                     lambda im, lab, split=split: _decode_into(iter_split(root, split, manifest),
                                                                               resolution, im, lab))
    except PreparedError as e:
        raise DatasetError(str(e)) from None
    return Dataset(f"prepared:{root}", len(manifest["classes"]), out["train"], out["val"])


def _synthetic_split(n: int, num_classes: int, seed: int, native: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    # Class parameters, fixed by the class index (not by the seed): pairs share orientation and
    # colour and differ in frequency (cycles per image): a low one and a high one near Nyquist/2.
    cls = torch.arange(num_classes)
    pair = cls // 2
    n_pairs = max(1, (num_classes + 1) // 2)
    theta = math.pi * pair.float() / n_pairs
    freq = torch.where(cls % 2 == 0, torch.full((num_classes,), native / 9.0), torch.full((num_classes,), native / 3.6))
    colour = torch.stack([torch.cos(theta), torch.cos(theta + 2.1), torch.cos(theta + 4.2)], 1) * 0.35

    ys, xs = torch.meshgrid(torch.linspace(0, 1, native), torch.linspace(0, 1, native), indexing="ij")

    def grating(c: torch.Tensor, phase: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
        t = theta[c][:, None, None] + jitter[:, None, None]
        u = xs[None] * torch.cos(t) + ys[None] * torch.sin(t)
        return torch.sin(2 * math.pi * freq[c][:, None, None] * u + phase[:, None, None])

    rnd = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    # The object: a soft ellipse at a random position and scale holding the class texture.
    cx, cy = 0.25 + 0.5 * rnd(n), 0.25 + 0.5 * rnd(n)
    rx, ry = 0.15 + 0.2 * rnd(n), 0.15 + 0.2 * rnd(n)
    d = ((xs[None] - cx[:, None, None]) / rx[:, None, None]) ** 2 + ((ys[None] - cy[:, None, None]) / ry[:, None, None]) ** 2
    mask = torch.sigmoid((1.0 - d) * 6.0)
    obj = grating(labels, 2 * math.pi * rnd(n), 0.15 * (rnd(n) - 0.5))
    # Clutter: a weaker texture of a random other class over the whole image.
    other = (labels + 1 + torch.randint(0, num_classes - 1, (n,), generator=g)) % num_classes
    clutter = grating(other, 2 * math.pi * rnd(n), 0.3 * (rnd(n) - 0.5))
    amp = 0.5 + 0.4 * rnd(n)
    lum = mask * obj * amp[:, None, None] + 0.35 * clutter * (1 - 0.5 * mask)
    img = 0.5 + 0.4 * lum[:, None] + colour[labels][:, :, None, None] * mask[:, None]
    img = img + 0.3 * torch.randn(img.shape, generator=g)
    return Split((img.clamp(0, 1) * 255).round().to(torch.uint8), labels)


def make_synthetic(seed: int, *, n_train: int = SYNTHETIC_TRAIN, n_val: int = SYNTHETIC_VAL,
                   num_classes: int = SYNTHETIC_CLASSES, native: int = SYNTHETIC_NATIVE) -> Dataset:
    """The synthetic task at its native resolution (deterministic in ``seed``)."""
    return Dataset(
        "synthetic",
        num_classes,
        _synthetic_split(n_train, num_classes, seed, native),
        _synthetic_split(n_val, num_classes, seed + 1_000_003, native),
        flip=False,
        augment="pad",
    )


def load_synthetic(resolution: int, *, seed: int, synthetic_size: tuple[int, int] | None = None) -> Dataset:
    """The synthetic task at ``resolution``, as node-local tiers like any dataset: generated
    (and resized) once per node, not once per trial."""
    n_train, n_val = synthetic_size or (SYNTHETIC_TRAIN, SYNTHETIC_VAL)
    native: list[Dataset] = []

    def fill(split: str):
        def write(images, labels):
            if not native:
                native.append(make_synthetic(seed, n_train=n_train, n_val=n_val))
            part = resize_split(getattr(native[0], split), resolution)
            images[:] = part.images.numpy()
            labels[:] = part.labels.numpy()
        return write

    out = {split: _tier_split(f"synthetic-{SYNTHETIC_VERSION}|{seed}|{n_train}|{n_val}|{SYNTHETIC_CLASSES}|"
                              f"{SYNTHETIC_NATIVE}|{split}|{resolution}", n, resolution, fill(split))
           for split, n in (("train", n_train), ("val", n_val))}
    return Dataset("synthetic", SYNTHETIC_CLASSES, out["train"], out["val"], flip=False, augment="pad")


def resize_split(split: Split, resolution: int) -> Split:
    """Area/bilinear resize of a uint8 split (antialiased when shrinking)."""
    if split.images.shape[-1] == resolution:
        return split
    out = torch.empty((len(split), 3, resolution, resolution), dtype=torch.uint8)
    for i in range(0, len(split), 512):
        x = split.images[i:i + 512].float()
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + 512] = x.round().clamp(0, 255).to(torch.uint8)
    return Split(out, split.labels)


_CACHE: dict[tuple, Dataset] = {}


def load(spec: str, resolution: int, *, seed: int = 0, synthetic_size: tuple[int, int] | None = None) -> Dataset:
    """The dataset ``spec`` at ``resolution``, cached per process (reused Ray actors keep it)."""
    kind, path = parse_spec(spec)
    key = (spec, resolution, seed, synthetic_size)
    if key in _CACHE:
        return _CACHE[key]
    if kind == "synthetic":
        ds = load_synthetic(resolution, seed=seed, synthetic_size=synthetic_size)
    elif kind == "prepared":
        ds = load_prepared(path, resolution)
    else:
        ds = load_imagefolder(path, resolution)
    if len(_CACHE) > 8:  # a reused actor sees many resolutions; keep memory bounded
        _CACHE.clear()
    _CACHE[key] = ds
    return ds


def gpu_augment(x: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with reflection padding and (optionally) horizontal flip, on x's device.

    ``x`` is float (N, 3, H, W). One random shift per batch row via an unfold-free gather:
    pad, then take a crop at a per-sample offset using advanced indexing.
    """
    n, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])  # (n, h)
        cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])  # (n, w)
        idx_n = torch.arange(n, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if not flip:
        return x
    mirrored = torch.rand(n, device=x.device, generator=generator) < 0.5
    return torch.where(mirrored[:, None, None, None], x.flip(3), x)


#: Trials' random-resized crops: area fraction and aspect ranges. The tier is already at the
#: trial's resolution, so a crop is upsampled back to it; the area starts at a quarter (not
#: torchvision's 8 %, which on a pre-resized image would show a few blurred pixels).
TRIAL_CROP_SCALE = (0.25, 1.0)
TRIAL_CROP_RATIO = (3 / 4, 4 / 3)


def gpu_resized_crop(x: torch.Tensor, *, flip: bool, scale: tuple[float, float] = TRIAL_CROP_SCALE,
                     ratio: tuple[float, float] = TRIAL_CROP_RATIO, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-resized crop and (optionally) horizontal flip of a float batch (N, 3, H, W) on its
    device, as one batched ``grid_sample``: per image an area fraction drawn from ``scale``, an
    aspect drawn log-uniformly from ``ratio`` (a side that would not fit is clamped to the
    image), a random position, and a mirror with probability 1/2; bilinear, back to H x W."""
    n, c, h, w = x.shape
    dev = x.device

    def uniform() -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator)

    area = scale[0] + (scale[1] - scale[0]) * uniform()
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * uniform())
    aspect = aspect * (h / w)  # width/height in pixels -> in fractions of W and H
    cw, ch = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # fractions of W, H
    cx, cy = (1 - cw) * (2 * uniform() - 1), (1 - ch) * (2 * uniform() - 1)  # centres, in [-1, 1] coordinates
    mirrored = uniform() < 0.5
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = torch.where(mirrored, -cw, cw) if flip else cw
    theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cx, ch, cy
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)
