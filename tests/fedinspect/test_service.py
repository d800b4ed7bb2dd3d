"""The plumbing both services share: one error shape, one settings report, one clock,
one SQLite engine."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import pytest
from fastapi import FastAPI
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict
from sqlalchemy import text

from fedinspect.service import (
    MAX_ID,
    ServiceSettings,
    error_responses,
    install_error_handlers,
    load_settings,
    make_engine,
    utcnow,
)
from fl_core.errors import AuthError, ConfigError, Forbidden, Unavailable
from tests.testclient import TestClient


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/unauthenticated")
    def unauthenticated() -> None:
        raise AuthError("missing bearer token")

    @app.get("/forbidden")
    def forbidden() -> None:
        raise Forbidden("an edge token on an operator route")

    @app.get("/busy")
    def busy() -> None:
        raise Unavailable("database unavailable; retry later")

    @app.get("/items/{item}")
    def item(item: int) -> int:
        return item

    return app


def test_the_challenge_goes_with_401_only_and_retry_after_with_503() -> None:
    with TestClient(_app()) as client:
        missing = client.get("/unauthenticated")
        forbidden = client.get("/forbidden")
        busy = client.get("/busy")
    assert (missing.status_code, missing.json()) == (401, {"detail": "missing bearer token"})
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert forbidden.status_code == 403
    assert "WWW-Authenticate" not in forbidden.headers
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "2"


def test_validation_errors_are_one_detail_string() -> None:
    with TestClient(_app()) as client:
        invalid = client.get("/items/abc")
    assert invalid.status_code == 422
    assert invalid.json()["detail"].startswith("path.item: Input should be a valid integer")


def test_error_responses_document_each_code_once() -> None:
    base = {401: {"description": "own words"}}
    responses = error_responses(404, 409, base=base)
    assert responses[401] == {"description": "own words"}
    assert responses[404]["description"] == "no such resource"
    assert set(responses) == {401, 404, 409}
    assert MAX_ID == 2**31 - 1


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FEDINSPECT_TEST_")

    admin_token: SecretStr = Field(description="required")


def test_settings_errors_name_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDINSPECT_TEST_PORT", "0")
    with pytest.raises(ConfigError) as err:
        load_settings(_Settings, "test")
    assert err.value.detail.startswith(
        "invalid test settings: FEDINSPECT_TEST_PORT: Input should be greater than or equal "
        "to 1; FEDINSPECT_TEST_ADMIN_TOKEN: Field required"
    )


def test_one_clock_and_one_sqlite_engine(tmp_path: Path) -> None:
    assert utcnow().tzinfo is UTC
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.connect() as conn:
            pragmas = [
                conn.execute(text(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys")
            ]
    finally:
        engine.dispose()
    assert pragmas == ["wal", 2, 1]  # WAL, FULL, on
