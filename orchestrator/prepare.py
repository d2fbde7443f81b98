"""`orch data prepare`: an image folder or a Parquet folder into a prepared dataset
(``workers/prepared.py`` describes the format).

- **Sources.** ``imagefolder:PATH`` (``train/<class>/…``, ``val/<class>/…``) and ``parquet:PATH``
  (a folder of Parquet files with an image column, bytes or Hugging Face's ``{bytes, path}``
  struct, and a label column, ints or strings; the split is read from each file's name:
  ``train…``, ``validation…``/``val…``, else ``test…`` stands in for a missing validation split).
- **Images.** A baseline JPEG (RGB or grayscale, upright, short side within the cap) is kept
  byte for byte. Anything else is re-encoded as a baseline JPEG (quality ``QUALITY``): PNG, WebP,
  BMP, TIFF, GIF, progressive and CMYK JPEGs (which GPU decoders do not read), EXIF-rotated photos
  (turned upright: decoders ignore the tag), images with transparency (laid over white), and
  images whose short side is above ``--short-side`` (downscaled to it).
- **Messy folders.** Hidden files (``.DS_Store``, ``._x.jpg``) and files without an image suffix
  are ignored; an empty class folder is dropped (said, and listed in the manifest); a file that
  is not a readable image (empty, truncated, text) is a one-line error naming it, or with
  ``--skip-bad`` a count and a list in the manifest; val classes with no train images likewise;
  the same image in train and val is counted and said (leakage), not removed.
- **Parallel, restartable, atomic.** Worker processes encode, this process writes shards in
  order; each finished shard is renamed into place and recorded in ``.prepare-state.json``.
  A killed prepare leaves no manifest; running it again continues after the last finished
  shard when the source and options are the same, else starts over. The manifest is written
  last. Preparing into a folder that holds a complete dataset of the same source and options
  does nothing; of a source that changed since, prepares again.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from orchestrator.errors import InputError
from workers import prepared as fmt
from workers.datasets import files_digest

#: Default cap of an image's short side: B7's 600 px crops at full detail, and ImageNet's median
#: photo (about 500 x 375) is kept as it is.
SHORT_SIDE = 640
#: JPEG quality of re-encoded images.
QUALITY = 95
#: Default shard size.
SHARD_MB = 256
#: Images handed to the workers at a time (bounds memory with Parquet sources).
WINDOW = 512
#: Suffixes read from an image folder (case-insensitive).
SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
STATE = ".prepare-state.json"


class PrepareError(InputError):
    """The source cannot be prepared as asked; the message names the file and the fix."""


@dataclass
class Source:
    kind: str  # imagefolder | parquet
    path: Path
    classes: list[str]
    counts: dict[str, int]  # images per split, before decoding
    fingerprint: str
    items: Callable[[str, int], Iterator[tuple[str, int, object]]]  # (split, start) -> (name, label, path|bytes)
    notes: list[str] = field(default_factory=list)
    dropped_classes: list[str] = field(default_factory=list)
    unknown: dict[str, list[str]] = field(default_factory=dict)  # split -> names of images of unknown classes


def _hidden(name: str) -> bool:
    return name.startswith(".")


# --------------------------------------------------------------------------- sources


def scan_imagefolder(root: Path) -> Source:
    if not root.is_dir():
        raise PrepareError(f"image folder {str(root)!r} does not exist; give a folder with train/ and val/ inside")
    files: dict[str, dict[str, list[Path]]] = {}
    for split in fmt.SPLITS:
        d = root / split
        if not d.is_dir():
            raise PrepareError(f"{str(d)!r} is missing; an image folder needs train/<class>/ and val/<class>/")
        files[split] = {c.name: sorted(p for p in c.rglob("*") if p.is_file() and not _hidden(p.name)
                                       and p.suffix.lower() in SUFFIXES and not any(_hidden(q) for q in p.relative_to(c).parts))
                        for c in sorted(d.iterdir(), key=lambda c: c.name) if c.is_dir() and not _hidden(c.name)}
    dropped = [c for c, fs in files["train"].items() if not fs]
    classes = [c for c, fs in files["train"].items() if fs]
    if len(classes) < 2:
        raise PrepareError(f"{str(root / 'train')!r} has {len(classes)} class folders with images; it needs at least 2")
    label = {c: i for i, c in enumerate(classes)}
    listed: dict[str, list[tuple[str, int, str]]] = {}
    unknown: dict[str, list[str]] = {}
    for split in fmt.SPLITS:
        entries = []
        for c, fs in files[split].items():
            for p in fs:
                rel = str(p.relative_to(root))
                if c in label:
                    entries.append((rel, label[c], str(p)))
                else:
                    unknown.setdefault(split, []).append(rel)
        random.Random(0).shuffle(entries)  # shards mix the classes (streaming reads them in order)
        listed[split] = entries
    if not listed["val"]:
        raise PrepareError(f"{str(root / 'val')!r} has no images of the train classes")
    fingerprint = files_digest([(p, c) for split in fmt.SPLITS for c, fs in files[split].items() for p in fs], root)

    def items(split: str, start: int):
        yield from listed[split][start:]

    notes = [f"empty class folders dropped: {', '.join(dropped)}"] if dropped else []
    return Source("imagefolder", root, classes, {s: len(listed[s]) for s in fmt.SPLITS}, fingerprint, items,
                  notes, dropped, unknown)


_SPLIT_NAMES = (("train", ("train",)), ("val", ("validation", "valid", "val")), ("test", ("test",)))


def _split_of(path: Path) -> str | None:
    name = path.name.lower()
    for split, prefixes in _SPLIT_NAMES:
        if any(name.startswith(p) for p in prefixes) or any(part.lower() in prefixes for part in path.parts[:-1]):
            return split
    return None


def scan_parquet(root: Path, image_column: str | None, label_column: str | None) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not root.is_dir():
        raise PrepareError(f"Parquet folder {str(root)!r} does not exist")
    paths = sorted(p for p in root.rglob("*.parquet") if not _hidden(p.name))
    if not paths:
        raise PrepareError(f"{str(root)!r} has no .parquet files")
    by_split: dict[str, list[Path]] = {}
    for p in paths:
        split = _split_of(p.relative_to(root))
        if split is None:
            raise PrepareError(f"{str(p)!r}: its split is not in its name; name the files train-….parquet and "
                               f"validation-….parquet (or put them in train/ and validation/)")
        by_split.setdefault(split, []).append(p)
    notes = []
    if "val" not in by_split and "test" in by_split:
        by_split["val"] = by_split.pop("test")
        notes.append("no validation files: the test files are the val split")
    for split in fmt.SPLITS:
        if split not in by_split:
            raise PrepareError(f"{str(root)!r} has no {split} files ({'train' if split == 'train' else 'validation'}-….parquet)")
    schema = pq.read_schema(by_split["train"][0])

    def pick(given, wanted, ok, what, option):
        if given:
            if given not in schema.names:
                raise PrepareError(f"{str(by_split['train'][0])!r} has no column {given!r} (columns: "
                                   f"{', '.join(schema.names)}); fix {option}")
            if not ok(schema.field(given).type):
                raise PrepareError(f"column {given!r} is not {what}; fix {option}")
            return given
        named = [n for n in wanted if n in schema.names and ok(schema.field(n).type)]
        typed = [f.name for f in schema if ok(f.type)]
        if named or len(typed) == 1:
            return (named or typed)[0]
        raise PrepareError(f"cannot tell which column holds {what} (columns: {', '.join(schema.names)}); "
                           f"name it with {option}")

    def is_image(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)

    def is_label(t) -> bool:
        return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)

    image_col = pick(image_column, ("image", "img", "jpg", "png"), is_image, "the images", "--image-column")
    label_col = pick(label_column, ("label", "labels", "class", "target", "fine_label"), is_label,
                     "the labels", "--label-column")
    classes = None
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            feature = json.loads(meta)["info"]["features"][label_col]
            if feature.get("_type") == "ClassLabel" and feature.get("names"):
                classes = list(feature["names"])
        except (KeyError, TypeError, ValueError):
            pass
    string_labels = pa.types.is_string(schema.field(label_col).type) or pa.types.is_large_string(schema.field(label_col).type)
    counts = {s: sum(pq.ParquetFile(p).metadata.num_rows for p in by_split[s]) for s in fmt.SPLITS}
    if classes is None:
        values = set()
        for s in fmt.SPLITS:
            for p in by_split[s]:
                values |= set(pq.read_table(p, columns=[label_col]).column(0).drop_null().to_pylist())
        if string_labels:
            classes = sorted(values)
        else:
            if min(values) < 0:
                raise PrepareError(f"column {label_col!r} has negative labels; labels are 0..classes-1")
            classes = [str(i) for i in range(max(values) + 1)]
    index = {c: i for i, c in enumerate(classes)}
    h = hashlib.sha256(f"{image_col}\0{label_col}".encode())
    for s in fmt.SPLITS:
        for p in by_split[s]:
            st = p.stat()
            h.update(f"{s}\0{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())

    def items(split: str, start: int):
        seen = 0
        for p in by_split[split]:
            f = pq.ParquetFile(p)
            rows = f.metadata.num_rows
            if seen + rows <= start:
                seen += rows
                continue
            for batch in f.iter_batches(batch_size=256, columns=[image_col, label_col]):
                images = batch.column(0).to_pylist()
                labels = batch.column(1).to_pylist()
                for img, lab in zip(images, labels):
                    if seen >= start:
                        data = img.get("bytes") if isinstance(img, dict) else img
                        if lab is None:
                            label = -1
                        elif string_labels:
                            label = index.get(lab, -1)
                        else:
                            label = int(lab) if 0 <= int(lab) < len(classes) else -1
                        yield f"{p.relative_to(root)}#row{seen}", label, bytes(data or b"")
                    seen += 1

    return Source("parquet", root, classes, counts, h.hexdigest(), items, notes)


def open_source(spec: str, *, image_column: str | None = None, label_column: str | None = None) -> Source:
    kind, _, path = spec.partition(":")
    if kind == "imagefolder" and path:
        return scan_imagefolder(Path(path).expanduser())
    if kind == "parquet" and path:
        import pyarrow as pa

        try:
            return scan_parquet(Path(path).expanduser(), image_column, label_column)
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"{path}: a Parquet file cannot be read ({str(e).splitlines()[0]}); "
                               f"replace or remove it") from None
    raise PrepareError(f"unknown source {spec!r}: use imagefolder:PATH or parquet:PATH")


# --------------------------------------------------------------------------- one image


def encode(job: tuple) -> tuple:
    """In a worker process: ``(name, label, path | bytes, short_side, quality)`` ->
    ``("ok", name, label, jpeg, width, height, digest, reencoded)`` or ``("bad", name, reason)``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name, label, src, short_side, quality = job
    try:
        raw = src if isinstance(src, bytes) else Path(src).read_bytes()
    except OSError as e:
        return "bad", name, f"cannot be read ({e.strerror or e})"
    if not raw:
        return "bad", name, "is empty (0 bytes)"
    digest = hashlib.sha1(raw).digest()[:16]
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except UnidentifiedImageError:
        return "bad", name, "is not an image Pillow can read (text or another format with an image suffix?)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return "bad", name, f"cannot be decoded ({str(e).splitlines()[0] if str(e) else type(e).__name__}; truncated?)"
    upright = im.getexif().get(0x0112, 1) in (0, 1)
    if (im.format == "JPEG" and im.mode in ("RGB", "L") and upright and min(im.size) <= short_side
            and not im.info.get("progressive") and not im.info.get("progression")):
        return "ok", name, label, raw, im.size[0], im.size[1], digest, False
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        elif im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        w, h = im.size
        scale = min(1.0, short_side / min(w, h), 65500 / max(w, h))
        if scale < 1.0:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
    except (OSError, ValueError) as e:
        return "bad", name, f"cannot be converted ({e})"
    return "ok", name, label, buf.getvalue(), im.size[0], im.size[1], digest, True


