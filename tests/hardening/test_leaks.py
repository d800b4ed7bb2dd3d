"""What logs and responses must not carry, against real processes (issue 24, defects 8,
10, 12 and the access log): user info of the edge's server URL, query strings, one
metric series per made-up HTTP method, tracebacks for an ordinary client hang-up."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx

from tests.hardening.procs import (
    EDGE_ADMIN_TOKEN,
    HOST,
    SERVER_ADMIN_TOKEN,
    client,
    edge_env,
    free_port,
    register_edge,
    services,
    wait_until,
)
from tests.hardening.rawhttp import open_request
from tests.server_service.helpers import make_upload

URL_SECRET = "url-password-5f3a9c"
QUERY_SECRET = "query-token-9b7e21"


def test_the_access_log_drops_query_strings(tmp_path: Path) -> None:
    port = free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", port)
        with httpx.Client(base_url=server.url, timeout=30) as anon:
            # a misconfigured client putting its token in the URL
            assert anon.get(f"/health?token={QUERY_SECRET}").status_code == 200
            assert anon.get(f"/v1/cycles?access_token={QUERY_SECRET}").status_code == 401
        log = server.log(500_000)
    assert "GET /health HTTP/1.1" in log and "GET /v1/cycles HTTP/1.1" in log  # logged...
    assert QUERY_SECRET not in log  # ...without the query


def test_made_up_methods_share_one_metric_label(tmp_path: Path) -> None:
    port = free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", port)
        with httpx.Client(base_url=server.url, timeout=30) as anon:
            for i in range(20):
                anon.request(f"X{i:02d}METHOD", "/health")
                anon.request(f"Y{i:02d}METHOD", "/v1/models")
        with client(server.url, SERVER_ADMIN_TOKEN) as admin:
            metrics = admin.get("/metrics").text
    methods = set(re.findall(r'method="([^"]*)"', metrics))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert "other" in methods


def test_a_hang_up_mid_upload_is_one_warning_line(tmp_path: Path) -> None:
    port = free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", port, min_edges="2")
        edge = register_edge(server.url, "edge-a")
        with client(server.url, edge["token"]) as c:
            cycle = c.post("/v1/cycles").json()
            body = make_upload(cycle, edge["edge_id"], rows=64, seed=1)
            sock = open_request(
                port,
                "PUT",
                f"/v1/cycles/{cycle['id']}/features",
                len(body),
                edge["token"],
                first_bytes=body[: len(body) // 2],
            )
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            wait_until(
                lambda: (
                    "event=request.disconnected" in server.log(200_000)
                    or "Traceback" in server.log(200_000)
                ),
                30,
                "the hang-up to be logged",
            )
            after = c.get(f"/v1/cycles/{cycle['id']}").json()
            assert after["uploads"] == []  # nothing half-sent was stored
            assert c.put(f"/v1/cycles/{cycle['id']}/features", content=body).status_code == 201
        server.check_alive()
        log = server.log(500_000)
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    hang_ups = [line for line in log.splitlines() if "event=request.disconnected" in line]
    assert len(hang_ups) == 1 and " WARNING " in hang_ups[0], hang_ups


def test_edge_redacts_user_info_of_its_server_url(tmp_path: Path, image_folder: Path) -> None:
    port = free_port()
    server_url = f"http://operator:{URL_SECRET}@{HOST}:9"
    env = edge_env(tmp_path / "edge", port, server_url, "edge-server-token-0", "e1", image_folder)
    with services(tmp_path) as procs:
        edge = procs.edge("edge", port, env)
        with client(edge.url, EDGE_ADMIN_TOKEN) as c:
            status = c.get(f"/v1/status?token={QUERY_SECRET}")
            assert status.status_code == 200
            assert status.json()["server_url"] == f"http://***@{HOST}:9"
            assert URL_SECRET not in status.text
        log = edge.log(500_000)
    assert f"server=http://***@{HOST}:9" in log
    assert URL_SECRET not in log and QUERY_SECRET not in log
