"""The data path, measured. So far: `orch data prepare` (issue #15, item 1), images/s per CPU core.

    python benchmarks/data_path.py            # 2,000 images of each kind, every CPU
    python benchmarks/data_path.py --quick    # 40 of each, 1 process (what CI runs)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 images of each kind, 1 process (CI)")
    ap.add_argument("--images", type=int, default=2000, help="images of each kind")
    ap.add_argument("--workers", type=int, default=None, help="encoding processes (default: every CPU)")
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
    print(f"data prepare ({os.cpu_count()} CPUs here):")
    for line in lines:
        print("  " + line)


if __name__ == "__main__":
    main()