# --------------------------------------------------------------------------- the writer


def _write_json(path: Path, doc) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Prepared:
    dest: Path
    manifest: dict
    resumed_shards: int
    already: bool = False


def _key(source: Source, short_side: int, shard_bytes: int) -> dict:
    return {"source": {"kind": source.kind, "path": str(source.path.resolve()), "fingerprint": source.fingerprint},
            "short_side": short_side, "quality": QUALITY, "shard_bytes": shard_bytes}


def _clear(dest: Path) -> None:
    for p in dest.iterdir():
        if p.name in (fmt.MANIFEST, STATE) or p.name.endswith((".jpgs", ".idx.npy", ".tmp")):
            p.unlink()


def prepare(source: Source, dest: Path, **kw) -> Prepared:
    """Prepare ``source`` into ``dest`` (see the module doc): ``short_side``, ``shard_mb``,
    ``workers``, ``skip_bad``; ``on_progress(split, done, total)`` after each image;
    ``on_note(line)`` for what the user should know. A write that fails (a full disk, a folder
    that is not writable) is a PrepareError; what was finished stays for the next run."""
    try:
        return _prepare(source, dest, **kw)
    except OSError as e:
        where = e.filename or dest
        raise PrepareError(f"writing {where} failed: {e.strerror or e}; free space or choose another DEST, then run "
                           f"the same command again (finished shards are kept)", usage=False) from None


