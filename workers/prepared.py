"""A prepared dataset, as ``orch data prepare`` writes it and trials read it. numpy only (and
only to read shards: checking a manifest imports nothing heavy).

A folder holding, per split (``train``, ``val``), shards of encoded images and their indexes, and
one ``manifest.json`` written last (its presence means the dataset is complete):

- ``<split>-<k>.jpgs``: the images' JPEG bytes, back to back (a shard holds at most the
  manifest's ``shard_bytes``, or one image when a single image is larger);
- ``<split>-<k>.idx.npy``: an int64 array (n, 7), one row per image: offset and length in the
  shard, label, width, height, and the first 16 bytes of the SHA-1 of the source file (two
  int64: finds the same image in train and val, and duplicates);
- ``manifest.json``: format and version, the classes (index = label), per split the count and
  the shards (file names, counts, sizes, SHA-256 of both files), the short-side cap, and what
  was skipped, dropped or re-encoded, with the source and its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = "orch-prepared-images"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
#: Index columns.
OFFSET, LENGTH, LABEL, WIDTH, HEIGHT, DIGEST_HI, DIGEST_LO = range(7)
INDEX_COLUMNS = 7


class PreparedError(ValueError):
    """A prepared dataset that cannot be read as one; the message says why and what to do."""


def shard_names(split: str, k: int) -> tuple[str, str]:
    return f"{split}-{k:05d}.jpgs", f"{split}-{k:05d}.idx.npy"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(root: str | os.PathLike) -> str:
    """SHA-256 of the manifest, which names every shard's checksum: the dataset's identity."""
    return hashlib.sha256((Path(root) / MANIFEST).read_bytes()).hexdigest()


def manifest_bytes(root: str | os.PathLike) -> bytes:
    """The stored manifest of the prepared dataset at ``root``; PreparedError when there is none
    (a preparation that did not finish)."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise PreparedError(f"prepared dataset {str(root)!r} does not exist; make it with `orch data prepare SOURCE {root}`")
    if not path.is_file():
        raise PreparedError(f"{str(root)!r} has no {MANIFEST}: its preparation did not finish; "
                            f"run `orch data prepare` into it again")
    try:
        return path.read_bytes()
    except OSError as e:
        raise PreparedError(f"{str(path)!r} is unreadable ({e}); prepare the dataset again") from None


def parse_manifest(raw: bytes, where: str) -> dict:
    """A stored manifest (read from ``where``) checked to be one orch can read; PreparedError."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise PreparedError(f"{where!r} is unreadable ({e}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PreparedError(f"{where!r} is not an orch prepared dataset")
    if manifest.get("version") != VERSION:
        raise PreparedError(f"{where!r} is format version {manifest.get('version')}, this orch reads "
                            f"{VERSION}; prepare the dataset again")
    return manifest


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the prepared dataset at ``root``; PreparedError when there is none (a
    preparation that did not finish) or it is not one orch can read."""
    return parse_manifest(manifest_bytes(root), str(Path(root) / MANIFEST))


def iter_split(root: str | os.PathLike, split: str, manifest: dict | None = None, *, verify: bool = False):
    """(jpeg bytes, label, where) of every image of ``split``, shard by shard; ``verify`` checks
    each shard against the manifest's checksum first."""
    import numpy as np  # here: the CLI reads manifests while parsing arguments, before anything heavy

    root = Path(root)
    manifest = manifest or read_manifest(root)
    for shard in manifest["splits"][split]["shards"]:
        data_path, idx_path = root / shard["data"], root / shard["index"]
        if verify:
            for p, key in ((data_path, "sha256"), (idx_path, "index_sha256")):
                if sha256_of(p) != shard[key]:
                    raise PreparedError(f"{str(p)!r} does not match its checksum in the manifest (damaged or "
                                        f"changed since it was prepared); prepare the dataset again")
        index = np.load(idx_path)
        data = np.memmap(data_path, dtype=np.uint8, mode="r") if shard["bytes"] else np.zeros(0, np.uint8)
        for i, row in enumerate(index):
            off, n = int(row[OFFSET]), int(row[LENGTH])
            yield data[off:off + n].tobytes(), int(row[LABEL]), f"{shard['data']}#{i}"
