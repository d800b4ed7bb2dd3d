"""The server's storage layer on SQLite and PostgreSQL: one active edge per name under
concurrent registrations, a clear refusal of a corrupt or emptied database, leases
that let exactly one replica train a cycle, and the database going away mid-request."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from fedinspect.launcher import child_env, service_command
from fl_core.errors import ConfigError
from fl_core.migrations import current_revision, head_revision
from server_service import leases
from server_service.config import Settings
from server_service.db import (
    EdgeRow,
    LeaseRow,
    make_engine,
    make_sessionmaker,
    migrate_schema,
    utcnow,
)
from server_service.storage import open_storage
from tests.integration.processes import ROOT
from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import (
    ADMIN,
    ADMIN_TOKEN,
    TestClient,
    make_settings,
    make_upload,
    put_features,
    running,
    wait_for_state,
)

# ----------------------------------------------------------------- one edge per name


def test_concurrent_registrations_of_one_name_give_one_201(client: TestClient) -> None:
    start = threading.Barrier(20)

    def register(_: int) -> int:
        start.wait(timeout=30)
        resp = client.post("/v1/edges", json={"name": "line-7"}, headers=ADMIN)
        return resp.status_code

    for _round in range(3):
        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(register, range(20)))
        assert sorted(set(codes)) in ([201, 409], [409])
        assert codes.count(201) <= 1
    active = [e for e in client.get("/v1/edges", headers=ADMIN).json() if e["name"] == "line-7"]
    assert len(active) == 1


def test_the_database_refuses_a_second_active_edge_of_a_name(settings: Settings) -> None:
    engine, _blobs = open_storage(settings)
    sessions = make_sessionmaker(engine)
    try:
        with sessions() as session:
            session.add(EdgeRow(id="edge-a", name="n", token_hash="a" * 64, revoked=True))
            session.add(EdgeRow(id="edge-b", name="n", token_hash="b" * 64, revoked=False))
            session.commit()  # a revoked edge does not hold its name
            session.add(EdgeRow(id="edge-c", name="n", token_hash="c" * 64, revoked=False))
            with pytest.raises(DBIntegrityError):
                session.commit()
    finally:
        engine.dispose()


def test_a_revoked_name_can_be_registered_again(client: TestClient, new_edge: EdgeFactory) -> None:
    first = new_edge("line-8")
    assert client.delete(f"/v1/edges/{first.edge_id}", headers=ADMIN).status_code == 200
    again = client.post("/v1/edges", json={"name": "line-8"}, headers=ADMIN)
    assert again.status_code == 201
    dup = client.post("/v1/edges", json={"name": "line-8"}, headers=ADMIN)
    assert dup.status_code == 409
    assert dup.json() == {"detail": "an edge named 'line-8' is already registered"}


# ------------------------------------------------------------ corrupt or emptied stores


def _serve(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``fedinspect server`` as a user would, expecting it to refuse to start."""
    settings = {
        "FEDINSPECT_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
        "FEDINSPECT_SERVER_DATA_DIR": str(data_dir),
        "FEDINSPECT_SERVER_BACKBONE": "tiny_cnn",
        "FEDINSPECT_SERVER_PRETRAINED": "false",
        "FEDINSPECT_SERVER_PORT": "1",  # never reached: it stops before listening
    }
    return subprocess.run(
        service_command("server"),
        cwd=ROOT,
        env=child_env({**settings, **env}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _first_start(data_dir: Path) -> None:
    with running(make_settings(data_dir)):
        pass


@pytest.mark.slow  # starts the server process
def test_a_corrupt_database_is_one_line_naming_the_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    _first_start(data_dir)
    db = data_dir / "server.db"
    db.write_bytes(b"this is not a database" * 100)
    for wal in data_dir.glob("server.db-*"):
        wal.unlink()
    done = _serve(data_dir)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"fedinspect server: the database file {db.resolve()} is unreadable")
    assert "restore it from a backup" in line


@pytest.mark.slow  # starts the server process
def test_a_deleted_database_beside_a_full_blob_store_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    _first_start(data_dir)
    for db in data_dir.glob("server.db*"):
        db.unlink()
    done = _serve(data_dir)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "is empty (deleted or replaced?)" in line
    assert str(data_dir / "blobs") in line
    assert "FEDINSPECT_SERVER_ALLOW_NEW_DATABASE=true" in line


def test_an_emptied_database_is_refused_unless_allowed(settings: Settings) -> None:
    # First start: tables, a base model and its blob. Then the database is emptied (its
    # schema version included).
    with running(settings):
        pass
    engine = make_engine(settings.sqlalchemy_url)
    from server_service.db import Base

    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    with pytest.raises(ConfigError, match=r"is empty \(deleted or replaced\?\)"):
        open_storage(settings)
    allowed = settings.model_copy(update={"allow_new_database": True})
    with running(allowed) as client:
        assert [m["version"] for m in client.get("/v1/models", headers=ADMIN).json()] == [1]


@pytest.mark.slow  # starts the server process
def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    url = "postgresql+psycopg://fed:secret-pw@127.0.0.1:9/nowhere"
    done = _serve(tmp_path / "server", FEDINSPECT_SERVER_DATABASE_URL=url)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "fedinspect server: cannot open the database postgresql+psycopg://fed:***@127.0.0.1:9"
    )
    assert "secret-pw" not in done.stderr