def _prepare(source: Source, dest: Path, *, short_side: int = SHORT_SIDE, shard_mb: float = SHARD_MB,
             workers: int | None = None, skip_bad: bool = False, on_progress=None, on_note=None) -> Prepared:
    note = on_note or (lambda line: None)
    shard_bytes = max(1, int(shard_mb * (1 << 20)))
    key = _key(source, short_side, shard_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path, state_path = dest / fmt.MANIFEST, dest / STATE
    if manifest_path.exists():
        try:
            old = fmt.read_manifest(dest)
        except fmt.PreparedError:
            old = {}
        if {k: old.get(k) for k in key} == key:
            return Prepared(dest, old, 0, already=True)
        if old.get("source", {}).get("path") == key["source"]["path"]:
            note(f"{source.path} changed since {dest} was prepared (or the options did): preparing it again")
        manifest_path.unlink()  # from here until the end there is no complete dataset here
    elif any(p for p in dest.iterdir() if p.name != STATE and not p.name.endswith((".jpgs", ".idx.npy", ".tmp"))) \
            and not state_path.exists():
        raise PrepareError(f"{dest} is not empty and holds no prepared dataset; choose an empty or new folder")
    state = None
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None
        if state is not None and state.get("key") != key:
            note(f"an unfinished preparation in {dest} was of another source or options: starting over")
            state = None
    if state is None:
        _clear(dest)
        state = {"key": key, "shards": []}
        _write_json(state_path, state)
    resumed = len(state["shards"])
    if resumed:
        note(f"continuing an unfinished preparation: {resumed} shards were written before")

    for split, names in source.unknown.items():
        if not skip_bad:
            raise PrepareError(f"{split}/ has images of classes with no train/ images ({len(names)}, e.g. "
                               f"{names[0]!r}); add train images for them, remove them, or pass --skip-bad")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads (progress bars)
    procs = max(1, workers or os.cpu_count() or 1)
    with ctx.Pool(procs) as pool:
        for split in fmt.SPLITS:
            done = [s for s in state["shards"] if s["split"] == split]
            k = len(done)
            start = done[-1]["end"] if done else 0
            consumed = start
            total = source.counts[split]
            if on_progress:
                on_progress(split, consumed, total)
            buf = bytearray()
            rows: list[list[int]] = []
            skipped: list[dict] = []
            reencoded = 0

            def close(end: int):
                """The shard as it is: written, renamed into place, recorded (``end``: the source
                items it covers end before this one, skipped ones included)."""
                nonlocal k, buf, rows, skipped, reencoded
                data_name, idx_name = fmt.shard_names(split, k)
                for name, write in ((data_name, lambda f: f.write(buf)),
                                    (idx_name, lambda f: np.save(f, np.asarray(rows, dtype=np.int64).reshape(-1, fmt.INDEX_COLUMNS)))):
                    tmp = dest / f"{name}.tmp"
                    with open(tmp, "wb") as f:
                        write(f)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, dest / name)
                state["shards"].append({
                    "split": split, "data": data_name, "index": idx_name, "count": len(rows), "bytes": len(buf),
                    "sha256": fmt.sha256_of(dest / data_name), "index_sha256": fmt.sha256_of(dest / idx_name),
                    "end": end, "skipped": skipped, "reencoded": reencoded})
                _write_json(state_path, state)
                k, buf, rows, skipped, reencoded = k + 1, bytearray(), [], [], 0

            it = source.items(split, start)
            while True:
                window = [(name, label, src, short_side, QUALITY) for name, label, src in itertools.islice(it, WINDOW)]
                if not window:
                    break
                for res in pool.imap(encode, window, chunksize=max(1, min(16, len(window) // procs))):
                    consumed += 1
                    if on_progress:
                        on_progress(split, consumed, total)
                    if res[0] == "bad" or res[2] < 0:
                        name, reason = (res[1], res[2]) if res[0] == "bad" else (res[1], "has a label that is not a class")
                        if not skip_bad:
                            raise PrepareError(f"{source.path / name if source.kind == 'imagefolder' else name} "
                                               f"{reason}; fix or remove it, or pass --skip-bad to skip such files")
                        skipped.append({"file": name, "reason": reason})
                        continue
                    _, name, label, jpeg, w, h, digest, again = res
                    if rows and len(buf) + len(jpeg) > shard_bytes:
                        close(consumed - 1)  # this image opens the next shard
                    hi, lo = (int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8))
                    rows.append([len(buf), len(jpeg), label, w, h, hi, lo])
                    buf += jpeg
                    reencoded += int(again)
            if rows or skipped:
                close(consumed)
    return Prepared(dest, _finish(source, dest, state, key, skip_bad, note), resumed)


def _finish(source: Source, dest: Path, state: dict, key: dict, skip_bad: bool, note) -> dict:
    """The manifest, from the finished shards; written last."""
    splits, skipped, reencoded, digests = {}, [], 0, {}
    for split in fmt.SPLITS:
        shards = [s for s in state["shards"] if s["split"] == split]
        for s in shards:
            skipped += [dict(x, split=split) for x in s["skipped"]]
            reencoded += s["reencoded"]
        count = sum(s["count"] for s in shards)
        if count == 0:
            raise PrepareError(f"no image of {split}/ could be read; see the files listed above")
        splits[split] = {"count": count, "shards": [{k: s[k] for k in ("data", "index", "count", "bytes", "sha256",
                                                                        "index_sha256")} for s in shards if s["count"]]}
        d = set()
        for s in shards:
            if s["count"]:
                idx = np.load(dest / s["index"])
                d |= set(map(tuple, idx[:, [fmt.DIGEST_HI, fmt.DIGEST_LO]].tolist()))
        digests[split] = d
    for split, names in source.unknown.items():
        skipped += [{"file": n, "split": split, "reason": "its class has no train/ images"} for n in names]
    both = len(digests["train"] & digests["val"])
    if both:
        note(f"{both} images are in both train and val (the same file contents): val accuracy will be optimistic")
    if skipped:
        note(f"{len(skipped)} files skipped (--skip-bad); the manifest lists them")
    for line in source.notes:
        note(line)
    manifest = {"format": fmt.FORMAT, "version": fmt.VERSION, **key, "classes": source.classes, "splits": splits,
                "reencoded": reencoded, "skipped": skipped, "dropped_classes": source.dropped_classes,
                "train_val_duplicates": both, "notes": source.notes,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_json(dest / fmt.MANIFEST, manifest)
    (dest / STATE).unlink(missing_ok=True)
    return manifest
