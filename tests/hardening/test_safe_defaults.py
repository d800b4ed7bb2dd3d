"""Safe defaults: loopback binding, no start without strong tokens, size limits.

That no token reaches a log is checked on a whole cycle run by real processes at
DEBUG level, in ``test_dropouts.py`` (the outage test), to start processes once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_service.config import Settings as EdgeSettings
from edge_service.main import run as edge_run
from server_service.config import Settings as ServerSettings
from server_service.config import get_settings as get_server_settings
from server_service.main import run as server_run
from tests.hardening.procs import (
    free_port,
)


def test_services_bind_to_loopback_and_limit_bodies_by_default() -> None:
    for settings in (ServerSettings, EdgeSettings):
        assert settings.model_fields["host"].default == "127.0.0.1"
    assert ServerSettings.model_fields["max_upload_bytes"].default == 256 * 1024 * 1024
    assert ServerSettings.model_fields["max_upload_rows"].default == 100_000
    assert EdgeSettings.model_fields["max_predict_bytes"].default == 20 * 1024 * 1024
    assert EdgeSettings.model_fields["max_image_pixels"].default == 50_000_000


@pytest.mark.parametrize(
    ("module", "env", "message"),
    [
        ("server_service", {}, "FEDINSPECT_SERVER_ADMIN_TOKEN: Field required"),
        (
            "server_service",
            {"FEDINSPECT_SERVER_ADMIN_TOKEN": "short"},
            "FEDINSPECT_SERVER_ADMIN_TOKEN: Value error, must be at least 16 characters",
        ),
        ("edge_service", {}, "FEDINSPECT_EDGE_ADMIN_TOKEN: Field required"),
        ("edge_service", {"FEDINSPECT_EDGE_ADMIN_TOKEN": ""}, "admin_token must not be empty"),
        # issue 24, defect 9: weak operator tokens, on both services
        (
            "edge_service",
            {"FEDINSPECT_EDGE_ADMIN_TOKEN": "x"},
            "admin_token must be at least 16 characters",
        ),
        (
            "server_service",
            {"FEDINSPECT_SERVER_ADMIN_TOKEN": "a" * 16},
            "FEDINSPECT_SERVER_ADMIN_TOKEN: Value error, has almost no entropy",
        ),
        (
            "server_service",
            {"FEDINSPECT_SERVER_ADMIN_TOKEN": " " * 16},
            "FEDINSPECT_SERVER_ADMIN_TOKEN: Value error, must not start or end with whitespace",
        ),
        (
            "edge_service",
            {"FEDINSPECT_EDGE_ADMIN_TOKEN": "abababababababababab"},
            "admin_token has almost no entropy",
        ),
        (
            "edge_service",
            {
                "FEDINSPECT_EDGE_ADMIN_TOKEN": "edge-token-shared-0123456789",
                "FEDINSPECT_EDGE_TOKEN": "edge-token-shared-0123456789",
            },
            "admin_token must differ from token (the edge's server token)",
        ),
    ],
)
def test_services_refuse_to_start_without_tokens(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    env: dict[str, str],
    message: str,
) -> None:
    for name in list(os.environ):
        if name.startswith("FEDINSPECT_"):
            monkeypatch.delenv(name)
    prefix = "FEDINSPECT_SERVER_" if module == "server_service" else "FEDINSPECT_EDGE_"
    env = {**env, f"{prefix}DATA_DIR": str(tmp_path / "data"), f"{prefix}PORT": str(free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_server_settings.cache_clear()  # run() reads the environment through this cache
    run = server_run if module == "server_service" else edge_run
    try:
        with pytest.raises(SystemExit) as exited:
            run()  # exits before uvicorn starts: nothing listens, nothing is written
    finally:
        get_server_settings.cache_clear()
    assert message in str(exited.value.code)
    assert not (tmp_path / "data").exists()
