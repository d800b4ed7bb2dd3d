"""Authorization matrix of both services, from their OpenAPI schemas.

Every route a service declares (``app.openapi()["paths"]``, so a new route cannot be
forgotten) is called by every kind of caller: none, a malformed Authorization header,
a wrong token, a revoked edge, another edge, the edge, the admin. Only ``/health``
answers without a valid token; a role a route does not admit gets 403 (server) and an
unknown token 401 with ``WWW-Authenticate: Bearer``. The schema and the interactive
docs (``/openapi.json``, ``/docs``, ``/redoc``) and the operator page (``/ui``, data-free
HTML whose data comes from the API with a token) are public on purpose (SECURITY.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_service.main import create_app as create_edge_app
from tests.edge_service.conftest import AUTH as EDGE_ADMIN
from tests.edge_service.conftest import make_settings as make_edge_settings
from tests.server_service.helpers import (
    ADMIN,
    Edge,
    TestClient,
    make_settings,
    make_upload,
    put_features,
    running,
)

PUBLIC = {("GET", "/health")}
PUBLIC_DOCS = ["/openapi.json", "/docs", "/redoc", "/ui"]

#: server routes and the roles they admit; every route the schema lists must be here
SERVER_ROLES: dict[tuple[str, str], set[str]] = {
    ("GET", "/health"): {"anyone"},
    ("GET", "/metrics"): {"edge", "admin"},
    ("POST", "/v1/edges"): {"admin"},
    ("GET", "/v1/edges"): {"admin"},
    ("DELETE", "/v1/edges/{edge_id}"): {"admin"},
    ("POST", "/v1/edges/{edge_id}/token"): {"admin"},
    ("POST", "/v1/cycles"): {"edge", "admin"},
    ("GET", "/v1/cycles"): {"edge", "admin"},
    ("GET", "/v1/cycles/{cycle_id}"): {"edge", "admin"},
    ("PUT", "/v1/cycles/{cycle_id}/features"): {"edge"},
    ("PUT", "/v1/cycles/{cycle_id}/rounds/{round_number}/update"): {"edge"},
    ("POST", "/v1/cycles/{cycle_id}/train"): {"admin"},
    ("POST", "/v1/cycles/{cycle_id}/cancel"): {"admin"},
    ("GET", "/v1/models"): {"edge", "admin"},
    ("GET", "/v1/models/latest"): {"edge", "admin"},
    ("GET", "/v1/models/{version}"): {"edge", "admin"},
    ("GET", "/v1/models/{version}/weights"): {"edge", "admin"},
    ("GET", "/v1/models/{version}/manifest"): {"edge", "admin"},
    ("POST", "/v1/models/{version}/weights/subset"): {"edge", "admin"},
    ("GET", "/v1/models/{version}/update"): {"edge", "admin"},
    ("PUT", "/v1/models/{version}/evaluation"): {"edge"},
    ("GET", "/v1/evaluations"): {"admin"},
    ("GET", "/v1/overview"): {"admin"},
}

UNAUTHENTICATED = ["none", "malformed: no scheme", "malformed: basic", "wrong token", "revoked"]
MALFORMED = {
    "malformed: no scheme": "just-a-token-without-scheme",
    "malformed: basic": "Basic dXNlcjpwYXNz",
}


def routes(app: Any) -> list[tuple[str, str]]:
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]
    return sorted((m.upper(), p) for p, item in paths.items() for m in item)


@dataclass
class ServerWorld:
    client: TestClient
    edge: Edge
    other: Edge
    revoked: Edge
    victim: Edge
    cycle: dict[str, Any]

    def headers(self, caller: str) -> dict[str, str]:
        tokens = {
            "wrong token": "Bearer not-a-token-anyone-was-given",
            "revoked": f"Bearer {self.revoked.token}",
            "other edge": f"Bearer {self.other.token}",
            "edge": f"Bearer {self.edge.token}",
            "admin": ADMIN["Authorization"],
            **MALFORMED,
        }
        return {"Authorization": tokens[caller]} if caller in tokens else {}

    def request(self, method: str, path: str, caller: str) -> httpx.Response:
        url = (
            path.replace("{cycle_id}", str(self.cycle["id"]))
            .replace("{version}", "1")
            .replace("{round_number}", "1")
            .replace("{edge_id}", self.victim.edge_id)
        )
        kwargs: dict[str, Any] = {}
        if (method, path) == ("POST", "/v1/edges"):
            kwargs["json"] = {"name": f"new-{caller.replace(' ', '-').replace(':', '')}"}
        if path.endswith("/weights/subset"):
            kwargs["json"] = {"names": ["head.1.bias"]}
        if path.endswith("/evaluation"):
            kwargs["json"] = {"deployed": False, "n_test": 0}
        if path.endswith("/features"):
            kwargs["content"] = make_upload(self.cycle, self.edge.edge_id, seed=3)
            kwargs["headers"] = {"Content-Type": "application/octet-stream"}
        headers = {**kwargs.pop("headers", {}), **self.headers(caller)}
        return self.client.request(method, url, headers=headers, **kwargs)


def _register(client: TestClient, name: str) -> Edge:
    body = client.post("/v1/edges", json={"name": name}, headers=ADMIN).json()
    return Edge(edge_id=body["edge_id"], name=body["name"], token=body["token"])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ServerWorld]:
    with running(make_settings(tmp_path / "server", min_edges=3)) as client:
        edge, other = _register(client, "line-a"), _register(client, "line-b")
        revoked, victim = _register(client, "line-old"), _register(client, "line-victim")
        assert client.delete(f"/v1/edges/{revoked.edge_id}", headers=ADMIN).status_code == 200
        cycle = client.post("/v1/cycles", headers=edge.headers).json()
        yield ServerWorld(client, edge, other, revoked, victim, cycle)


def test_every_server_route_is_in_the_matrix(world: ServerWorld) -> None:
    assert routes(world.client.app) == sorted(SERVER_ROLES)


@pytest.mark.parametrize("caller", UNAUTHENTICATED)
def test_server_refuses_callers_without_a_valid_token(world: ServerWorld, caller: str) -> None:
    for method, path in routes(world.client.app):
        response = world.request(method, path, caller)
        if (method, path) in PUBLIC:
            assert response.status_code == 200
            continue
        assert response.status_code == 401, (method, path, response.text)
        expected = "missing bearer token" if caller.startswith(("none", "malformed")) else None
        assert response.json()["detail"] == (expected or "invalid or revoked token")
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("caller", ["edge", "other edge", "admin"])
def test_server_roles(world: ServerWorld, caller: str) -> None:
    role = "admin" if caller == "admin" else "edge"
    for method, path in routes(world.client.app):
        response = world.request(method, path, caller)
        allowed = SERVER_ROLES[(method, path)] & {role, "anyone"}
        if allowed and (method, path) == ("GET", "/v1/models/{version}/update"):
            # past the token check: model 1 is the base model, no round's aggregate
            assert response.status_code == 404, (caller, response.text)
            assert "not a federated round's aggregate" in response.json()["detail"]
        elif allowed:
            assert response.status_code < 400 or response.status_code == 409, (
                method,
                path,
                caller,
                response.text,
            )
        else:
            assert response.status_code == 403, (method, path, caller, response.text)
            detail = "admin token required" if role == "edge" else "edge token required"
            assert response.json()["detail"] == detail


def test_an_edge_cannot_touch_another_edges_upload(world: ServerWorld) -> None:
    c, cycle_id = world.client, world.cycle["id"]
    mine = make_upload(world.cycle, world.edge.edge_id, seed=1)
    assert put_features(c, cycle_id, world.edge, mine).status_code == 201
    before = c.get(f"/v1/cycles/{cycle_id}", headers=ADMIN).json()["uploads"]

    # The other edge's PUT (even of different bytes claiming our edge id in its
    # metadata) lands in its own slot: the upload is keyed by the token, not the body.
    forged = make_upload(world.cycle, world.edge.edge_id, seed=2)
    assert put_features(c, cycle_id, world.other, forged).status_code == 201
    after = c.get(f"/v1/cycles/{cycle_id}", headers=ADMIN).json()["uploads"]
    by_edge = {u["edge_id"]: u for u in after}
    assert by_edge[world.edge.edge_id] == before[0]
    assert set(by_edge) == {world.edge.edge_id, world.other.edge_id}
    # No route serves upload bytes back: the blob store answers only model weights.
    sha = before[0]["sha256"]
    assert not [p for _m, p in routes(c.app) if "upload" in p or "blob" in p]
    assert c.get(f"/v1/models/{sha}/weights", headers=world.other.headers).status_code == 422


def test_an_edge_cannot_train_cancel_or_register(world: ServerWorld) -> None:
    c, cycle_id, h = world.client, world.cycle["id"], world.edge.headers
    put_features(c, cycle_id, world.edge, make_upload(world.cycle, world.edge.edge_id))
    assert c.post(f"/v1/cycles/{cycle_id}/train", headers=h).status_code == 403
    assert c.post(f"/v1/cycles/{cycle_id}/cancel", headers=h).status_code == 403
    assert c.post("/v1/edges", json={"name": "rogue"}, headers=h).status_code == 403
    assert c.delete(f"/v1/edges/{world.other.edge_id}", headers=h).status_code == 403
    assert c.post(f"/v1/edges/{world.other.edge_id}/token", headers=h).status_code == 403
    assert c.get(f"/v1/cycles/{cycle_id}", headers=h).json()["state"] == "collecting"
    names = {e["name"] for e in c.get("/v1/edges", headers=ADMIN).json()}
    assert "rogue" not in names
    assert c.get("/v1/cycles", headers=world.other.headers).status_code == 200


def test_revoke_and_rotate_edge_tokens(world: ServerWorld) -> None:
    c, cycle_id = world.client, world.cycle["id"]
    assert (
        put_features(
            c, cycle_id, world.other, make_upload(world.cycle, world.other.edge_id)
        ).status_code
        == 201
    )

    rotated = c.post(f"/v1/edges/{world.edge.edge_id}/token", headers=ADMIN)
    assert rotated.status_code == 200
    new_token = rotated.json()["token"]
    assert new_token != world.edge.token
    assert c.get("/v1/cycles", headers=world.edge.headers).status_code == 401
    assert c.get("/v1/cycles", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200

    revoked = c.delete(f"/v1/edges/{world.other.edge_id}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    refused = c.get("/v1/cycles", headers=world.other.headers)
    assert refused.status_code == 401
    assert refused.json() == {"detail": "invalid or revoked token"}
    # A revoked edge's token cannot be brought back by rotation; its past upload stays.
    again = c.post(f"/v1/edges/{world.other.edge_id}/token", headers=ADMIN)
    assert again.status_code == 409
    uploads = c.get(f"/v1/cycles/{cycle_id}", headers=ADMIN).json()["uploads"]
    assert [u["edge_id"] for u in uploads] == [world.other.edge_id]
    # Tokens are stored hashed: nothing the API lists carries a token.
    listed = c.get("/v1/edges", headers=ADMIN).text
    assert new_token not in listed and world.other.token not in listed


def test_server_docs_and_schema_are_public(world: ServerWorld) -> None:
    for path in PUBLIC_DOCS:
        assert world.client.get(path).status_code == 200, path
    schema = world.client.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert re.search(r"token", str(schema)) is not None


# --------------------------------------------------------------------------- edge

EDGE_CALLERS = {
    "none": {},
    **{k: {"Authorization": v} for k, v in MALFORMED.items()},
    "wrong token": {"Authorization": "Bearer wrong"},
    # The edge's own server token (and another edge's) do not open its operator API.
    "edge's server token": {"Authorization": "Bearer edge-token"},
    "another edge's server token": {"Authorization": "Bearer another-edge-token"},
}


@pytest.fixture
def edge_client(tmp_path: Path, image_folder: Path) -> Iterator[TestClient]:
    refusing = httpx.Client(
        transport=httpx.MockTransport(lambda _r: httpx.Response(401, json={"detail": "no"})),
        base_url="http://server.invalid",
    )
    app = create_edge_app(make_edge_settings(tmp_path / "edge", image_folder), refusing)
    try:
        with TestClient(app) as client:
            yield client
            app.state.ctx.runner.wait_idle(30)
    finally:
        refusing.close()


def _edge_request(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    url = path.replace("{job_id}", "0" * 32).replace("{model_id}", "1")
    kwargs: dict[str, Any] = {}
    if path == "/v1/predict":
        kwargs["files"] = {"files": ("a.png", b"\x89PNG\r\n\x1a\n")}
    return client.request(method, url, headers=headers, **kwargs)


@pytest.mark.parametrize("caller", sorted(EDGE_CALLERS))
def test_edge_refuses_callers_without_its_admin_token(edge_client: TestClient, caller: str) -> None:
    for method, path in routes(edge_client.app):
        response = _edge_request(edge_client, method, path, EDGE_CALLERS[caller])
        if (method, path) in PUBLIC:
            assert response.status_code == 200
            continue
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_edge_admin_reaches_every_route(edge_client: TestClient) -> None:
    for method, path in routes(edge_client.app):
        response = _edge_request(edge_client, method, path, EDGE_ADMIN)
        assert response.status_code not in (401, 403), (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)
    for path in PUBLIC_DOCS:
        assert edge_client.get(path).status_code == 200, path
