"""orch's copy of Tune's driver state (orchestrator/raytune/state.py), on real files: what it takes
from Tune's staging folder, what it puts back, and what it refuses. The search that kills a
driver and tears Tune's own copy is in tests/test_faults.py."""

import io
import logging
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest

from orchestrator.raytune import state as tunestate

OLD, NEW, LATER = "2026-11-27_10-00-00", "2026-11-27_11-00-00", "2026-11-27_12-00-00"


def staged(folder: Path) -> Path:
    """A staging folder as Tune leaves it after two driver sessions (and a save in progress)."""
    folder.mkdir(parents=True)
    for session, tag in ((OLD, b"old"), (NEW, b"new")):
        (folder / f"experiment_state-{session}.json").write_bytes(b'{"trial_data": [] , "v": "%s"}' % tag)
        (folder / f"search_gen_state-{session}.json").write_bytes(b"gen " + tag)
        (folder / f"searcher-state-{session}.pkl").write_bytes(b"searcher " + tag)
    (folder / f"callback-states-{NEW}.pkl").write_bytes(b"callbacks")
    (folder / f".1234-tmp-search_gen_state-{NEW}.json").write_bytes(b"half")
    (folder / "tuner.pkl").write_bytes(b"tuner")
    (folder / f"trial_fn_0001_1_alpha=1.2_{NEW}").mkdir()
    return folder


def test_takes_the_newest_saves_state_files_only(tmp_path):
    exp = tmp_path / "storage" / "search-x"
    exp.mkdir(parents=True)
    assert tunestate.read(str(exp)) is None
    assert tunestate.take(str(staged(tmp_path / "staging")), str(exp), pyarrow.fs.LocalFileSystem())
    session, files = tunestate.read(str(exp))
    assert session == NEW
    assert files == {f"experiment_state-{NEW}.json": b'{"trial_data": [] , "v": "new"}',
                     f"search_gen_state-{NEW}.json": b"gen new", f"searcher-state-{NEW}.pkl": b"searcher new"}
    assert Path(tunestate.snapshot_path(str(exp))).parent == exp.parent  # beside, not in, Tune's folder
    assert [p.name for p in exp.parent.iterdir()] == ["search-x", "search-x.orch-state"]  # no temporary left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not tunestate.take(str(empty), str(tmp_path / "storage" / "search-y"), pyarrow.fs.LocalFileSystem())


def test_puts_the_copy_back_over_a_torn_upload(tmp_path):
    exp = tmp_path / "storage" / "search-x"
    tunestate.take(str(staged(tmp_path / "staging")), str(exp), pyarrow.fs.LocalFileSystem())
    exp.mkdir(parents=True)
    (exp / f"experiment_state-{NEW}.json").write_bytes(b'{"trial_da')  # cut off mid-copy
    (exp / f"search_gen_state-{NEW}.json").write_bytes(b"")
    (exp / f"experiment_state-{OLD}.json").write_bytes(b"older session")
    (exp / f"experiment_state-{LATER}.json").write_bytes(b"a driver killed before its first copy")
    (exp / f"searcher-state-{LATER}.pkl").write_bytes(b"same")
    (exp / "tuner.pkl").write_bytes(b"tuner")
    assert tunestate.put_back(str(exp))
    assert sorted(p.name for p in exp.iterdir()) == sorted([
        f"experiment_state-{OLD}.json", f"experiment_state-{NEW}.json", f"search_gen_state-{NEW}.json",
        f"searcher-state-{NEW}.pkl", "tuner.pkl"])
    assert (exp / f"search_gen_state-{NEW}.json").read_bytes() == b"gen new"
    assert (exp / f"experiment_state-{NEW}.json").read_bytes() == b'{"trial_data": [] , "v": "new"}'
    assert not tunestate.put_back(str(tmp_path / "storage" / "search-none"))  # no copy: Tune's files as they are


@pytest.mark.parametrize("entry", ["files/../../escape-2026-11-27_11-00-00.json", "files/tuner.pkl",
                                   "files/experiment_state-2026-11-27_10-00-00.json"])
def test_refuses_a_copy_orch_did_not_write(tmp_path, entry):
    exp = tmp_path / "search-x"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("session", NEW)
        z.writestr(entry, b"x")
    Path(tunestate.snapshot_path(str(exp))).write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="unexpected entry"):
        tunestate.put_back(str(exp))
    assert not exp.exists() and not (tmp_path / "escape-2026-11-27_11-00-00.json").exists()


def test_a_copy_that_cannot_be_written_warns_once_and_the_search_goes_on(tmp_path, caplog):
    (tmp_path / "storage").write_text("a file where the storage folder should be")
    storage = SimpleNamespace(experiment_driver_staging_path=str(staged(tmp_path / "staging")),
                              experiment_fs_path=str(tmp_path / "storage" / "search-x"),
                              storage_filesystem=pyarrow.fs.LocalFileSystem())
    snaps = tunestate.Snapshots()
    snaps()  # no trial yet: nothing known, nothing done
    snaps.watch([])
    assert snaps.storage is None
    snaps.watch([SimpleNamespace(storage=storage)])
    with caplog.at_level(logging.WARNING, logger="orch.tunestate"):
        snaps()
        snaps()
    assert snaps.failed
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["could not save a copy of Tune's state for --resume"]


def test_a_failed_upload_of_tunes_state_is_one_line_not_a_traceback(caplog):
    tunestate.quiet_upload_errors()
    tunestate.quiet_upload_errors()  # installed once
    tune_log = logging.getLogger("ray.tune.execution.experiment_state")
    assert sum(isinstance(f, tunestate._UploadErrorsInOneLine) for f in tune_log.filters) == 1
    with caplog.at_level(logging.WARNING, logger="ray.tune.execution.experiment_state"):
        try:
            open("/nonexistent/staging/searcher-state.pkl")
        except FileNotFoundError:
            tune_log.error("Saving experiment state to storage at '/x' failed with exception: ", exc_info=True)
        tune_log.error("something else", exc_info=False)
    (rec, other) = caplog.records
    assert rec.levelname == "WARNING" and rec.exc_info is None and "Traceback" not in caplog.text
    assert rec.getMessage().startswith("Saving experiment state to storage at '/x' failed with exception: "
                                       "FileNotFoundError: [Errno 2] No such file or directory")
    assert rec.getMessage().endswith("--resume uses orch's own copy of that state")
    assert other.levelname == "ERROR"  # other records pass as they are
