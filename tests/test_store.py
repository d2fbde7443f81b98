"""The results store on real SQLite and real PostgreSQL (127.0.0.1:5432)."""

import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.store import ResultsStore, SchemaOutOfDate, StoreError, head_revision, mask_url

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _pg_available() -> bool:
    try:
        eng = sa.create_engine(PG_ADMIN, connect_args={"connect_timeout": 3})
        with eng.connect():
            pass
        eng.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url():
    """A fresh database on the PostgreSQL server, dropped afterwards."""
    if not _pg_available():
        pytest.fail("PostgreSQL must run on 127.0.0.1:5432 (it does on this project's machines and CI)")
    name = f"orch_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orch.db'}"
    return request.getfixturevalue("pg_url")


def test_empty_database_is_created_at_head(db_url):
    store = ResultsStore(db_url)
    assert store.current_revision() == head_revision()
    assert store.list_searches() == []
    store.close()


def test_trial_upserts_are_idempotent(db_url):
    store = ResultsStore(db_url)
    store.create_search("s1", "one", {"space": "surface"})
    base = dict(alpha=1.2, beta=1.1, gamma=1.15, network_key="k", resolution=40)
    for epoch in range(1, 4):  # three results, then a retried write of the same one
        store.upsert_trial("s1", "t1", **base, epochs_done=epoch, val_top1=0.1 * epoch,
                           history=[{"epoch": e} for e in range(1, epoch + 1)])
    store.upsert_trial("s1", "t1", **base, epochs_done=3, val_top1=0.3, history=[{"epoch": e} for e in (1, 2, 3)],
                       status="finished")
    trials = store.trials("s1")
    assert len(trials) == 1
    t = trials[0]
    assert (t.epochs_done, t.status, len(t.history)) == (3, "finished", 3)
    assert t.val_top1 == pytest.approx(0.3)
    # a second search may use the same Tune trial id without crossing rows
    store.create_search("s2", "two", {})
    store.upsert_trial("s2", "t1", **base)
    assert len(store.trials("s1")) == 1 and len(store.trials("s2")) == 1
    assert store.get_trial("t1") is not None
    store.close()


def test_unknown_fields_are_errors(db_url):
    store = ResultsStore(db_url)
    store.create_search("s1", "one", {})
    with pytest.raises(ValueError, match="unknown trials fields"):
        store.upsert_trial("s1", "t1", accuracy=1.0)
    with pytest.raises(ValueError, match="unknown searches fields"):
        store.update_search("s1", colour="red")
    with pytest.raises(StoreError):  # duplicate search id: a clear store error, nothing half-written
        store.create_search("s1", "again", {})
    assert [s.name for s in store.list_searches()] == ["one"]
    store.close()


@pytest.mark.parametrize(
    "tamper, error, says",
    [
        ("DROP TABLE alembic_version", SchemaOutOfDate, "orch db upgrade"),  # tables, no revision
        ("UPDATE alembic_version SET version_num = 'ffff'", StoreError, "does not know"),  # a newer orch's
    ],
)
def test_tampered_schema_is_refused(db_url, tamper, error, says):
    store = ResultsStore(db_url)
    with store.engine.begin() as c:
        c.execute(sa.text(tamper))
    store.close()
    with pytest.raises(error, match=says):
        ResultsStore(db_url)


def test_foreign_database_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.execute(sa.text("CREATE TABLE customers (id INTEGER)"))
    eng.dispose()
    with pytest.raises(StoreError, match="other tables"):
        ResultsStore(url)


def test_models_and_migrations_agree(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from orchestrator.store.models import Base

    store = ResultsStore(db_url)
    with store.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []
    store.close()


def test_db_cli_current_and_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    runner = CliRunner()
    res = runner.invoke(main, ["db", "current", "--db-url", url])
    assert res.exit_code == 0 and "revision none" in res.output and "orch db upgrade" in res.output
    res = runner.invoke(main, ["db", "upgrade", "--db-url", url])
    assert res.exit_code == 0 and f"-> {head_revision()}" in res.output
    res = runner.invoke(main, ["db", "current", "--db-url", url])
    assert "up to date" in res.output


def test_bad_urls_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="cannot parse"):
        ResultsStore("not a url")
    with pytest.raises(StoreError, match="cannot connect"):
        ResultsStore("postgresql+psycopg://nobody:secret@127.0.0.1:1/none", connect_timeout=2)


def test_password_is_masked():
    assert "secret" not in mask_url("postgresql+psycopg://u:secret@h/db")
    try:
        ResultsStore("postgresql+psycopg://u:secret@127.0.0.1:1/db", connect_timeout=2)
    except StoreError as e:
        assert "secret" not in str(e)


def test_failed_upgrade_is_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = ResultsStore(url)
    with store.engine.begin() as c:
        c.execute(sa.text("DROP TABLE alembic_version"))
    res = CliRunner().invoke(main, ["db", "upgrade", "--db-url", url])
    assert res.exit_code == 1 and "upgrading" in res.output and "failed" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(SchemaOutOfDate, match="orch db upgrade"):  # still refused, not half-open
        ResultsStore(url)


SCALE_ROW = dict(phi=1.0, depth_mult=1.2, width_mult=1.1, resolution=40, network_key="k", params=100, gmacs=0.1,
                 batch_size=32, lr=0.015, workers=1)


