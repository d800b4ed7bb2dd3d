"""A real server process: SIGKILL after an acknowledged upload loses nothing."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fedinspect.launcher import ServiceProcess, free_port
from fl_core.features import pack_features
from fl_core.schemas import FeatureSpec
from tests.server_service.helpers import ADMIN_TOKEN, random_rows

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


@contextmanager
def server_process(data_dir: Path, port: int, log: Path) -> Iterator[ServiceProcess]:
    """Start the server in a child process from its settings; always killed at the end."""
    settings = {
        "FEDINSPECT_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
        "FEDINSPECT_SERVER_DATA_DIR": str(data_dir),
        "FEDINSPECT_SERVER_HOST": "127.0.0.1",
        "FEDINSPECT_SERVER_PORT": str(port),
        "FEDINSPECT_SERVER_BACKBONE": "tiny_cnn",
        "FEDINSPECT_SERVER_PRETRAINED": "false",
        "FEDINSPECT_SERVER_INPUT_SIZE": "32",
        "FEDINSPECT_SERVER_MIN_EDGES": "2",
        "FEDINSPECT_SERVER_CYCLE_DEADLINE_S": "3600",
        # rows on the wire, as make_upload builds them
        "FEDINSPECT_SERVER_PRIVACY__MODE": "pooled",
    }
    proc = ServiceProcess("server", "server", settings, log, cwd=ROOT)
    try:
        proc.wait_healthy(START_TIMEOUT_S)
        yield proc
    finally:
        proc.kill()
        proc.stop()


def _client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_upload(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "server", tmp_path / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process(data_dir, port, log) as proc, _client(url, ADMIN_TOKEN) as admin:
        reg = admin.post("/v1/edges", json={"name": "line-a"}).json()
        with _client(url, reg["token"]) as edge:
            cycle = edge.post("/v1/cycles").json()
            spec = FeatureSpec.model_validate(cycle["spec"])
            body = pack_features(*random_rows(spec, 12, seed=0), spec, reg["edge_id"])
            ack = edge.put(
                f"/v1/cycles/{cycle['id']}/features",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
        assert ack.status_code == 201, ack.text
        model = admin.get("/v1/models/1").json()
        # No graceful shutdown: the process dies right after acknowledging.
        os.kill(proc.pid, signal.SIGKILL)
        proc.proc.wait(timeout=30)

    with server_process(data_dir, port, log), _client(url, ADMIN_TOKEN) as admin:
        after = admin.get(f"/v1/cycles/{cycle['id']}").json()
        assert after["state"] == "collecting"
        assert after["deadline"] == cycle["deadline"]
        assert after["joined_edges"] == [reg["edge_id"]]
        (upload,) = after["uploads"]
        assert upload["sha256"] == ack.json()["sha256"] == hashlib.sha256(body).hexdigest()
        assert upload["rows"] == 12 and upload["size"] == len(body)
        weights = admin.get("/v1/models/1/weights")
        assert hashlib.sha256(weights.content).hexdigest() == model["sha256"]
        assert admin.get("/v1/models/1").json() == model
        # The edge's token still works, and re-sending the upload is still a no-op.
        with _client(url, reg["token"]) as edge:
            again = edge.put(f"/v1/cycles/{cycle['id']}/features", content=body)
        assert again.status_code == 200 and again.json()["unchanged"] is True
