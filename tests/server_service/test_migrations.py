"""The server's schema migrations on SQLite and PostgreSQL: a database of the first
schema (made by ``create_all`` before migrations) keeps its rows and serves after the
upgrade, the models match the newest revision, and replicas starting at once migrate
one database once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, bindparam, inspect, text

from fl_core.errors import ConfigError
from fl_core.migrations import current_revision, head_revision, migration_config
from fl_core.schemas import FeatureSpec
from server_service.config import Settings
from server_service.db import Base, UTCDateTime, make_engine, migrate_schema, utcnow
from server_service.services.auth import hash_token
from server_service.storage import open_storage
from tests.server_service.helpers import ADMIN, running

HERE = Path(__file__).parent
EDGE_TOKEN = "token-of-an-edge-registered-before-migrations"


def _first_schema(engine: Engine) -> None:
    """Create the tables exactly as the release before migrations did, and rows in them."""
    ddl = (HERE / f"first_schema_{engine.dialect.name}.sql").read_text()
    body = "\n".join(line for line in ddl.splitlines() if not line.startswith("--"))
    now = utcnow()
    spec = FeatureSpec(
        backbone="tiny_cnn",
        cut="b1",
        input_size=32,
        feature_shape=[8, 8, 8],
        class_names=["ok", "defect"],
        base_model_version=1,
        base_model_sha256="0" * 64,
    )
    # bound as the release wrote them: UTC, in each backend's datetime format
    times = [bindparam(n, type_=UTCDateTime) for n in ("now", "deadline")]
    with engine.begin() as conn:
        for statement in body.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        conn.execute(
            text(
                "INSERT INTO edges (id, name, token_hash, created_at, revoked) "
                "VALUES ('edge-old', 'line-1', :hash, :now, :no)"
            ).bindparams(times[0]),
            {"hash": hash_token(EDGE_TOKEN), "now": now, "no": False},
        )
        conn.execute(
            text(
                "INSERT INTO cycles (state, base_model_version, spec_json, spec_hash, "
                "min_edges, deadline, created_at, updated_at, reason) VALUES ('cancelled', "
                "1, :spec, :hash, 1, :deadline, :now, :now, 'cancelled by an operator')"
            ).bindparams(*times),
            {
                "spec": spec.model_dump_json(),
                "hash": spec.spec_hash(),
                "deadline": now + timedelta(hours=1),
                "now": now,
            },
        )
        conn.execute(
            text(
                "INSERT INTO cycle_members (cycle_id, edge_id, joined_at) "
                "VALUES (1, 'edge-old', :now)"
            ).bindparams(times[0]),
            {"now": now},
        )


def _version(settings: Settings) -> str | None:
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    finally:
        engine.dispose()


def test_a_database_of_the_first_schema_keeps_its_rows_and_serves(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        _first_schema(engine)
        assert not inspect(engine).has_table("alembic_version")
    finally:
        engine.dispose()

    with running(settings) as client:
        edges = client.get("/v1/edges", headers=ADMIN).json()
        assert [(e["edge_id"], e["name"]) for e in edges] == [("edge-old", "line-1")]
        old = client.get("/v1/cycles/1", headers=ADMIN).json()
        assert (old["state"], old["reason"]) == ("cancelled", "cancelled by an operator")
        # the edge's token still works, and new rows follow the old ones
        joined = client.post("/v1/cycles", headers={"Authorization": f"Bearer {EDGE_TOKEN}"})
        assert joined.status_code in (200, 201), joined.text
        assert joined.json()["id"] == 2
        assert [m["version"] for m in client.get("/v1/models", headers=ADMIN).json()] == [1]
    assert _version(settings) == head_revision("server_service")


def test_a_new_database_is_migrated_from_the_base(settings: Settings) -> None:
    with running(settings):
        pass
    assert _version(settings) == head_revision("server_service")


def test_the_models_match_the_newest_revision(settings: Settings) -> None:
    # A change to server_service/db.py without a migration fails here: write the
    # revision (docs/scaling.md, "Schema migrations").
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        assert migrate_schema(engine).skipped == []
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_the_migrations_go_down_to_the_base_and_up_again(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        assert migrate_schema(engine).after == head_revision("server_service")
        with engine.begin() as conn:
            command.downgrade(migration_config("server_service", conn), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert migrate_schema(engine).skipped == []
        assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    finally:
        engine.dispose()


def test_a_database_migrated_by_a_newer_release_is_one_line(settings: Settings) -> None:
    with running(settings):
        pass
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    finally:
        engine.dispose()
    with pytest.raises(ConfigError) as refused:
        open_storage(settings)
    assert refused.value.detail == (
        "the database is at schema revision f00d, which this release does not know (its "
        f"newest is {head_revision('server_service')}): run the release that migrated it, "
        "or restore a backup made before"
    )


def test_replicas_starting_at_once_migrate_the_database_once(pg_url: str) -> None:
    replicas = 6
    start = threading.Barrier(replicas)

    def start_replica(_: int) -> list[str]:
        engine = make_engine(pg_url)
        try:
            start.wait(timeout=30)
            return migrate_schema(engine).skipped
        finally:
            engine.dispose()

    with ThreadPoolExecutor(replicas) as pool:
        assert list(pool.map(start_replica, range(replicas))) == [[]] * replicas
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision("server_service")
            assert conn.scalar(text("SELECT count(*) FROM alembic_version")) == 1
    finally:
        engine.dispose()
