"""Fixtures: a tiny-model server in a temp DATA_DIR behind a TestClient that runs the
lifespan (on SQLite and on PostgreSQL), an admin header and an edge factory (helpers
live in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server_service.config import Settings
from tests.server_service.helpers import ADMIN, Edge, TestClient, make_settings, running


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "server"


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(data_dir: Path, request: pytest.FixtureRequest) -> Settings:
    """Tiny settings on each database backend: SQLite in DATA_DIR, and a new database
    in the test run's PostgreSQL cluster (tests/conftest.py)."""
    if request.param == "postgresql":
        return make_settings(data_dir, database_url=request.getfixturevalue("pg_url"))
    return make_settings(data_dir)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with running(settings) as c:
        yield c


@pytest.fixture
def admin() -> dict[str, str]:
    return dict(ADMIN)


EdgeFactory = Callable[..., Edge]


@pytest.fixture
def new_edge(client: TestClient) -> EdgeFactory:
    """Register an edge through the API; names default to edge-1, edge-2, ..."""
    counter = 0

    def factory(name: str | None = None, c: TestClient | None = None) -> Edge:
        nonlocal counter
        counter += 1
        resp = (c or client).post(
            "/v1/edges", json={"name": name or f"edge-{counter}"}, headers=ADMIN
        )
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return Edge(edge_id=body["edge_id"], name=body["name"], token=body["token"])

    return factory
