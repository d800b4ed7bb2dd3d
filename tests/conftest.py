"""Session-wide fixtures: a throwaway PostgreSQL cluster and an S3 API server on
loopback, started on first use and stopped at the end of the run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.services import S3_ENV, PostgresServer, S3Server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a new, empty PostgreSQL database for one test."""
    return postgres.create_database()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS credentials for moto in this process's environment (children inherit them)."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)
