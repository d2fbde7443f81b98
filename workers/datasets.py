"""What a dataset spec names, without loading it: ``synthetic`` or ``imagefolder:PATH``. No
torch: the CLI checks ``--dataset`` with it while parsing arguments (``workers.data`` loads).
"""

from __future__ import annotations

import os
from pathlib import Path

from workers.defaults import SYNTHETIC_CLASSES

#: Image suffixes read by ``imagefolder``.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DatasetError(ValueError):
    """A dataset spec or folder the user gave cannot be used; the message says why."""


#: Dataset kinds that name a folder: ``<kind>:PATH``.
FOLDER_KINDS = ("imagefolder", "prepared")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``synthetic`` -> ("synthetic", None); ``imagefolder:PATH`` -> ("imagefolder", PATH);
    ``prepared:PATH`` (made by ``orch data prepare``) -> ("prepared", PATH)."""
    if spec == "synthetic":
        return "synthetic", None
    kind, _, path = spec.partition(":")
    if kind in FOLDER_KINDS and path:
        return kind, path
    raise DatasetError(f"unknown dataset {spec!r}: use 'synthetic', 'imagefolder:PATH' or 'prepared:PATH'")


def check(spec: str) -> None:
    """``spec`` names a dataset that can be read (a folder is scanned, a manifest read; nothing is
    loaded). Raises DatasetError."""
    kind, path = parse_spec(spec)
    if kind == "imagefolder":
        scan_imagefolder(path)
    elif kind == "prepared":
        from workers.prepared import PreparedError, read_manifest

        try:
            read_manifest(path)
        except PreparedError as e:
            raise DatasetError(str(e)) from None


def scan_imagefolder(root: str | os.PathLike) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Classes and (file, label) lists of ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Raises:
        DatasetError: a missing folder, no classes, an empty split, or val classes not in train.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist; give a folder with train/ and val/ inside")
    splits = {}
    classes: list[str] = []
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DatasetError(f"{str(d)!r} is missing; an image folder needs train/<class>/ and val/<class>/")
        names = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        if split == "train":
            classes = names
            if len(classes) < 2:
                raise DatasetError(f"{str(d)!r} has {len(classes)} class folders; it needs at least 2")
        else:
            extra = sorted(set(names) - set(classes))
            if extra:
                raise DatasetError(f"{str(d)!r} has classes not in train/: {extra}")
        files = []
        for label, name in enumerate(classes):
            cdir = d / name
            if cdir.is_dir():
                files += [(p, label) for p in sorted(cdir.iterdir())
                          if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        if not files:
            raise DatasetError(f"{str(d)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        splits[split] = files
    return classes, splits


def num_classes_of(spec: str) -> int:
    kind, path = parse_spec(spec)
    if kind == "synthetic":
        return SYNTHETIC_CLASSES
    if kind == "prepared":
        from workers.prepared import read_manifest

        return len(read_manifest(path)["classes"])
    return len(scan_imagefolder(path)[0])


def files_digest(files, root: str | os.PathLike | None = None) -> str:
    """SHA-256 of (path, label, size, modification time) of each of ``files`` ((path, label)
    pairs), paths relative to ``root`` when given: what identifies an image folder as it is on
    disk (a file added, removed, changed or touched gives another digest)."""
    import hashlib

    h = hashlib.sha256()
    for path, label in files:
        st = Path(path).stat()
        name = Path(path).relative_to(root) if root is not None else path
        h.update(f"{name}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()

