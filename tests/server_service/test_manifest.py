"""Per-tensor manifests and tensor subsets: what an edge needs to download only what
changed between two model versions, and rebuild the exact full weights."""

from __future__ import annotations

import hashlib

import pytest

from fl_core import serialization
from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import (
    ADMIN,
    TestClient,
    make_upload,
    put_features,
    wait_for_state,
)


def _train_version_2(client: TestClient, new_edge: EdgeFactory) -> None:
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id, rows=16))
    assert wait_for_state(client, cycle["id"], {"done", "failed"})["state"] == "done"


def test_manifest_lists_every_tensor_with_its_digest(
    client: TestClient, new_edge: EdgeFactory
) -> None:
    edge = new_edge()
    info = client.get("/v1/models/1", headers=edge.headers).json()
    resp = client.get("/v1/models/1/manifest", headers=edge.headers)
    assert resp.status_code == 200, resp.text
    manifest = resp.json()
    assert manifest["version"] == 1 and manifest["sha256"] == info["sha256"]
    weights = client.get("/v1/models/1/weights", headers=edge.headers).content
    assert manifest["tensors"] == serialization.tensor_digests(weights)
    assert set(manifest["tensors"]) == set(serialization.loads(weights)[0])


def test_only_the_upper_part_changes_after_a_cycle(
    client: TestClient, new_edge: EdgeFactory
) -> None:
    _train_version_2(client, new_edge)
    v1 = client.get("/v1/models/1/manifest", headers=ADMIN).json()["tensors"]
    v2 = client.get("/v1/models/2/manifest", headers=ADMIN).json()["tensors"]
    changed = {n for n in v2 if v1.get(n) != v2[n]}
    assert changed and all(n.startswith("head.") for n in changed)


def test_full_weights_rebuild_from_cached_tensors_and_a_subset(
    client: TestClient, new_edge: EdgeFactory
) -> None:
    _train_version_2(client, new_edge)
    old, _ = serialization.loads(client.get("/v1/models/1/weights", headers=ADMIN).content)
    v1 = client.get("/v1/models/1/manifest", headers=ADMIN).json()["tensors"]
    v2 = client.get("/v1/models/2/manifest", headers=ADMIN).json()
    wanted = sorted(n for n, d in v2["tensors"].items() if v1.get(n) != d)
    resp = client.post("/v1/models/2/weights/subset", headers=ADMIN, json={"names": wanted})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    fetched, meta = serialization.loads(resp.content)
    assert sorted(fetched) == wanted
    rebuilt = serialization.dumps({**old, **fetched}, meta)
    assert hashlib.sha256(rebuilt).hexdigest() == v2["sha256"]
    full = client.get("/v1/models/2/weights", headers=ADMIN).content
    assert len(resp.content) < len(full)


def test_unknown_tensor_is_422(client: TestClient) -> None:
    resp = client.post("/v1/models/1/weights/subset", headers=ADMIN, json={"names": ["nope"]})
    assert resp.status_code == 422
    assert resp.json() == {"detail": "model version 1 has no tensor 'nope'"}


def test_empty_subset_is_422(client: TestClient) -> None:
    resp = client.post("/v1/models/1/weights/subset", headers=ADMIN, json={"names": []})
    assert resp.status_code == 422


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models/7/manifest"), ("POST", "/v1/models/7/weights/subset")],
)
def test_unknown_version_is_404(client: TestClient, method: str, path: str) -> None:
    resp = client.request(method, path, headers=ADMIN, json={"names": ["head.1.bias"]})
    assert resp.status_code == 404
    assert resp.json() == {"detail": "model version 7 not found"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models/1/manifest"), ("POST", "/v1/models/1/weights/subset")],
)
def test_routes_need_a_token(client: TestClient, method: str, path: str) -> None:
    resp = client.request(method, path, json={"names": ["head.1.bias"]})
    assert resp.status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert client.request(method, path, headers=bad, json={"names": ["x"]}).status_code == 401
