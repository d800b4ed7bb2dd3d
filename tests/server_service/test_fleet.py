"""The fleet view: edges report their stage-3 evaluation (metrics only), operators read
them, with each edge's activity, in GET /v1/overview (what the dashboard shows)."""

from __future__ import annotations

from typing import Any

from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import (
    ADMIN,
    TestClient,
    make_upload,
    put_features,
    wait_for_state,
)


def _metrics(accuracy: float, n: int = 20) -> dict[str, Any]:
    return {
        "n": n,
        "accuracy": accuracy,
        "balanced_accuracy": accuracy,
        "macro_f1": accuracy,
        "per_class": [],
        "confusion_matrix": [[n]],
    }


def _report(accuracy: float, chosen: str | None = "candidate") -> dict[str, Any]:
    return {
        "chosen": chosen,
        "deployed": chosen in ("candidate", "server_model"),
        "decision": "deployed the fine-tuned model",
        "n_test": 20,
        "metrics": {"candidate": _metrics(accuracy), "deployed": _metrics(accuracy)},
    }


def _run_cycle(client: TestClient, new_edge: EdgeFactory) -> tuple[Any, dict[str, Any]]:
    edge = new_edge("line-1")
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    assert (
        put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id)).status_code == 201
    )
    done = wait_for_state(client, cycle["id"], {"done"})
    return edge, done


def test_an_edges_report_shows_in_the_overview(client: TestClient, new_edge: EdgeFactory) -> None:
    edge, done = _run_cycle(client, new_edge)
    idle = new_edge("line-2")
    version = done["result_model_version"]

    answer = client.put(
        f"/v1/models/{version}/evaluation", json=_report(0.85), headers=edge.headers
    )
    assert answer.status_code == 200, answer.text
    stored = answer.json()
    assert stored["edge_id"] == edge.edge_id and stored["cycle_id"] == done["id"]
    assert stored["report"]["metrics"]["deployed"]["accuracy"] == 0.85

    # a second report on the same version replaces the first
    again = client.put(f"/v1/models/{version}/evaluation", json=_report(0.9), headers=edge.headers)
    assert again.status_code == 200
    listed = client.get("/v1/evaluations", headers=ADMIN).json()
    assert [(e["edge_id"], e["model_version"]) for e in listed] == [(edge.edge_id, version)]

    overview = client.get("/v1/overview", headers=ADMIN).json()
    rows = {e["name"]: e for e in overview["edges"]}
    assert rows["line-1"]["test_accuracy"] == 0.9
    assert rows["line-1"]["deployed_model_version"] == version
    assert rows["line-1"]["last_cycle_id"] == done["id"]
    assert rows["line-1"]["last_upload"] is not None
    assert rows["line-1"]["last_seen"] >= rows["line-1"]["last_upload"]
    assert rows["line-2"]["edge_id"] == idle.edge_id
    assert rows["line-2"]["last_seen"] is None and rows["line-2"]["test_accuracy"] is None
    assert [c["id"] for c in overview["cycles"]] == [done["id"]]
    assert [m["version"] for m in overview["models"]] == [1, version]
    # the training thread reported its epochs for the dashboard's progress bar
    assert [p["cycle_id"] for p in overview["training"]] == [done["id"]]
    assert overview["training"][0]["fraction"] == 1.0


def test_keeping_the_previous_model_keeps_the_deployed_version(
    client: TestClient, new_edge: EdgeFactory
) -> None:
    edge, done = _run_cycle(client, new_edge)
    version = done["result_model_version"]
    client.put("/v1/models/1/evaluation", json=_report(0.7), headers=edge.headers)
    client.put(
        f"/v1/models/{version}/evaluation", json=_report(0.7, "previous"), headers=edge.headers
    )
    (row,) = client.get("/v1/overview", headers=ADMIN).json()["edges"]
    assert row["deployed_model_version"] == 1


def test_reports_are_bounded_and_checked(client: TestClient, new_edge: EdgeFactory) -> None:
    edge = new_edge("line-1")
    url = "/v1/models/1/evaluation"
    too_big = {**_report(0.5), "decision": "x" * 70_000}
    refused = client.put(url, json=too_big, headers=edge.headers)
    assert refused.status_code == 413
    # an image smuggled in as a field is not part of the schema
    extra = client.put(url, json={**_report(0.5), "image": "iVBORw0KGgo="}, headers=edge.headers)
    assert extra.status_code == 422 and "image" in extra.json()["detail"]
    long = client.put(url, json={**_report(0.5), "decision": "x" * 1001}, headers=edge.headers)
    assert long.status_code == 422
    unknown = client.put("/v1/models/99/evaluation", json=_report(0.5), headers=edge.headers)
    assert unknown.status_code == 404 and unknown.json() == {"detail": "model 99 not found"}
    # operators read reports; only edges write them
    assert client.put(url, json=_report(0.5), headers=ADMIN).status_code == 403
    assert client.get("/v1/overview", headers=edge.headers).status_code == 403
    assert client.get("/v1/overview").status_code == 401
