"""Opening, joining, listing, inspecting, training and cancelling cycles."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest

from fl_core.schemas import FeatureSpec
from server_service.services import models
from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import TestClient, make_upload, put_features, wait_for_state


def test_open_then_join(client: TestClient, admin: dict[str, str], new_edge: EdgeFactory) -> None:
    a, b = new_edge(), new_edge()
    first = client.post("/v1/cycles", headers=a.headers)
    assert first.status_code == 201
    cycle = first.json()
    assert cycle["state"] == "collecting"
    assert cycle["base_model_version"] == 1
    assert cycle["min_edges"] == 1
    assert cycle["joined_edges"] == [a.edge_id]
    assert cycle["uploads"] == []
    assert cycle["result_model_version"] is None
    spec = FeatureSpec.model_validate(cycle["spec"])
    assert cycle["spec_hash"] == spec.spec_hash()
    assert (spec.backbone, spec.cut, spec.input_size, spec.feature_shape) == (
        "tiny_cnn",
        "pooled",
        32,
        [32],
    )
    model = client.get("/v1/models/1", headers=admin).json()
    assert spec.base_model_sha256 == model["sha256"]
    deadline = datetime.fromisoformat(cycle["deadline"])
    created = datetime.fromisoformat(cycle["created_at"])
    assert deadline - created == timedelta(seconds=60)

    second = client.post("/v1/cycles", headers=b.headers)
    assert second.status_code == 200
    assert second.json()["id"] == cycle["id"]
    assert second.json()["joined_edges"] == [a.edge_id, b.edge_id]
    # Joining twice, or as the admin, adds nobody.
    assert client.post("/v1/cycles", headers=a.headers).json()["joined_edges"] == [
        a.edge_id,
        b.edge_id,
    ]
    by_admin = client.post("/v1/cycles", headers=admin)
    assert by_admin.status_code == 200
    assert by_admin.json()["joined_edges"] == [a.edge_id, b.edge_id]


def test_get_and_list(client: TestClient, admin: dict[str, str], new_edge: EdgeFactory) -> None:
    edge = new_edge()
    cycle_id = client.post("/v1/cycles", headers=edge.headers).json()["id"]
    resp = client.get(f"/v1/cycles/{cycle_id}", headers=edge.headers)
    assert resp.status_code == 200 and resp.json()["id"] == cycle_id
    listed = client.get("/v1/cycles", headers=edge.headers).json()
    assert [c["id"] for c in listed] == [cycle_id]
    assert client.get("/v1/cycles?state=collecting", headers=admin).json()[0]["id"] == cycle_id
    assert client.get("/v1/cycles?state=done", headers=admin).json() == []


def test_unknown_cycle_is_404(client: TestClient, admin: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/v1/cycles/999"),
        ("POST", "/v1/cycles/999/train"),
        ("POST", "/v1/cycles/999/cancel"),
    ]:
        resp = client.request(method, path, headers=admin)
        assert resp.status_code == 404, path
        assert resp.json() == {"detail": "cycle 999 not found"}


def test_unknown_cycle_upload_is_404(client: TestClient, new_edge: EdgeFactory) -> None:
    resp = put_features(client, 999, new_edge(), b"anything")
    assert resp.status_code == 404
    assert resp.json() == {"detail": "cycle 999 not found"}


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        (
            "/v1/cycles/abc",
            "path.cycle_id: Input should be a valid integer, unable to parse string as an integer",
        ),
        ("/v1/cycles/0", "path.cycle_id: Input should be greater than or equal to 1"),
        (
            "/v1/cycles/99999999999",
            "path.cycle_id: Input should be less than or equal to 2147483647",
        ),
        (
            "/v1/cycles?state=nope",
            "query.state: Input should be "
            # the list of states is cut at fedinspect.service's echo limit (80 characters)
            "'collecting', 'training', 'rounds', 'done', 'failed' or 'cancell... "
            "(83 characters)",
        ),
    ],
)
def test_malformed_input_is_422(
    client: TestClient, admin: dict[str, str], path: str, detail: str
) -> None:
    resp = client.get(path, headers=admin)
    assert resp.status_code == 422
    assert resp.json() == {"detail": detail}


def test_train_now_needs_uploads_then_trains(
    client: TestClient, admin: dict[str, str], new_edge: EdgeFactory
) -> None:
    a, b = new_edge(), new_edge()
    cycle = client.post("/v1/cycles", headers=a.headers).json()
    client.post("/v1/cycles", headers=b.headers)
    resp = client.post(f"/v1/cycles/{cycle['id']}/train", headers=admin)
    assert resp.status_code == 409
    assert resp.json() == {"detail": f"cycle {cycle['id']} has no uploads yet"}
    # a uploads; b joined but has not: the cycle waits for b until told to train.
    assert put_features(client, cycle["id"], a, make_upload(cycle, a.edge_id)).status_code == 201
    assert client.get(f"/v1/cycles/{cycle['id']}", headers=admin).json()["state"] == "collecting"
    resp = client.post(f"/v1/cycles/{cycle['id']}/train", headers=admin)
    assert resp.status_code == 200
    assert resp.json()["state"] in ("training", "done")
    done = wait_for_state(client, cycle["id"], {"done"})
    assert done["result_model_version"] == 2
    resp = client.post(f"/v1/cycles/{cycle['id']}/train", headers=admin)
    assert resp.status_code == 409
    assert resp.json() == {
        "detail": f"cycle {cycle['id']} is done; only a collecting cycle can start training"
    }


def test_cancel(client: TestClient, admin: dict[str, str], new_edge: EdgeFactory) -> None:
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    resp = client.post(f"/v1/cycles/{cycle['id']}/cancel", headers=admin)
    assert resp.status_code == 200
    body = resp.json()
    assert body["state"] == "cancelled"
    assert body["reason"] == "cancelled by an operator"
    resp = client.post(f"/v1/cycles/{cycle['id']}/cancel", headers=admin)
    assert resp.status_code == 409
    assert resp.json() == {
        "detail": f"cycle {cycle['id']} is cancelled; it cannot become cancelled"
    }
    resp = put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
    assert resp.status_code == 409
    assert resp.json() == {
        "detail": f"cycle {cycle['id']} is cancelled; "
        "uploads are accepted only while it is collecting"
    }
    # A new request opens a new cycle.
    again = client.post("/v1/cycles", headers=edge.headers)
    assert again.status_code == 201 and again.json()["id"] != cycle["id"]


def test_cancel_done_cycle_is_409(
    client: TestClient, admin: dict[str, str], new_edge: EdgeFactory
) -> None:
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
    wait_for_state(client, cycle["id"], {"done"})
    resp = client.post(f"/v1/cycles/{cycle['id']}/cancel", headers=admin)
    assert resp.status_code == 409
    assert resp.json() == {"detail": f"cycle {cycle['id']} is done; it cannot become cancelled"}


def test_concurrent_requests_share_one_cycle(client: TestClient, new_edge: EdgeFactory) -> None:
    edges = [new_edge() for _ in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda e: client.post("/v1/cycles", headers=e.headers), edges))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201]
    assert len({a.json()["id"] for a in answers}) == 1
    final = client.get(f"/v1/cycles/{answers[0].json()['id']}", headers=edges[0].headers).json()
    assert sorted(final["joined_edges"]) == sorted(e.edge_id for e in edges)


def test_a_burst_of_joins_loads_the_base_model_once(
    client: TestClient, new_edge: EdgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each load of the model costs tens of MB: 200 edges joining at once used to load it
    # in every request thread and peaked at 2.5 GB
    loads = []
    real = models.load_model

    def slow_load(rt: Any, row: Any) -> Any:
        loads.append(row.version)
        time.sleep(0.2)  # as long as a real backbone takes to build, or more
        return real(rt, row)

    monkeypatch.setattr(models, "load_model", slow_load)
    edges = [new_edge() for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda e: client.post("/v1/cycles", headers=e.headers), edges))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201]
    assert len({a.json()["spec"]["base_model_sha256"] for a in answers}) == 1
    assert loads == [1]  # the base model, built once for all eight
