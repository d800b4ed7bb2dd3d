"""Safe defaults: loopback binding, no start without tokens, size limits, and no token
in any log line during a whole cycle run by real processes at DEBUG level."""

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
    EDGE_ADMIN_TOKEN,
    SERVER_ADMIN_TOKEN,
    client,
    edge_env,
    free_port,
    register_edge,
    services,
    wait_until,
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


@pytest.mark.slow
def test_no_token_is_logged_during_a_whole_cycle(tmp_path: Path, image_folder: Path) -> None:
    server_port, edge_port = free_port(), free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", server_port, min_edges="1", log_level="DEBUG")
        reg = register_edge(server.url, "line-a")
        env = edge_env(
            tmp_path / "edge",
            edge_port,
            server.url,
            reg["token"],
            reg["edge_id"],
            image_folder,
            log_level="DEBUG",
        )
        edge = procs.edge("edge", edge_port, env)
        with client(edge.url, EDGE_ADMIN_TOKEN) as c:
            job = c.post("/v1/jobs/cycle").json()
            wait_until(
                lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] in ("succeeded", "failed"),
                180,
                "the cycle job",
            )
            final = c.get(f"/v1/jobs/{job['id']}").json()
            assert final["state"] == "succeeded", f"{final}\n{procs.logs()}"
            # Failed auth attempts are logged too; the presented token must not be.
            assert (
                c.get(
                    "/v1/status", headers={"Authorization": "Bearer guessed-token-123456"}
                ).status_code
                == 401
            )
        with client(server.url, "guessed-token-abcdef") as bad:
            assert bad.get("/v1/cycles").status_code == 401
        server_log, edge_log = server.log(10**7), edge.log(10**7)

    assert "event=cycle.done" in server_log and "event=succeeded" in edge_log
    for secret in (SERVER_ADMIN_TOKEN, reg["token"], EDGE_ADMIN_TOKEN, "guessed-token"):
        for log in (server_log, edge_log):
            # Any 12-character piece of a token would be a leak, not just the whole token.
            pieces = {secret[i : i + 12] for i in range(0, max(1, len(secret) - 11))}
            leaked = [p for p in pieces if p in log]
            assert not leaked, f"token material {leaked} in a log"
