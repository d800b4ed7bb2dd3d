"""The model registry: base model on first start, metadata, weights with ETag."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fl_core.model import model_from_bytes
from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import (
    ADMIN,
    TestClient,
    make_settings,
    make_upload,
    put_features,
    running,
    wait_for_state,
)


def test_first_start_registers_the_base_model(client: TestClient, new_edge: EdgeFactory) -> None:
    edge = new_edge()
    models = client.get("/v1/models", headers=edge.headers).json()
    assert len(models) == 1
    base = models[0]
    assert base["version"] == 1 and base["parent"] is None
    assert (base["backbone"], base["cut"], base["input_size"]) == ("tiny_cnn", "pooled", 32)
    assert base["class_names"] == ["functional", "defective"]
    assert base["metrics"] is None and base["trained_from"] is None
    assert client.get("/v1/models/latest", headers=edge.headers).json() == base
    assert client.get("/v1/models/1", headers=edge.headers).json() == base


def test_restart_keeps_the_base_model(data_dir: Path) -> None:
    settings = make_settings(data_dir)
    with running(settings) as client:
        first = client.get("/v1/models", headers=ADMIN).json()
    with running(settings) as client:
        assert client.get("/v1/models", headers=ADMIN).json() == first


def test_weights_round_trip_with_etag(client: TestClient, new_edge: EdgeFactory) -> None:
    edge = new_edge()
    info = client.get("/v1/models/1", headers=edge.headers).json()
    resp = client.get("/v1/models/1/weights", headers=edge.headers)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["etag"] == f'"{info["sha256"]}"'
    assert hashlib.sha256(resp.content).hexdigest() == info["sha256"]
    assert len(resp.content) == info["size"]
    model = model_from_bytes(resp.content)
    assert model.class_names == info["class_names"]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize("form", ['"{sha}"', 'W/"{sha}"', '"other", "{sha}"', "*"])
def test_if_none_match_is_304(client: TestClient, form: str) -> None:
    sha = client.get("/v1/models/1", headers=ADMIN).json()["sha256"]
    resp = client.get(
        "/v1/models/1/weights", headers={**ADMIN, "If-None-Match": form.format(sha=sha)}
    )
    assert resp.status_code == 304
    assert resp.content == b""
    assert resp.headers["etag"] == f'"{sha}"'


def test_other_etag_gets_the_bytes(client: TestClient) -> None:
    resp = client.get("/v1/models/1/weights", headers={**ADMIN, "If-None-Match": '"stale"'})
    assert resp.status_code == 200 and resp.content


@pytest.mark.parametrize("path", ["/v1/models/7", "/v1/models/7/weights"])
def test_unknown_version_is_404(client: TestClient, path: str) -> None:
    resp = client.get(path, headers=ADMIN)
    assert resp.status_code == 404
    assert resp.json() == {"detail": "model version 7 not found"}


def test_malformed_version_is_422(client: TestClient) -> None:
    resp = client.get("/v1/models/newest", headers=ADMIN)
    assert resp.status_code == 422
    assert resp.json() == {
        "detail": "path.version: Input should be a valid integer, "
        "unable to parse string as an integer"
    }


def test_trained_weights_load_and_match(client: TestClient, new_edge: EdgeFactory) -> None:
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id, rows=16))
    assert wait_for_state(client, cycle["id"], {"done", "failed"})["state"] == "done"
    info = client.get("/v1/models/latest", headers=edge.headers).json()
    assert info["version"] == 2
    data = client.get("/v1/models/2/weights", headers=edge.headers).content
    assert hashlib.sha256(data).hexdigest() == info["sha256"]
    base = model_from_bytes(client.get("/v1/models/1/weights", headers=ADMIN).content)
    trained = model_from_bytes(data)
    # Only the part above the cut was trained.
    for (name, b), (_, t) in zip(
        base.state_dict().items(), trained.state_dict().items(), strict=True
    ):
        if name.startswith("head."):
            continue
        assert torch.equal(b, t), name
    assert not torch.equal(base.head[-1].weight, trained.head[-1].weight)
