"""Feature uploads: validation before storage, idempotency, body limits, states."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.requests import Request
from starlette.types import Message, Scope

from fl_core.errors import PayloadTooLarge
from server_service.api.deps import read_body_limited
from server_service.config import Settings
from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import (
    TestClient,
    make_settings,
    make_upload,
    put_features,
    random_rows,
    raw_upload,
    running,
    spec_of,
    wait_for_state,
)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    # Two edges needed, so a single upload leaves the cycle collecting.
    return make_settings(data_dir, min_edges=2, max_upload_rows=50, max_upload_bytes=8192)


@pytest.fixture
def cycle(client: TestClient, new_edge: EdgeFactory) -> dict[str, Any]:
    edge = new_edge("uploader")
    body: dict[str, Any] = client.post("/v1/cycles", headers=edge.headers).json()
    body["_edge"] = edge
    return body


def test_upload_is_acknowledged_and_listed(
    client: TestClient, admin: dict[str, str], cycle: dict[str, Any]
) -> None:
    edge = cycle["_edge"]
    body = make_upload(cycle, edge.edge_id, rows=10)
    resp = put_features(client, cycle["id"], edge, body)
    assert resp.status_code == 201
    ack = resp.json()
    assert ack["cycle_id"] == cycle["id"] and ack["edge_id"] == edge.edge_id
    assert ack["rows"] == 10
    assert (ack["unchanged"], ack["replaced"]) == (False, False)
    got = client.get(f"/v1/cycles/{cycle['id']}", headers=admin).json()
    assert got["state"] == "collecting"
    (upload,) = got["uploads"]
    assert upload["edge_id"] == edge.edge_id
    assert (upload["rows"], upload["size"], upload["sha256"]) == (10, len(body), ack["sha256"])
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert runtime.blobs.get(ack["sha256"]) == body


def test_same_bytes_again_is_a_no_op_and_different_bytes_replace(
    client: TestClient, admin: dict[str, str], cycle: dict[str, Any]
) -> None:
    edge = cycle["_edge"]
    first = make_upload(cycle, edge.edge_id, rows=10, seed=1)
    assert put_features(client, cycle["id"], edge, first).status_code == 201
    again = put_features(client, cycle["id"], edge, first)
    assert again.status_code == 200
    assert (again.json()["unchanged"], again.json()["replaced"]) == (True, False)
    other = make_upload(cycle, edge.edge_id, rows=12, seed=2)
    replaced = put_features(client, cycle["id"], edge, other)
    assert replaced.status_code == 200
    assert (replaced.json()["unchanged"], replaced.json()["replaced"]) == (False, True)
    assert replaced.json()["rows"] == 12
    uploads = client.get(f"/v1/cycles/{cycle['id']}", headers=admin).json()["uploads"]
    assert [(u["rows"], u["sha256"]) for u in uploads] == [(12, replaced.json()["sha256"])]


def test_uploading_makes_an_edge_a_member(
    client: TestClient, admin: dict[str, str], cycle: dict[str, Any], new_edge: EdgeFactory
) -> None:
    late = new_edge("late")  # never called POST /v1/cycles
    resp = put_features(client, cycle["id"], late, make_upload(cycle, late.edge_id))
    assert resp.status_code == 201
    got = client.get(f"/v1/cycles/{cycle['id']}", headers=admin).json()
    assert late.edge_id in got["joined_edges"]


def test_different_upload_after_collection_is_409_same_is_200(
    client: TestClient, admin: dict[str, str], cycle: dict[str, Any]
) -> None:
    edge = cycle["_edge"]
    body = make_upload(cycle, edge.edge_id, rows=12)
    put_features(client, cycle["id"], edge, body)
    client.post(f"/v1/cycles/{cycle['id']}/train", headers=admin)
    wait_for_state(client, cycle["id"], {"done"})
    resp = put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id, seed=5))
    assert resp.status_code == 409
    assert resp.json() == {
        "detail": f"cycle {cycle['id']} is done; uploads are accepted only while it is collecting"
    }
    # A retry of the acknowledged bytes (lost answer) is still a no-op.
    resp = put_features(client, cycle["id"], edge, body)
    assert resp.status_code == 200 and resp.json()["unchanged"] is True


def _features(cycle: dict[str, Any], rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return random_rows(spec_of(cycle), rows, seed=3)


def _bad_bodies(cycle: dict[str, Any]) -> Iterator[tuple[str, bytes, str]]:
    x, y = _features(cycle)
    yield (
        "not safetensors",
        b"definitely not a safetensors file",
        "body is not a safetensors file: header length out of range",
    )
    yield ("empty", b"", "body is not a safetensors file: shorter than its 8-byte header")
    yield (
        "wrong spec hash",
        raw_upload(cycle, {"features": x, "labels": y}, spec_hash="0" * 64),
        "spec hash does not match this cycle's feature spec",
    )
    nan = x.clone()
    nan[2, 5] = float("nan")
    yield ("nan", raw_upload(cycle, {"features": nan, "labels": y}), "features contain NaN or Inf")
    yield (
        "label out of range",
        raw_upload(cycle, {"features": x, "labels": torch.tensor([0, 1, 2, 0, 1, 0])}),
        "labels must lie in [0, 1]",
    )
    yield (
        "negative label",
        raw_upload(cycle, {"features": x, "labels": torch.tensor([0, 1, -1, 0, 1, 0])}),
        "labels must lie in [0, 1]",
    )
    yield (
        "wrong shape",
        raw_upload(cycle, {"features": x[:, :16].contiguous(), "labels": y}),
        "feature rows have shape [16], the spec says [32]",
    )
    yield (
        "wrong dtype",
        raw_upload(cycle, {"features": x.double(), "labels": y}),
        "features dtype F64 does not match the spec's float32",
    )
    yield (
        "labels not int64",
        raw_upload(cycle, {"features": x, "labels": y.int()}),
        "labels must be int64 of shape [6]",
    )
    yield (
        "extra tensor",
        raw_upload(cycle, {"features": x, "labels": y, "extra": y.clone()}),
        "upload must hold exactly the tensors ['features', 'labels']",
    )
    big_x, big_y = random_rows(spec_of(cycle), 51, seed=0)
    yield (
        "too many rows",
        raw_upload(cycle, {"features": big_x, "labels": big_y}),
        "upload holds 51 rows; the limit is 50",
    )


@pytest.mark.parametrize(
    "case",
    [
        "not safetensors",
        "empty",
        "wrong spec hash",
        "nan",
        "label out of range",
        "negative label",
        "wrong shape",
        "wrong dtype",
        "labels not int64",
        "extra tensor",
        "too many rows",
    ],
)
def test_invalid_upload_is_422_and_not_stored(
    client: TestClient, admin: dict[str, str], cycle: dict[str, Any], case: str
) -> None:
    name, body, detail = next(b for b in _bad_bodies(cycle) if b[0] == case)
    resp = put_features(client, cycle["id"], cycle["_edge"], body)
    assert resp.status_code == 422, name
    assert resp.json() == {"detail": detail}
    assert client.get(f"/v1/cycles/{cycle['id']}", headers=admin).json()["uploads"] == []


def test_body_over_limit_by_content_length_is_413(
    client: TestClient, cycle: dict[str, Any]
) -> None:
    resp = put_features(client, cycle["id"], cycle["_edge"], b"\0" * 8193)
    assert resp.status_code == 413
    assert resp.json() == {"detail": "upload exceeds the limit of 8192 bytes"}


def test_streamed_body_over_limit_is_413(client: TestClient, cycle: dict[str, Any]) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):  # 100 kB in all, far past the 8 KiB limit
            yield b"\0" * 1000

    edge = cycle["_edge"]
    resp = client.put(
        f"/v1/cycles/{cycle['id']}/features",
        content=chunks(),
        headers={**edge.headers, "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 413
    assert resp.json() == {"detail": "upload exceeds the limit of 8192 bytes"}
    assert "content-length" not in {k.lower() for k in resp.request.headers}


def test_body_reader_stops_at_the_limit() -> None:
    received = 0

    async def receive() -> Message:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"\0" * 1000, "more_body": received < 1000}

    scope: Scope = {"type": "http", "method": "PUT", "path": "/", "headers": []}
    request = Request(scope, receive)
    with pytest.raises(PayloadTooLarge) as err:
        asyncio.run(read_body_limited(request, 8192))
    assert err.value.detail == "upload exceeds the limit of 8192 bytes"
    assert received == 9  # the first chunk past 8192 bytes, and not one more


def test_streamed_body_under_limit_is_accepted(client: TestClient, cycle: dict[str, Any]) -> None:
    edge = cycle["_edge"]
    body = make_upload(cycle, edge.edge_id, rows=8)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    resp = client.put(
        f"/v1/cycles/{cycle['id']}/features",
        content=chunks(),
        headers={**edge.headers, "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 201
    assert resp.json()["rows"] == 8


def test_upload_metrics(client: TestClient, admin: dict[str, str], cycle: dict[str, Any]) -> None:
    edge = cycle["_edge"]
    body = make_upload(cycle, edge.edge_id, rows=8)
    put_features(client, cycle["id"], edge, body)
    text = client.get("/metrics", headers=admin).text
    assert f"fedinspect_server_upload_bytes_total {float(len(body))}" in text
    assert 'fedinspect_server_uploads_total{outcome="stored"} 1.0' in text


def test_each_edge_writes_only_its_own_upload(
    client: TestClient, admin: dict[str, str], cycle: dict[str, Any], new_edge: EdgeFactory
) -> None:
    owner, other = cycle["_edge"], new_edge("other")
    put_features(client, cycle["id"], owner, make_upload(cycle, owner.edge_id, seed=1))
    # The other edge's PUT lands in its own slot: it never replaces the owner's upload.
    resp = put_features(client, cycle["id"], other, make_upload(cycle, owner.edge_id, seed=2))
    assert resp.json()["edge_id"] == other.edge_id and resp.json()["replaced"] is False
    uploads = client.get(f"/v1/cycles/{cycle['id']}", headers=admin).json()["uploads"]
    assert sorted(u["edge_id"] for u in uploads) == sorted([owner.edge_id, other.edge_id])


def test_a_fresh_server_runs_with_own_settings(data_dir: Path) -> None:
    # A second app on another DATA_DIR does not collide (own metrics registry).
    with running(make_settings(data_dir.parent / "other")) as c:
        assert c.get("/health").status_code == 200


def test_an_upload_looks_its_token_up_once(
    client: TestClient, cycle: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route's dependency checks the token before the body; the request guard, which
    must see the caller before it reads a byte, reuses that check instead of a second
    database lookup. A wrong token is still refused before the body."""
    from server_service.services import auth

    lookups: list[str | None] = []
    real = auth.authenticate

    def counting(session: Any, settings: Settings, token: str | None) -> auth.Caller:
        lookups.append(token)
        return real(session, settings, token)

    monkeypatch.setattr(auth, "authenticate", counting)
    edge = cycle["_edge"]
    resp = put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id, rows=10))
    assert resp.status_code == 201
    assert len(lookups) == 1
    refused = client.put(
        f"/v1/cycles/{cycle['id']}/features",
        content=make_upload(cycle, edge.edge_id, rows=10),
        headers={"Authorization": "Bearer not-a-token", "Content-Type": "application/octet-stream"},
    )
    assert refused.status_code == 401