# ---------------------------------------------------------------------------- leases


def test_a_lease_has_one_holder_until_it_expires(settings: Settings) -> None:
    engine, _blobs = open_storage(settings)
    sessions = make_sessionmaker(engine)
    try:
        assert leases.acquire(sessions, "cycle:1", "a", ttl_s=60)
        assert not leases.acquire(sessions, "cycle:1", "b", ttl_s=60)
        assert leases.acquire(sessions, "cycle:1", "a", ttl_s=60)  # renewal
        assert leases.renew(sessions, ["cycle:1"], "b", ttl_s=60) == {"cycle:1"}
        with sessions() as session:  # a dies: its lease runs out
            row = session.get(LeaseRow, "cycle:1")
            assert row is not None
            row.expires_at = utcnow()
            session.commit()
        assert leases.acquire(sessions, "cycle:1", "b", ttl_s=60)
        assert leases.renew(sessions, ["cycle:1"], "a", ttl_s=60) == {"cycle:1"}
        leases.release(sessions, "cycle:1", "a")  # not a's any more: no effect
        assert not leases.acquire(sessions, "cycle:1", "a", ttl_s=60)
        leases.release(sessions, "cycle:1", "b")
        assert leases.acquire(sessions, "cycle:1", "a", ttl_s=60)
    finally:
        engine.dispose()


def test_racing_replicas_take_a_lease_once(settings: Settings) -> None:
    engine, _blobs = open_storage(settings)
    sessions = make_sessionmaker(engine)
    start = threading.Barrier(8)

    def take(i: int) -> bool:
        start.wait(timeout=30)
        return leases.acquire(sessions, "watcher", f"replica-{i}", ttl_s=60)

    try:
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(take, range(8)))
        assert won.count(True) == 1
    finally:
        engine.dispose()


def test_a_cycle_leased_by_a_live_replica_is_not_trained_here(
    settings: Settings, new_edge: EdgeFactory, client: TestClient
) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    # Another replica holds this cycle's lease, as if it had claimed it first.
    assert leases.acquire(runtime.sessions, leases.cycle_lease(cycle["id"]), "other", 60)
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
    with runtime.sessions() as session:
        owner = session.scalar(
            select(LeaseRow.owner).where(LeaseRow.name == leases.cycle_lease(cycle["id"]))
        )
    assert owner == "other"
    assert wait_for_state(client, cycle["id"], {"training", "done"})["state"] == "training"
    assert runtime.metrics.trainings_started._value.get() == 0
    # The other replica dies: once its lease has expired, this one takes the cycle over.
    with runtime.sessions() as session:
        row = session.get(LeaseRow, leases.cycle_lease(cycle["id"]))
        row.expires_at = utcnow()
        session.commit()
    done = wait_for_state(client, cycle["id"], {"done", "failed"})
    assert done["state"] == "done"
    assert runtime.metrics.trainings_started._value.get() == 1


def test_health_names_the_replica_and_what_it_reaches(settings: Settings) -> None:
    named = settings.model_copy(update={"replica_id": "replica-a"})
    with running(named) as client:
        assert client.get("/health").json() == {
            "status": "ok",
            "replica": "replica-a",
            "database": "ok",
            "blob_store": "ok",
        }


# ------------------------------------------------- databases made before migrations


#: the columns revision 0002 adds to ``cycles``
ROUND_COLUMNS = (
    "plan_json",
    "round",
    "round_model_version",
    "round_deadline",
    "round_versions_json",
)


def test_a_database_older_than_the_first_revision_gains_the_missing_index_and_table(
    settings: Settings,
) -> None:
    # Releases before migrations had no alembic_version table, the oldest neither the
    # leases table nor one name per active edge, and could hold two active edges of one
    # name.
    engine, _blobs = open_storage(settings)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("DROP INDEX one_active_edge_name"))
        conn.execute(text("DROP TABLE leases"))
        # and what later revisions added
        conn.execute(text("DROP TABLE round_updates"))
        for column in ROUND_COLUMNS:
            conn.execute(text(f"ALTER TABLE cycles DROP COLUMN {column}"))
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        session.add(EdgeRow(id="edge-a", name="twin", token_hash="a" * 64, revoked=False))
        session.add(EdgeRow(id="edge-b", name="twin", token_hash="b" * 64, revoked=False))
        session.add(EdgeRow(id="edge-c", name="solo", token_hash="c" * 64, revoked=False))
        session.commit()
    engine.dispose()
    # Two active twins break the unique index. This release's schema is past the first
    # revision, so it cannot run on a database left at the first schema without it: the
    # start is refused, naming the index, and the database stays as it was.
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with pytest.raises(ConfigError, match="one_active_edge_name"):
            migrate_schema(engine)
        assert not inspect(engine).has_table("alembic_version")
    finally:
        engine.dispose()
    # The operator revokes the twin by hand.
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE edges SET revoked = true WHERE id = 'edge-b'"))
    finally:
        engine.dispose()
    # Once the twin is revoked, the next start creates the index and the lease table,
    # and stamps the database at the first revision before upgrading it.
    engine = make_engine(settings.sqlalchemy_url)
    try:
        assert migrate_schema(engine).skipped == []
        names = {i["name"] for i in inspect(engine).get_indexes("edges")}
        assert "one_active_edge_name" in names
        assert inspect(engine).has_table("leases")
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision("server_service")
    finally:
        engine.dispose()
