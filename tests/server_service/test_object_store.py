"""The server on PostgreSQL with its blobs in an S3 API server (moto on loopback):
a whole cycle keeps no blob on local disk, and an unreachable store answers uploads
503 with Retry-After, recording nothing."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_service.config import Settings
from tests.server_service.helpers import (
    ADMIN,
    Edge,
    make_settings,
    make_upload,
    put_features,
    running,
    wait_for_state,
)
from tests.services import S3Server


def _s3_settings(data_dir: Path, pg_url: str, endpoint: str) -> Settings:
    bucket = f"fedinspect-{uuid.uuid4().hex[:8]}"
    return make_settings(
        data_dir,
        database_url=pg_url,
        blob_url=f"s3://{bucket}/server",
        s3_endpoint_url=endpoint,
    )


def _register(client: object, name: str) -> Edge:
    resp = client.post("/v1/edges", json={"name": name}, headers=ADMIN)  # type: ignore[attr-defined]
    body = resp.json()
    return Edge(edge_id=body["edge_id"], name=name, token=body["token"])


def _local_blobs(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if p.is_file()] if data_dir.exists() else []


def test_a_cycle_keeps_its_blobs_in_the_object_store(
    tmp_path: Path, pg_url: str, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    data_dir = tmp_path / "server"
    settings = _s3_settings(data_dir, pg_url, s3_server.endpoint)
    with running(settings) as client:
        edge = _register(client, "a")
        cycle = client.post("/v1/cycles", headers=edge.headers).json()
        body = make_upload(cycle, edge.edge_id)
        assert put_features(client, cycle["id"], edge, body).status_code == 201
        done = wait_for_state(client, cycle["id"], {"done", "failed"})
        assert done["state"] == "done", done["reason"]
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.blobs.get(hashlib.sha256(body).hexdigest()) == body
        info = client.get("/v1/models/2", headers=edge.headers).json()
        weights = client.get("/v1/models/2/weights", headers=edge.headers)
        assert weights.status_code == 200
        assert weights.headers["etag"] == f'"{info["sha256"]}"'
        assert hashlib.sha256(weights.content).hexdigest() == info["sha256"]
        manifest = client.get("/v1/models/2/manifest", headers=edge.headers)
        assert manifest.status_code == 200 and manifest.json()["sha256"] == info["sha256"]
        assert client.get("/health").json()["blob_store"] == "ok"
    assert _local_blobs(data_dir) == []
    # A restart (or another replica) on the same database and bucket sees it all.
    with running(settings) as client:
        versions = [m["version"] for m in client.get("/v1/models", headers=ADMIN).json()]
        assert versions == [1, 2]
        again = client.get("/v1/models/2/weights", headers=edge.headers)
        assert again.content == weights.content


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_an_unreachable_store_answers_503_and_records_nothing(
    tmp_path: Path, pg_url: str, own_s3: S3Server, s3_env: dict[str, str]
) -> None:
    settings = _s3_settings(tmp_path / "server", pg_url, own_s3.endpoint)
    settings = settings.model_copy(update={"min_edges": 2})
    with running(settings) as client:
        edge = _register(client, "a")
        cycle = client.post("/v1/cycles", headers=edge.headers).json()
        own_s3.stop()
        resp = put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "2"
        assert "unreachable" in resp.json()["detail"]
        got = client.get(f"/v1/cycles/{cycle['id']}", headers=ADMIN).json()
        assert got["uploads"] == [] and got["state"] == "collecting"
        assert client.get("/health").json()["blob_store"] == "unavailable"
