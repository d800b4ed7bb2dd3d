"""The edge's schema migrations: a store of the first schema (made by ``create_all``
before migrations) keeps its jobs, models and state, and the edge serves them after the
upgrade; the models match the newest revision."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from edge_service.db import Base, EdgeStore
from fl_core.migrations import current_revision, head_revision
from fl_core.schemas import CycleJobResult
from tests.edge_service.conftest import AUTH, EdgeFactory
from tests.edge_service.fakes import FakeServer

FIRST_SCHEMA = Path(__file__).parent / "first_schema_sqlite.sql"
WHEN = "2026-11-30 08:00:00.000000"  # as SQLAlchemy wrote datetimes to SQLite


def _first_schema_store(path: Path) -> None:
    """A store as the release before migrations left it: tables, rows, no version."""
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.executescript(FIRST_SCHEMA.read_text())
        db.execute(
            "INSERT INTO jobs VALUES ('job-old', 'extract', 'done', 'upload', 1.0, 'done', "
            "'{}', '{\"n_train\": 3}', NULL, ?, ?)",
            (WHEN, WHEN),
        )
        db.execute(
            "INSERT INTO local_models (base_version, source, sha256, created_at, active, "
            "metrics, note) VALUES (1, 'base', ?, ?, 0, NULL, 'pulled before migrations')",
            ("a" * 64, WHEN),
        )
        db.execute("INSERT INTO state VALUES ('last_gate', '{\"deployed\": false}')")
    db.close()


def test_a_store_of_the_first_schema_keeps_its_rows_and_serves(
    make_edge: EdgeFactory, fake_server: FakeServer, tmp_path: Path
) -> None:
    db_path = tmp_path / "edge" / "edge.db"  # where make_edge's settings keep the store
    _first_schema_store(db_path)

    edge = make_edge(fake_server.client())
    job = edge.get("/v1/jobs/job-old", headers=AUTH).json()
    assert (job["state"], job["stage"]) == ("done", "upload")
    # its result, {"n_train": 3}, reads as the typed result: the other fields defaulted
    assert job["result"] == CycleJobResult(n_train=3).model_dump(mode="json")
    assert edge.post("/v1/jobs/extract", headers=AUTH).status_code == 202

    store = EdgeStore.open(db_path)
    try:
        (model,) = store.list_models()
        assert (model.base_version, model.note) == (1, "pulled before migrations")
        assert store.get_state("last_gate") == {"deployed": False}
        with store.engine.connect() as conn:
            assert current_revision(conn) == head_revision("edge_service")
    finally:
        store.close()


def test_the_models_match_the_newest_revision(tmp_path: Path) -> None:
    # A change to edge_service/db.py without a migration fails here: write the
    # revision (docs/scaling.md, "Schema migrations").
    store = EdgeStore.open(tmp_path / "edge.db")
    try:
        with store.engine.connect() as conn:
            assert current_revision(conn) == head_revision("edge_service")
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        store.close()
