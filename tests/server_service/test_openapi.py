"""The OpenAPI document lets an operator run a whole cycle from Swagger UI."""

from __future__ import annotations

from typing import Any

from tests.server_service.helpers import TestClient


def _operations(client: TestClient) -> dict[tuple[str, str], dict[str, Any]]:
    doc = client.get("/openapi.json").json()
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }


def test_every_route_is_documented(client: TestClient) -> None:
    ops = _operations(client)
    assert set(ops) == {
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("POST", "/v1/edges"),
        ("GET", "/v1/edges"),
        ("DELETE", "/v1/edges/{edge_id}"),
        ("POST", "/v1/edges/{edge_id}/token"),
        ("POST", "/v1/cycles"),
        ("GET", "/v1/cycles"),
        ("GET", "/v1/cycles/{cycle_id}"),
        ("PUT", "/v1/cycles/{cycle_id}/features"),
        ("PUT", "/v1/cycles/{cycle_id}/rounds/{round_number}/update"),
        ("POST", "/v1/cycles/{cycle_id}/train"),
        ("POST", "/v1/cycles/{cycle_id}/cancel"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/latest"),
        ("GET", "/v1/models/{version}"),
        ("GET", "/v1/models/{version}/weights"),
        ("GET", "/v1/models/{version}/manifest"),
        ("GET", "/v1/models/{version}/update"),
        ("POST", "/v1/models/{version}/weights/subset"),
        ("PUT", "/v1/models/{version}/evaluation"),
        ("GET", "/v1/evaluations"),
        ("GET", "/v1/overview"),
    }
    for key, op in ops.items():
        assert op.get("summary"), key
        ok = next(c for c in op["responses"] if c.startswith("2"))
        assert op["responses"][ok].get("content"), key
        if key != ("GET", "/health"):
            assert "401" in op["responses"], key
            assert op.get("security"), key  # the Authorize button applies


def test_upload_body_is_octet_stream(client: TestClient) -> None:
    op = _operations(client)[("PUT", "/v1/cycles/{cycle_id}/features")]
    content = op["requestBody"]["content"]
    assert content == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    assert {"200", "201", "401", "403", "404", "409", "413", "422"} <= set(op["responses"])
    assert op["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }


def test_latest_is_declared_before_version(client: TestClient) -> None:
    paths = list(client.get("/openapi.json").json()["paths"])
    assert paths.index("/v1/models/latest") < paths.index("/v1/models/{version}")


def test_routes_that_read_stored_weights_document_the_corrupt_answer(client: TestClient) -> None:
    ops = _operations(client)
    for key in (
        ("GET", "/v1/models/{version}/weights"),
        ("GET", "/v1/models/{version}/manifest"),
        ("GET", "/v1/models/{version}/update"),
        ("POST", "/v1/models/{version}/weights/subset"),
    ):
        answer = ops[key]["responses"]["503"]
        assert "corrupt" in answer["description"], key
        assert answer["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