def test_scale_runs_are_idempotent(db_url):
    store = ResultsStore(db_url)
    store.create_search("s1", "one", {})
    store.create_scale("sc1", search_id="s1", trial_id="t1", config={"mode": "compound"}, plan=[{"name": "B1"}],
                       driver="host:1")
    for epoch in (1, 2, 2):  # a repeated write of epoch 2 (a retry) changes nothing
        store.upsert_scale_run("sc1", "B1", **SCALE_ROW, status="running", epochs_done=epoch,
                               history=[{"epoch": e} for e in range(1, epoch + 1)])
    store.upsert_scale_run("sc1", "B0", **(SCALE_ROW | {"phi": 0.0}), status="finished", val_top1=0.5)
    runs = store.scale_runs("sc1")
    assert [r.model for r in runs] == ["B0", "B1"]  # ordered by phi
    assert (runs[1].epochs_done, len(runs[1].history), runs[1].status) == (2, 2, "running")
    store.update_scale("sc1", status="finished", summary={"n": 2})
    sc = store.get_scale("sc1")
    assert (sc.status, sc.summary, sc.plan) == ("finished", {"n": 2}, [{"name": "B1"}])
    assert [s.id for s in store.list_scales(search_id="s1")] == ["sc1"]
    with pytest.raises(ValueError, match="unknown scale_runs fields"):
        store.upsert_scale_run("sc1", "B1", accuracy=1.0)
    with pytest.raises(StoreError):  # a scale of a search that does not exist
        store.create_scale("sc2", search_id="nope", trial_id="t", config={}, plan=[])
    assert store.get_scale("sc2") is None
    store.close()


def test_past_revision_fixture_upgrades_to_head(tmp_path):
    """Each past schema is a fixture file (tests/fixtures/schema-<rev>.sqlite, written by
    make_schema_fixtures.py): refused until `orch db upgrade`, then at head with its rows kept."""
    import shutil
    from pathlib import Path

    from tests.fixtures.make_schema_fixtures import ROWS

    for rev in ROWS:
        db = tmp_path / f"{rev}.sqlite"
        shutil.copy(Path(__file__).parent / "fixtures" / f"schema-{rev}.sqlite", db)
        url = f"sqlite:///{db}"
        with pytest.raises(SchemaOutOfDate, match="orch db upgrade"):
            ResultsStore(url)
        res = CliRunner().invoke(main, ["db", "upgrade", "--db-url", url])
        assert res.exit_code == 0 and f"{rev} -> {head_revision()}" in res.output
        store = ResultsStore(url)
        assert [s.id for s in store.list_searches()] == ["search-old"]
        trials = store.trials("search-old")
        assert [t.trial_id for t in trials] == ["t1", "t2"]
        if rev < "0003":  # columns added since have their defaults: search phase, not the paper point, no cost yet
            assert all(t.phase == "search" and t.off_surface is False and t.activations_m is None for t in trials)
        assert [s.id for s in store.list_scales()] == (["scale-old"] if rev >= "0002" else [])
        search = store.get_search("search-old")
        if rev < "0004":  # runtime state moved out of the config (0004): a config is options only
            from orchestrator.search import SearchOptions, options_of

            assert set(search.config) <= set(SearchOptions.__dataclass_fields__), search.config
            assert options_of(search).epochs == 2
        if rev == "0003":  # ... into its columns
            assert (search.driver, search.resumes, search.storage_path, search.concurrency, search.gpus_per_trial) \
                == ("host-a:123", 2, "/data/ray", 4, 0.5)
            assert search.phase == "confirm" and [c["trial_id"] for c in search.confirm] == ["t2"]
            assert search.grid == {"points": 30, "networks": 12, "infeasible": 5}
            assert "extra" not in search.config and search.config["seed"] == 3
        else:  # older searches had none of it: the columns' defaults
            assert (search.driver, search.resumes, search.phase, search.grid) == (None, 0, "search", None)
        if rev == "0004":  # a member trained before 0005 has no logged model, and says so
            (member,) = store.scale_runs("scale-old")
            assert member.model == "B1" and member.val_top1 == 0.5 and member.model_uri is None
        if rev >= "0002":  # every scale before 0006 is a family; its members belong to no ablation arm
            assert store.get_scale("scale-old").kind == "scale"
            assert all(r.arm is None and r.target is None and r.seed is None for r in store.scale_runs("scale-old"))
        if rev == "0005":
            assert store.scale_runs("scale-old")[0].model_uri == "models:/m-old"
        store.close()


def test_a_stored_config_is_read_strictly(tmp_path):
    # A key this orch does not know is named, not dropped: resuming with it would run other options.
    from orchestrator.errors import InputError
    from orchestrator.search import options_of

    store = ResultsStore(f"sqlite:///{tmp_path / 'o.db'}")
    store.create_search("s1", "s1", {"epochs": 2, "dataset": "synthetic", "warp_factor": 9})
    with pytest.raises(InputError, match=r"does not know \(warp_factor\); resume it with the orch that started it"):
        options_of(store.get_search("s1"))
    store.close()


def test_past_revision_upgrades_on_postgresql(createdb):
    """The same past schemas built on the live server (PostgreSQL; SQLite is the fixture file),
    each in a database of its own."""
    from tests.fixtures.make_schema_fixtures import ROWS, build_at

    for rev in ROWS:
        db_url = createdb(f"orch_rev{rev}")
        eng = sa.create_engine(db_url)
        with eng.begin() as conn:
            build_at(conn, rev)
        with pytest.raises(SchemaOutOfDate, match="orch db upgrade"):
            ResultsStore(db_url)
        store = ResultsStore(db_url, check_schema=False)
        assert store.upgrade() == (rev, head_revision())
        store = ResultsStore(db_url)
        assert [t.trial_id for t in store.trials("search-old")] == ["t1", "t2"]
        store.close()
        eng.dispose()


def test_migrations_have_exactly_one_head_and_a_linear_history():
    from alembic.script import ScriptDirectory

    from orchestrator.store.store import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [head_revision()]
    revs = list(script.walk_revisions())
    assert [r.revision for r in reversed(revs)] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert all(len(r.nextrev) <= 1 for r in revs)  # no branches
