"""Operator auth: every route but /health needs the edge's admin token."""

from __future__ import annotations

import logging
import re

import pytest

from tests.edge_service.conftest import ADMIN_TOKEN, AUTH, TestClient, wait_job


def _routes(client: TestClient) -> list[tuple[str, str]]:
    """Every documented (method, path), path parameters filled in."""
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, ops in paths.items()
        for method in ops
    ]


def test_health_needs_no_token(edge: TestClient) -> None:
    response = edge.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Bearer admin-secre"},  # a prefix of the real one
        {"Authorization": "Basic YWRtaW4tc2VjcmV0"},
        {"Authorization": "Bearer edge-token"},  # the server token is not the admin token
    ],
)
def test_every_other_route_is_401_without_the_admin_token(
    edge: TestClient, headers: dict[str, str]
) -> None:
    routes = [r for r in _routes(edge) if r[1] != "/health"]
    assert len(routes) >= 10
    for method, path in routes:
        response = edge.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["detail"] in (
            "invalid token",
            "missing bearer token: send Authorization: Bearer <admin token>",
        )
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_the_admin_token_opens_the_routes(edge: TestClient) -> None:
    assert edge.get("/v1/status", headers=AUTH).status_code == 200
    assert edge.get("/v1/models", headers=AUTH).json() == []
    assert edge.get("/metrics", headers=AUTH).status_code == 200


def test_tokens_never_reach_the_logs(edge: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
    edge.get("/v1/status", headers={"Authorization": "Bearer wrong-token"})
    text = caplog.text
    assert ADMIN_TOKEN not in text and "edge-token" not in text
