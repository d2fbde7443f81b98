"""One consistent, atomically written copy of a search's Tune driver state, for ``--resume``.

Tune saves its driver state (the trial list, the search generator's count of trials created, the
searcher with its Optuna study) to a staging folder on the driver, one file after another, then
copies that folder to the storage in a background thread: the files in parallel, each rewritten
in place. A driver killed during a copy leaves the storage with files of different moments, or
half written. Measured by polling the storage during one 4-trial search (11,911 reads): once a
trial list of 3 beside a generator that had counted 4, and 5 empty or cut-off files. Restored
from the first, Tune runs 3 of the 4 trials and calls the search done; from the second, it
cannot restore at all.

So the driver keeps its own copy next to the experiment folder: ``<storage>/<search id>.orch-state``,
a zip of the state files of Tune's newest save, taken right after Tune wrote them (Tune asks its
callbacks for their state at the end of each save: :class:`Snapshots` hooks in there) and
written to a temporary name, then moved over the last copy. ``--resume`` puts those files back
into the experiment folder before Tune restores it (:func:`put_back`).
"""

from __future__ import annotations

import io
import logging
import re
import uuid
import zipfile
from pathlib import Path

SUFFIX = ".orch-state"
# Tune's per-save files end in "-<session>.<ext>", the session being the driver's start time.
_SESSION = re.compile(r"^(?P<kind>[a-z_-]+)-(?P<session>\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.(json|pkl)$")
# Kept out: callback state (orch's callbacks keep none; Tune would restore it otherwise).
_SKIP = ("callback-states",)

log = logging.getLogger("orch.tunestate")


def snapshot_path(experiment_path: str) -> str:
    """Where the copy of the experiment at ``experiment_path`` (a folder or URI) lives."""
    return experiment_path.rstrip("/") + SUFFIX


def _fs(path: str):
    from ray.train._internal.storage import get_fs_and_path

    return get_fs_and_path(path)


def state_files(folder: Path) -> tuple[str, dict[str, bytes]] | None:
    """The session and the files of Tune's newest save in ``folder`` (its staging folder, or the
    experiment folder in the storage)."""
    saves = {}
    for p in folder.iterdir():
        m = _SESSION.match(p.name)
        if m and m["kind"] not in _SKIP and p.is_file():
            saves.setdefault(m["session"], []).append(p)
    if not saves:
        return None
    session = max(saves)
    return session, {p.name: p.read_bytes() for p in saves[session]}


def _write_atomic(fs, fs_path: str, data: bytes) -> None:
    tmp = f"{fs_path}.tmp-{uuid.uuid4().hex}"
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, fs_path)  # a rename on a local disk; one whole object on an object store


def take(staging: str, experiment_fs_path: str, fs) -> bool:
    """Copy the files of Tune's newest save in ``staging`` to ``<experiment>.orch-state`` on
    ``fs``, atomically. False if Tune saved nothing there yet."""
    found = state_files(Path(staging))
    if found is None:
        return False
    session, files = found
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("session", session)
        for name, data in sorted(files.items()):
            z.writestr(f"files/{name}", data)
    _write_atomic(fs, snapshot_path(experiment_fs_path), buf.getvalue())
    return True


def exists(experiment_path: str) -> bool:
    import pyarrow.fs

    fs, fs_path = _fs(snapshot_path(experiment_path))
    return fs.get_file_info(fs_path).type == pyarrow.fs.FileType.File


def read(experiment_path: str) -> tuple[str, dict[str, bytes]] | None:
    """The session and files of the copy of ``experiment_path``'s state; None if there is none."""
    if not exists(experiment_path):
        return None
    fs, fs_path = _fs(snapshot_path(experiment_path))
    with fs.open_input_stream(fs_path) as f:
        data = f.readall()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        session = z.read("session").decode()
        files = {}
        for name in z.namelist():
            if name.startswith("files/"):
                base = name[len("files/"):]
                m = _SESSION.match(base)
                if not m or m["session"] != session:  # only Tune's state files, by bare name
                    raise ValueError(f"unexpected entry {name!r}")
                files[base] = z.read(name)
    return session, files


def put_back(experiment_path: str) -> bool:
    """Before Tune restores ``experiment_path``: write the copy's files over what the storage
    holds, and remove state files of later sessions (a driver killed before its first save:
    nothing of its own). False if there is no copy (a search from before orch kept one, or
    killed before Tune's first save); Tune's files are then used as they are."""
    import pyarrow.fs

    found = read(experiment_path)
    if found is None:
        return False
    session, files = found
    fs, fs_path = _fs(experiment_path)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(fs_path, allow_not_found=True)):
        m = _SESSION.match(info.base_name)
        if m and info.type == pyarrow.fs.FileType.File and m["session"] > session and m["kind"] not in _SKIP:
            fs.delete_file(info.path)
    for name, data in files.items():
        _write_atomic(fs, f"{fs_path}/{name}", data)
    return True


class _UploadErrorsInOneLine(logging.Filter):
    """Tune logs a failed upload of its driver state with a traceback (seen once in a test of
    four searches at once: a file of the staging folder changed while its background copy ran).
    The search goes on, and --resume uses orch's copy: one line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "experiment state to storage" in str(record.msg):
            e = record.exc_info[1]
            record.msg = (f"{str(record.msg).strip().rstrip(':')}: {type(e).__name__}: {e}; "
                          f"--resume uses orch's own copy of that state")
            record.args, record.exc_info, record.exc_text, record.levelno, record.levelname = \
                (), None, None, logging.WARNING, "WARNING"
        return True


def quiet_upload_errors() -> None:
    """Install :class:`_UploadErrorsInOneLine` on Tune's experiment-state logger (once)."""
    tune_log = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, _UploadErrorsInOneLine) for f in tune_log.filters):
        tune_log.addFilter(_UploadErrorsInOneLine())


class Snapshots:
    """Takes the copy on each Tune save. Lives in orch's Tune callback (the driver): learns the
    storage from the trials (the first step that has any) and is called from the callback's
    ``get_state``, which Tune calls right after writing its own state files."""

    def __init__(self):
        self.storage = None
        self.failed = False

    def watch(self, trials) -> None:
        if self.storage is None and trials:
            self.storage = trials[0].storage

    def __call__(self) -> None:
        s = self.storage
        if s is None:
            return
        try:
            take(s.experiment_driver_staging_path, s.experiment_fs_path, s.storage_filesystem)
            self.failed = False
        except Exception as e:  # noqa: BLE001 - the search goes on; Tune's own copy remains
            if not self.failed:
                log.warning("could not save a copy of Tune's state for --resume (%s); "
                            "a resume falls back to Tune's own files", e)
            self.failed = True
