"""Auth on every route, and edge registration, listing, revocation, token rotation."""

from __future__ import annotations

import logging

import pytest

from server_service.db import EdgeRow
from server_service.services.auth import hash_token
from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import ADMIN_TOKEN, TestClient

# Every route but /health, with a method; ids exist or not, auth comes first.
PROTECTED = [
    ("GET", "/metrics"),
    ("POST", "/v1/edges"),
    ("GET", "/v1/edges"),
    ("DELETE", "/v1/edges/edge-x"),
    ("POST", "/v1/edges/edge-x/token"),
    ("POST", "/v1/cycles"),
    ("GET", "/v1/cycles"),
    ("GET", "/v1/cycles/1"),
    ("PUT", "/v1/cycles/1/features"),
    ("POST", "/v1/cycles/1/train"),
    ("POST", "/v1/cycles/1/cancel"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/latest"),
    ("GET", "/v1/models/1"),
    ("GET", "/v1/models/1/weights"),
]

ADMIN_ONLY = [
    ("POST", "/v1/edges"),
    ("GET", "/v1/edges"),
    ("DELETE", "/v1/edges/edge-x"),
    ("POST", "/v1/edges/edge-x/token"),
    ("POST", "/v1/cycles/1/train"),
    ("POST", "/v1/cycles/1/cancel"),
]


def test_health_needs_no_token(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_no_token_is_401(client: TestClient, method: str, path: str) -> None:
    resp = client.request(method, path)
    assert resp.status_code == 401
    assert resp.json() == {"detail": "missing bearer token"}
    assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_unknown_token_is_401(client: TestClient, method: str, path: str) -> None:
    resp = client.request(method, path, headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401
    assert resp.json() == {"detail": "invalid or revoked token"}
    assert resp.headers["www-authenticate"] == "Bearer"


def test_non_bearer_scheme_is_401(client: TestClient) -> None:
    resp = client.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert resp.status_code == 401
    assert resp.json() == {"detail": "missing bearer token"}


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY)
def test_edge_on_admin_route_is_403(
    client: TestClient, new_edge: EdgeFactory, method: str, path: str
) -> None:
    edge = new_edge()
    kwargs = {"json": {"name": "x"}} if path == "/v1/edges" and method == "POST" else {}
    resp = client.request(method, path, headers=edge.headers, **kwargs)  # type: ignore[arg-type]
    assert resp.status_code == 403
    assert resp.json() == {"detail": "admin token required"}
    assert "www-authenticate" not in resp.headers


def test_admin_cannot_upload(client: TestClient, admin: dict[str, str]) -> None:
    resp = client.put("/v1/cycles/1/features", content=b"x", headers=admin)
    assert resp.status_code == 403
    assert resp.json() == {"detail": "edge token required"}


def test_register_and_list_edges(client: TestClient, admin: dict[str, str]) -> None:
    resp = client.post("/v1/edges", json={"name": "line-a"}, headers=admin)
    assert resp.status_code == 201
    created = resp.json()
    assert created["name"] == "line-a"
    assert created["edge_id"].startswith("edge-")
    assert len(created["token"]) >= 32
    listed = client.get("/v1/edges", headers=admin).json()
    assert [(e["edge_id"], e["name"], e["revoked"]) for e in listed] == [
        (created["edge_id"], "line-a", False)
    ]
    assert "token" not in listed[0]


def test_only_the_token_hash_is_stored(client: TestClient, new_edge: EdgeFactory) -> None:
    edge = new_edge()
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with runtime.sessions() as session:
        row = session.get(EdgeRow, edge.edge_id)
    assert row.token_hash == hash_token(edge.token)
    assert edge.token not in row.token_hash


def test_duplicate_name_is_409(client: TestClient, admin: dict[str, str]) -> None:
    assert client.post("/v1/edges", json={"name": "dup"}, headers=admin).status_code == 201
    resp = client.post("/v1/edges", json={"name": "dup"}, headers=admin)
    assert resp.status_code == 409
    assert resp.json() == {"detail": "an edge named 'dup' is already registered"}


def test_bad_edge_name_is_422_with_string_detail(client: TestClient, admin: dict[str, str]) -> None:
    resp = client.post("/v1/edges", json={"name": "has space"}, headers=admin)
    assert resp.status_code == 422
    assert resp.json() == {"detail": "body.name: String should match pattern '^[A-Za-z0-9_.-]+$'"}


def test_revoked_edge_gets_401(
    client: TestClient, admin: dict[str, str], new_edge: EdgeFactory
) -> None:
    edge = new_edge()
    assert client.get("/v1/models", headers=edge.headers).status_code == 200
    resp = client.delete(f"/v1/edges/{edge.edge_id}", headers=admin)
    assert resp.status_code == 200
    assert resp.json()["revoked"] is True
    resp = client.get("/v1/models", headers=edge.headers)
    assert resp.status_code == 401
    assert resp.json() == {"detail": "invalid or revoked token"}
    # The name is free again for a replacement edge.
    assert client.post("/v1/edges", json={"name": edge.name}, headers=admin).status_code == 201


def test_rotate_token(client: TestClient, admin: dict[str, str], new_edge: EdgeFactory) -> None:
    edge = new_edge()
    resp = client.post(f"/v1/edges/{edge.edge_id}/token", headers=admin)
    assert resp.status_code == 200
    rotated = resp.json()
    assert rotated["edge_id"] == edge.edge_id and rotated["token"] != edge.token
    assert client.get("/v1/models", headers=edge.headers).status_code == 401
    new_headers = {"Authorization": f"Bearer {rotated['token']}"}
    assert client.get("/v1/models", headers=new_headers).status_code == 200


def test_rotate_revoked_edge_is_409(
    client: TestClient, admin: dict[str, str], new_edge: EdgeFactory
) -> None:
    edge = new_edge()
    client.delete(f"/v1/edges/{edge.edge_id}", headers=admin)
    resp = client.post(f"/v1/edges/{edge.edge_id}/token", headers=admin)
    assert resp.status_code == 409
    assert resp.json() == {"detail": f"edge {edge.edge_id!r} is revoked"}


@pytest.mark.parametrize("method", ["DELETE", "POST"])
def test_unknown_edge_is_404(client: TestClient, admin: dict[str, str], method: str) -> None:
    path = "/v1/edges/edge-missing" + ("/token" if method == "POST" else "")
    resp = client.request(method, path, headers=admin)
    assert resp.status_code == 404
    assert resp.json() == {"detail": "edge 'edge-missing' not found"}


def test_metrics_counts_requests_by_route(
    client: TestClient, admin: dict[str, str], new_edge: EdgeFactory
) -> None:
    client.get("/v1/cycles/12345", headers=admin)
    edge = new_edge()
    resp = client.get("/metrics", headers=edge.headers)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert (
        'fedinspect_server_requests_total{method="GET",route="/v1/cycles/{cycle_id}",'
        'status="404"} 1.0' in text
    )
    assert 'fedinspect_server_cycles{state="collecting"} 0.0' in text
    assert "fedinspect_server_upload_bytes_total 0.0" in text
    assert "fedinspect_server_training_seconds_count 0.0" in text


def test_tokens_are_never_logged(
    client: TestClient, admin: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        created = client.post("/v1/edges", json={"name": "quiet"}, headers=admin).json()
        rotated = client.post(f"/v1/edges/{created['edge_id']}/token", headers=admin).json()
        client.get("/v1/models", headers={"Authorization": "Bearer wrong-token-value"})
    text = caplog.text
    assert f"edge_id={created['edge_id']}" in text
    for secret in (created["token"], rotated["token"], ADMIN_TOKEN, "wrong-token-value"):
        assert secret not in text
