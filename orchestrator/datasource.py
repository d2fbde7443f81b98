"""Where a dataset lives, what trials and jobs read of it, and its copy on each node.

``--dataset imagefolder:PATH`` is prepared implicitly (``for_workers``): on the driver, before
anything trains, into ``ORCH_PREPARED_CACHE`` (default ``~/.cache/orch/prepared``, one folder per
source folder and content), with ``orch data prepare``'s rules; a folder prepared before and
unchanged since (every file's path, size and modification time) is not prepared again, a
changed one gets a new preparation. Trials and jobs then read ``prepared:<that folder>``; the
search and scale records keep the folder the user named. On several nodes that folder must be a
shared mount (``check_reach``).

``--dataset prepared:LOCATION`` takes a local folder, a folder on a shared mount, or a URL
(``s3://bucket/prefix``; any scheme fsspec has a filesystem for, with its package installed:
``pip install 'orch[s3]'`` for S3). A local folder is read in place. A URL, or a folder on a
network filesystem (NFS, SMB, Lustre, a FUSE mount…), is copied to the node's local disk once, by
the first trial or job that needs it there, under a lock: each shard is downloaded to a temporary
file, checked against the manifest's SHA-256 and renamed into place, and the manifest is written
last (a copy with a manifest is whole; a killed copy is finished by the next one). Copies live in
``ORCH_SHARD_CACHE`` (default ``~/.cache/orch/shards``), one folder per manifest digest, and the
folder is kept under ``ORCH_SHARD_CACHE_GB`` (default ``CACHE_GB``): copies not in use are
deleted, least recently used first, to make room. A trial or job holds a shared lock on its copy
while it runs, so no copy in use is deleted.

S3 settings come from the usual AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO), on the driver and every node.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from pathlib import Path

from workers import prepared as fmt
from workers.datasets import DatasetError, parse_spec
from workers.defaults import cache_folder

#: Default size cap of a node's shard cache (ImageNet prepared: about 150 GB).
CACHE_GB = 256.0
#: Filesystem types read over the network: a dataset there is copied to local disk.
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "9p", "beegfs",
              "afs", "davfs", "virtiofs"}


def is_url(location: str) -> bool:
    return "://" in location


def _fs(url: str):
    """(fsspec filesystem, path) of ``url``; a one-line error when its package is missing."""
    try:
        import fsspec
    except ImportError:
        raise DatasetError(f"{url}: reading a URL needs fsspec; pip install 'orch[s3]'") from None
    opts = {}
    if url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        opts["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    try:
        return fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        raise DatasetError(f"{url}: {str(e).splitlines()[0]} (for s3:// pip install 'orch[s3]')") from None


def _mount_type(path: Path) -> str:
    """The filesystem type of the mount ``path`` is on ('' when unknown)."""
    try:
        path = path.resolve()
        best, kind = "", ""
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                point = parts[1].replace("\\040", " ")
                if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, kind = point, parts[2]
        return kind
    except OSError:
        return ""


def needs_copy(location: str) -> bool:
    """A URL, or a folder on a network filesystem: read from a node-local copy."""
    if is_url(location):
        return True
    kind = _mount_type(Path(location).expanduser())
    return kind in NETWORK_FS or kind.startswith("fuse.")


def manifest_bytes(location: str) -> bytes:
    """The manifest of the prepared dataset at ``location`` (local or URL), as stored."""
    if not is_url(location):
        try:
            return fmt.manifest_bytes(location)
        except fmt.PreparedError as e:
            raise DatasetError(str(e)) from None
    fs, path = _fs(location)
    try:
        return fs.cat_file(f"{path.rstrip('/')}/{fmt.MANIFEST}")
    except FileNotFoundError:
        raise DatasetError(f"{location} has no {fmt.MANIFEST}: not a prepared dataset, or its upload did not finish; "
                           f"upload the whole folder `orch data prepare` wrote") from None
    except Exception as e:  # credentials, endpoint, network: botocore's and aiohttp's own errors
        raise DatasetError(f"cannot read {location}/{fmt.MANIFEST}: {str(e).splitlines()[0] or type(e).__name__}; "
                           f"check the URL and the AWS_* settings (AWS_ENDPOINT_URL for a non-AWS server)") from None


def parse_manifest(raw: bytes, location: str) -> dict:
    """``raw`` (the manifest of ``location``) checked as a local one is; DatasetError."""
    try:
        return fmt.parse_manifest(raw, f"{location.rstrip('/')}/{fmt.MANIFEST}")
    except fmt.PreparedError as e:
        raise DatasetError(str(e)) from None


def read_manifest(location: str) -> dict:
    """The manifest at ``location`` (local or URL), checked like a local one."""
    return parse_manifest(manifest_bytes(location), location)


_SCANS: dict[str, object] = {}


def _image_folder(location: str):
    """prepare's view of an image folder (the one implicit preparation uses), scanned once per
    process (one command checks, counts and prepares it); DatasetError."""
    from orchestrator.prepare import PrepareError, open_source

    if location not in _SCANS:
        try:
            _SCANS[location] = open_source(f"imagefolder:{location}")
        except PrepareError as e:
            raise DatasetError(str(e)) from None
    return _SCANS[location]


def check(spec: str) -> None:
    """``spec`` names a dataset that can be read (a URL's manifest is fetched, an image folder
    scanned as preparing it will); DatasetError."""
    kind, location = parse_spec(spec)
    if kind == "prepared" and is_url(location):
        read_manifest(location)
        return
    if kind == "imagefolder":
        _image_folder(location)
        return
    if kind == "prepared":
        read_manifest(location)
        return
    from workers.datasets import check as check_local

    check_local(spec)


def num_classes(spec: str) -> int:
    kind, location = parse_spec(spec)
    if kind == "prepared" and is_url(location):
        return len(read_manifest(location)["classes"])
    if kind == "imagefolder":  # the classes its preparation keeps (empty class folders are dropped)
        return len(_image_folder(location).classes)
    from workers.datasets import num_classes_of

    return num_classes_of(spec)


def prepared_cache() -> Path:
    return cache_folder("ORCH_PREPARED_CACHE", "prepared")


_FOR_WORKERS: dict[str, str] = {}


def for_workers(spec: str, *, prepare=None) -> str:
    """The dataset spec trials and jobs read for ``spec``: an image folder's implicit preparation
    (made now when this content of the folder has none; ``prepare(source, dest)`` does it,
    default ``orchestrator.prepare.prepare``: the CLI passes one with a progress bar), anything
    else as given. Once per process and spec.

    A preparation is named by the folder's path and content (prepare's fingerprint: every file's
    path, size and modification time), so a changed folder gets a new one and a job still
    reading the old one is not disturbed; it is made under a lock (two commands preparing the
    same folder wait for each other, then share it)."""
    kind, location = parse_spec(spec)
    if kind != "imagefolder":
        return spec
    if spec not in _FOR_WORKERS:
        from orchestrator import prepare as prep

        source = _image_folder(location)
        name = hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:24]
        dest = prepared_cache() / f"{name}-{source.fingerprint[:16]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                (prepare or prep.prepare)(source, dest)
            except prep.PrepareError as e:
                raise prep.PrepareError(
                    f"{e}. To train on the rest, prepare it yourself with `orch data prepare {spec} DEST "
                    f"--skip-bad` and pass --dataset prepared:DEST", usage=False) from None
        _FOR_WORKERS[spec] = f"prepared:{dest}"
    return _FOR_WORKERS[spec]


def check_reach(spec: str, nodes: int, address: str | None) -> None:
    """An image folder's implicit preparation lies on this machine: on a cluster of several
    nodes (or a remote one) every node must reach it, so its folder must be a shared mount."""
    from orchestrator.cluster import beyond_this_machine

    kind, _ = parse_spec(spec)
    where = beyond_this_machine(nodes, address)
    if kind != "imagefolder" or where is None:
        return
    cache = prepared_cache()
    if not needs_copy(str(cache)):
        raise DatasetError(f"this is {where}: {spec} is prepared into {cache} on this machine, which the other "
                           f"nodes cannot read; point ORCH_PREPARED_CACHE at a folder every node mounts, or run "
                           f"`orch data prepare {spec} DEST` into one (or upload DEST to S3) and pass "
                           f"--dataset prepared:DEST")


def cache_dir() -> Path:
    return cache_folder("ORCH_SHARD_CACHE", "shards")


def cap_bytes() -> int:
    raw = os.environ.get("ORCH_SHARD_CACHE_GB")
    try:
        gb = float(raw) if raw else CACHE_GB
    except ValueError:
        raise DatasetError(f"ORCH_SHARD_CACHE_GB={raw!r} is not a number of GB") from None
    return int(gb * 1e9)


def _files(manifest: dict) -> list[tuple[str, str]]:
    """(file name, SHA-256) of every file of the dataset but the manifest."""
    out = []
    for split in fmt.SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            out += [(shard["data"], shard["sha256"]), (shard["index"], shard["index_sha256"])]
    return out


def _size(manifest: dict) -> int:
    # the shards' bytes; an index is 56 bytes per image plus its header
    return sum(s["bytes"] + 56 * s["count"] + 128 for sp in manifest["splits"].values() for s in sp["shards"])


def _used_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _make_room(cache: Path, keep: Path, need: int, cap: int) -> None:
    """Delete whole copies other than ``keep``, least recently used first, that no one is using,
    until ``need`` more bytes fit under ``cap``; DatasetError when they cannot."""
    if need > cap:
        raise DatasetError(f"the dataset ({need / 1e9:.1f} GB) is larger than this node's shard cache cap "
                           f"({cap / 1e9:.1f} GB); raise ORCH_SHARD_CACHE_GB or point ORCH_SHARD_CACHE at a bigger disk")
    def last_used(p: Path) -> float:
        try:
            return (p / ".used").stat().st_mtime
        except OSError:
            return 0.0

    others = sorted((p for p in cache.iterdir() if p.is_dir() and p != keep and not p.name.endswith(".gone")),
                    key=last_used)
    used = _used_bytes(cache)
    for other in others:
        if used + need <= cap:
            return
        with open(other.with_suffix(".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use by a trial or job on this node
            size = _used_bytes(other)
            gone = other.with_name(f"{other.name}.gone")
            os.replace(other, gone)  # first: a copy is whole or absent, never half deleted
            shutil.rmtree(gone, ignore_errors=True)
            used -= size
    if used + need > cap:
        raise DatasetError(f"this node's shard cache {cache} has no room for {need / 1e9:.1f} GB under its cap "
                           f"({cap / 1e9:.1f} GB; the rest is in use); raise ORCH_SHARD_CACHE_GB")


def local_copy(location: str, *, log=print) -> Path:
    """The node-local copy of the prepared dataset at ``location`` (made now if this node has
    none), checked against the manifest's checksums."""
    raw = manifest_bytes(location)
    manifest = parse_manifest(raw, location)
    name = hashlib.sha256(raw).hexdigest()[:32]
    cache = cache_dir()
    dest = cache / name
    if (dest / fmt.MANIFEST).exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    for gone in cache.glob("*.gone"):  # an eviction killed half way
        shutil.rmtree(gone, ignore_errors=True)
    # Copying takes its own lock: the use lock (in_use's shared one) would let a rank that has
    # its copy block another rank of the same job still waiting to copy.
    with open(dest.with_suffix(".copy-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / fmt.MANIFEST).exists():  # another process copied it while this one waited
            return dest
        dest.mkdir(exist_ok=True)
        for stale in dest.glob("*.tmp*"):  # a killed copy's partial files (we hold the copy lock)
            stale.unlink(missing_ok=True)
        (dest / ".used").touch()
        files = _files(manifest)
        missing = [(f, sha) for f, sha in files if not (dest / f).exists()]
        _make_room(cache, dest, _size(manifest) - sum((dest / f).stat().st_size for f, _ in files if (dest / f).exists()),
                   cap_bytes())
        if missing:
            log(f"orch: copying {len(missing)} files of {location} to {dest} ({_size(manifest) / 1e6:,.0f} MB)")
        t0 = time.perf_counter()
        fs, root = _fs(location) if is_url(location) else (None, str(Path(location).expanduser()))
        for k, (f, sha) in enumerate(missing):
            tmp = dest / f"{f}.tmp-{os.getpid()}"
            src = f"{root.rstrip('/')}/{f}"
            try:
                if fs is not None:
                    fs.get_file(src, str(tmp))
                else:
                    shutil.copyfile(src, tmp)
            except FileNotFoundError:
                tmp.unlink(missing_ok=True)
                raise DatasetError(f"{src} is missing: the dataset at {location} is incomplete; upload the whole "
                                   f"folder `orch data prepare` wrote") from None
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise DatasetError(f"copying {src} to {dest} failed ({e.strerror or e}); free space there or point "
                                   f"ORCH_SHARD_CACHE at a local disk with room") from None
            if fmt.sha256_of(tmp) != sha:
                tmp.unlink()
                raise DatasetError(f"{src} does not match its checksum in the manifest (damaged or changed since it "
                                   f"was prepared); prepare and upload the dataset again")
            os.replace(tmp, dest / f)
            if len(missing) > 10 and (k + 1) % max(1, len(missing) // 10) == 0:
                log(f"orch: {k + 1}/{len(missing)} files copied ({time.perf_counter() - t0:.0f} s)")
        tmp = dest / f"{fmt.MANIFEST}.tmp"
        try:
            tmp.write_bytes(raw)
            os.replace(tmp, dest / fmt.MANIFEST)  # last: its presence means the copy is whole
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DatasetError(f"writing {dest / fmt.MANIFEST} failed ({e.strerror or e}); free space there or point "
                               f"ORCH_SHARD_CACHE at a local disk with room") from None
    return dest


@contextlib.contextmanager
def in_use(spec: str, *, log=print):
    """``spec`` as this node reads it: a prepared dataset that ``needs_copy`` becomes its
    node-local copy, held (a shared lock) until the block ends; anything else is unchanged."""
    kind, location = parse_spec(spec)
    if kind != "prepared" or not needs_copy(location):
        yield spec
        return
    dest = local_copy(location, log=log)
    with open(dest.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        while not (dest / fmt.MANIFEST).exists():  # evicted for room between the copy and the lock
            fcntl.flock(lock, fcntl.LOCK_UN)
            dest = local_copy(location, log=log)
            fcntl.flock(lock, fcntl.LOCK_SH)
        os.utime(dest / ".used")
        yield f"prepared:{dest}"
