"""Bad input to `orch search` is a clear click error before any trial starts."""

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.store import ResultsStore
from tests.conftest import error_line, no_search_recorded


def _run(args):
    return CliRunner().invoke(main, ["search", "--gpus", "0", *args])



@pytest.mark.parametrize(
    "args, says",
    [
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--dataset", "imagefolder:/nonexistent/xyz"], "does not exist"),
        (["--trials", "0"], "--trials"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "2", "--grace-epochs", "3"], "above --epochs 2"),
        (["--gpus", "-1"], "--gpus"),
        (["--gpus-per-trial", "1"], "needs a GPU budget"),
        (["--lr", "0"], "--lr"),
        (["--space", "random"], "'random' is not one of"),
        (["--synthetic-size", "10", "10"], "--synthetic-size"),
    ],
)
def test_bad_options_fail_before_anything_starts(home, args, says):
    res = _run(args)
    assert res.exit_code == 2, res.output
    assert says in error_line(res)
    no_search_recorded(home)


def test_gpus_per_trial_above_budget(home):
    res = CliRunner().invoke(main, ["search", "--gpus", "1", "--gpus-per-trial", "2"])
    assert res.exit_code == 2 and "above the --gpus budget" in error_line(res)


def test_empty_image_folder(home, tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "train" / "b").mkdir(parents=True)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    res = _run(["--dataset", f"imagefolder:{tmp_path / 'data'}"])
    assert res.exit_code == 2 and "has 0 class folders with images; it needs at least 2" in error_line(res)
    res = _run(["--dataset", f"imagefolder:{tmp_path}"])
    assert res.exit_code == 2 and "is missing" in error_line(res)


def test_unopenable_db_url(home):
    res = _run(["--db-url", "postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none"])
    assert res.exit_code == 2
    line = error_line(res)
    assert "--db-url" in line and "cannot connect" in line and "hunter2" not in res.output


def test_unreachable_tracking_uri_is_a_bounded_wait(home):
    import time

    t0 = time.monotonic()
    res = _run(["--tracking-uri", "http://127.0.0.1:1"])
    assert res.exit_code == 2 and "did not answer" in error_line(res)
    assert time.monotonic() - t0 < 30
    no_search_recorded(home)


def test_out_of_date_store_names_the_fix(home):
    import sqlalchemy as sa

    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    with store.engine.begin() as c:
        c.execute(sa.text("DROP TABLE alembic_version"))
    store.close()
    res = _run([])
    assert res.exit_code == 1 and "orch db upgrade" in error_line(res)


@pytest.mark.slow
def test_more_gpus_than_the_cluster_has(ray_session, home):
    res = CliRunner().invoke(main, ["search", "--gpus", "8"])
    assert res.exit_code == 2
    assert "more GPUs than the cluster has (4)" in error_line(res)
    no_search_recorded(home)


def test_runs_show_unknown_and_malformed_ids(home):
    res = CliRunner().invoke(main, ["runs", "show", "search-nope"])
    assert res.exit_code == 2 and "no search or scale 'search-nope'" in error_line(res)
    for bad in ("../../etc/passwd", "x" * 10_000, "a'; DROP TABLE trials; --", "a\x00b"):
        res = CliRunner().invoke(main, ["runs", "show", bad])
        assert res.exit_code == 2 and "is not an id" in error_line(res)


def test_tracking_uri_that_is_not_mlflow_is_refused_at_once(home):
    """A real HTTP server that is not MLflow (it answers 404): refused at once, nothing recorded."""
    import http.server
    import threading
    import time

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        res = _run(["--tracking-uri", f"http://127.0.0.1:{server.server_address[1]}"])
        assert res.exit_code == 2 and "answered HTTP 404" in error_line(res) and "not an MLflow" in error_line(res)
        assert time.monotonic() - t0 < 5
    finally:
        server.shutdown()
        server.server_close()
    no_search_recorded(home)


def test_an_empty_grid_is_a_clear_error_before_anything_is_recorded(home):
    """No grid point within the FLOPs tolerance: one line saying how to fix it; no search row,
    no MLflow run."""
    res = CliRunner().invoke(main, ["search", "--gpus", "0", "--space", "grid", "--grid-step", "0.5",
                                    "--tolerance", "0.01", "--flops-tolerance", "0.001", "--no-paper-point"])
    assert res.exit_code == 2 and "finer --grid-step" in error_line(res)
    no_search_recorded(home)


def test_an_unreadable_image_in_a_folder_is_one_line_before_anything_starts(home, tmp_path):
    """An image folder is prepared before a search starts (implicitly): a file that is not an
    image stops it with the file named and how to skip such files; nothing is recorded."""
    from tests.test_search_e2e import _write_images

    _write_images(tmp_path / "data", n_train=3, n_val=2)
    (tmp_path / "data" / "train" / "red" / "notes.jpg").write_text("not a picture")
    res = _run(["--dataset", f"imagefolder:{tmp_path / 'data'}"])
    line = error_line(res)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "notes.jpg" in line and "orch data prepare imagefolder:" in line and "--skip-bad" in line, line
    no_search_recorded(home)
