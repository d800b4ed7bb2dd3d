"""Local models: listing, rollback via activate, the evaluation view, and status."""

from __future__ import annotations

import io

from PIL import Image

from edge_service.services.context import EdgeContext
from tests.edge_service.conftest import AUTH, EdgeFactory, TestClient, deploy_model, tiny_model
from tests.edge_service.fakes import FakeServer


def test_rollback_to_an_earlier_model(edge: TestClient) -> None:
    ctx: EdgeContext = edge.app.state.ctx  # type: ignore[attr-defined]
    first = deploy_model(ctx, tiny_model(1), 1)
    second = deploy_model(ctx, tiny_model(2), 2)

    listed = edge.get("/v1/models", headers=AUTH).json()
    assert [(m["id"], m["active"]) for m in listed] == [(first.id, False), (second.id, True)]
    assert all(m["source"] == "finetuned" and m["metrics"] for m in listed)

    response = edge.post(f"/v1/models/{first.id}/activate", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["id"] == first.id and response.json()["active"] is True
    listed = edge.get("/v1/models", headers=AUTH).json()
    assert [m["active"] for m in listed] == [True, False]

    evaluation = edge.get("/v1/evaluation", headers=AUTH).json()
    assert evaluation["deployed"]["id"] == first.id
    assert evaluation["previous"]["id"] == second.id
    assert (
        evaluation["decision"]
        == f"activated by an operator: model {first.id} (was model {second.id})"
    )
    status = edge.get("/v1/status", headers=AUTH).json()
    assert status["deployed_model"]["id"] == first.id

    # predictions follow the activated model at once
    out = io.BytesIO()
    Image.new("L", (8, 8), 128).save(out, format="PNG")
    predicted = edge.post("/v1/predict", headers=AUTH, files={"files": ("x.png", out.getvalue())})
    assert predicted.json()["model_id"] == first.id and predicted.json()["model_version"] == 1

    # activating the active model again is a no-op
    again = edge.post(f"/v1/models/{first.id}/activate", headers=AUTH)
    assert again.status_code == 200 and again.json()["active"]


def test_activate_unknown_model_is_404(edge: TestClient) -> None:
    response = edge.post("/v1/models/999/activate", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": "no local model 999"}


def test_empty_evaluation_and_status(edge: TestClient) -> None:
    assert edge.get("/v1/evaluation", headers=AUTH).json() == {
        "deployed": None,
        "previous": None,
        "decision": "",
        "chosen": None,
        "scored_on": None,
        "n_scored": None,
        "validation_accuracy": None,
        "majority_class": None,
        "majority_accuracy": None,
        "candidate_model_id": None,
    }
    status = edge.get("/v1/status", headers=AUTH).json()
    assert status["edge_name"] == "edge-test"
    assert status["server_url"] == "http://127.0.0.1:8000"
    assert status["deployed_model"] is None and status["last_job"] is None
    assert status["last_cycle_id"] is None
    counts = status["dataset"]["counts"]
    assert set(counts) == {"train", "val", "test"}
    assert sum(sum(c.values()) for c in counts.values()) == 40


def test_status_survives_a_missing_dataset(make_edge: EdgeFactory, fake_server: FakeServer) -> None:
    edge = make_edge(fake_server.client(), dataset="/nonexistent/folder")
    assert edge.get("/v1/status", headers=AUTH).json()["dataset"] is None
