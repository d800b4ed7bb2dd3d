"""The cycle, extract and finetune jobs against a fake server (MockTransport)."""

from __future__ import annotations

import json
import re

import httpx

from edge_service.services.cycle import PLANS
from fl_core.model import build_split_model
from fl_core.schemas import CycleJobResult, CycleState
from fl_core.serialization import inspect_header
from tests.edge_service.conftest import AUTH, EdgeFactory, TestClient, tiny_model, wait_job
from tests.edge_service.fakes import FakeServer

RESULT_KEYS = {
    "cycle_id",
    "model_version",
    "n_train",
    "n_val",
    "n_test",
    "bytes_uploaded",
    "bytes_downloaded",
    "raw_train_bytes",
    "stage_seconds",
    "metrics",
    "deployed",
    "decision",
    "local_model_id",
}
STAGES = {"request", "download", "extract", "upload", "wait", "round", "finetune", "evaluate"}


def test_cycle_job_runs_every_stage_and_deploys(edge: TestClient, fake_server: FakeServer) -> None:
    response = edge.post("/v1/jobs/cycle", headers=AUTH)
    assert response.status_code == 202
    job = response.json()
    assert job["kind"] == "cycle" and job["state"] in ("queued", "running")
    done = wait_job(edge, job["id"])
    assert done["state"] == "done", done["error"]
    assert done["progress"] == 1.0
    result = done["result"]
    assert set(result) >= RESULT_KEYS
    assert set(result["stage_seconds"]) == STAGES
    assert result["stage_seconds"]["round"] == 0  # the fake server's cycle has no rounds
    assert result["cycle_id"] == 7 and result["model_version"] == 2
    assert result["n_train"] + result["n_val"] + result["n_test"] == 40
    assert result["bytes_uploaded"] == len(fake_server.uploads[0]) > 0
    weights = sum(len(w) for w in fake_server.weights.values())
    assert result["bytes_downloaded"] == weights
    assert result["raw_train_bytes"] > 0
    assert set(result["metrics"]) == {
        "server_model",
        "candidate",
        "previous",
        "deployed",
        "validation",
    }
    assert result["metrics"]["previous"] is None
    assert result["chosen"] in ("candidate", "server_model")
    assert set(result["metrics"]["validation"]) == {"candidate", "server_model"}
    assert result["metrics"]["deployed"] == result["metrics"][result["chosen"]]
    assert result["majority"]["class_name"] in ("bright", "dark")
    assert result["deployed"] is True and result["decision"].startswith("deployed")
    # the wire contract: every field of the typed result, fine-tuning's epochs among them
    assert set(result) == set(CycleJobResult.model_fields)
    finetuned = CycleJobResult.model_validate(result).finetune
    assert finetuned is not None and 1 <= finetuned.epochs_run <= 2
    assert 0 <= finetuned.best_epoch <= finetuned.epochs_run

    # the fine-tuned model is recorded; the server's too when the gate chose it
    models = {m["id"]: m for m in edge.get("/v1/models", headers=AUTH).json()}
    served = result["deployed_model_id"]
    assert set(models) == {result["local_model_id"], served}
    assert (served == result["local_model_id"]) == (result["chosen"] == "candidate")
    assert models[served]["active"] and models[served]["base_version"] == 2
    status = edge.get("/v1/status", headers=AUTH).json()
    assert status["last_cycle_id"] == 7
    assert status["deployed_model"]["id"] == served
    assert status["last_job"]["id"] == job["id"]
    assert status["dataset"]["class_names"] == ["bright", "dark"]
    assert status["dataset"]["n_images"] == 40
    assert sum(status["dataset"]["counts"]["test"].values()) == result["n_test"]


def test_the_edge_sends_only_features_never_images(
    edge: TestClient, fake_server: FakeServer
) -> None:
    done = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"])
    assert done["state"] == "done", done["error"]
    allowed = [
        ("POST", r"/v1/cycles"),
        ("GET", r"/v1/cycles/\d+"),
        ("PUT", r"/v1/cycles/\d+/features"),
        ("GET", r"/v1/models/(\d+|latest)"),
        ("GET", r"/v1/models/\d+/weights"),
        ("GET", r"/v1/models/\d+/manifest"),
        ("POST", r"/v1/models/\d+/weights/subset"),
        # the start-up check of the link, and the evaluation report after stage 3
        ("GET", r"/v1/cycles"),
        ("PUT", r"/v1/models/\d+/evaluation"),
    ]
    for request in fake_server.requests:
        assert any(request.method == m and re.fullmatch(p, request.url.path) for m, p in allowed), (
            f"unexpected request {request.method} {request.url.path}"
        )
        if request.url.path.endswith("/weights/subset"):  # tensor names, nothing else
            assert set(json.loads(request.content)) == {"names"}
        elif request.method != "PUT":
            assert request.content == b""
    # the evaluation report: metrics and the gate's words, nothing from an image
    (report,) = [r for r in fake_server.requests if r.url.path.endswith("/evaluation")]
    assert report.headers["Content-Type"] == "application/json"
    assert set(json.loads(report.content)) == {
        "chosen",
        "deployed",
        "decision",
        "n_test",
        "metrics",
    }
    assert len(report.content) < 8192
    puts = [r for r in fake_server.requests if r.url.path.endswith("/features")]
    assert len(puts) == 1
    body = puts[0].content
    assert puts[0].headers["Content-Type"] == "application/octet-stream"
    assert b"\x89PNG" not in body
    header, meta = inspect_header(body)
    assert set(header) == {"features", "labels"}
    features, labels = header["features"], header["labels"]
    n = done["result"]["n_train"]
    assert features["shape"] == [n, *fake_server.spec.feature_shape]
    assert labels["shape"] == [n] and labels["dtype"] == "I64"
    # one pooled row per image is far smaller than the image itself (3 x 32 x 32)
    row = 1
    for d in fake_server.spec.feature_shape:
        row *= d
    assert row < 3 * 32 * 32
    assert meta["fedinspect.spec_hash"] == fake_server.spec.spec_hash()


def test_progress_is_monotone_with_stage_messages(
    edge: TestClient, fake_server: FakeServer
) -> None:
    fake_server.polls_before_done = 5
    job_id = edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"]
    seen: list[tuple[str, float, str]] = []
    while True:
        job = edge.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        seen.append((job["stage"], job["progress"], job["message"]))
        if job["state"] in ("done", "failed"):
            break
    assert job["state"] == "done", job["error"]
    progress = [p for _, p, _ in seen]
    assert progress == sorted(progress)
    assert all(0.0 <= p <= 1.0 for p in progress)
    assert abs(sum(w for _, w in PLANS["cycle"]) - 1.0) < 1e-9
    stages = [s for s, _, _ in seen]
    assert "wait" in stages
    assert any(
        m.startswith("waiting for cycle 7 (training): the server is training") for _, _, m in seen
    )


def test_server_failed_cycle_fails_the_job_with_its_reason(
    edge: TestClient, fake_server: FakeServer
) -> None:
    fake_server.outcome = CycleState.failed
    fake_server.reason = "too few rows to train"
    done = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"])
    assert done["state"] == "failed"
    assert done["stage"] == "wait"
    assert "too few rows to train" in done["error"]
    assert "cycle 7 failed" in done["error"]


def test_a_4xx_ends_the_job_with_the_servers_detail(
    edge: TestClient, fake_server: FakeServer
) -> None:
    fake_server.fail("PUT", r"/v1/cycles/\d+/features", 409)
    done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
    assert done["state"] == "failed" and done["stage"] == "upload"
    assert "scripted 409" in done["error"]
    assert fake_server.attempts[("PUT", r"/v1/cycles/\d+/features")] == 1


def test_network_faults_are_retried_inside_a_job(edge: TestClient, fake_server: FakeServer) -> None:
    fake_server.fail("POST", "/v1/cycles", httpx.ConnectError, (503, {"Retry-After": "0"}))
    fake_server.fail("GET", r"/v1/models/\d+/weights", httpx.ReadTimeout, 502)
    fake_server.fail("PUT", r"/v1/cycles/\d+/features", httpx.WriteError, 500)
    done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
    assert done["state"] == "done", done["error"]
    assert len(fake_server.uploads) == 1  # the failed attempts never reached the route
    assert fake_server.attempts[("PUT", r"/v1/cycles/\d+/features")] == 2


def test_weights_with_a_wrong_digest_fail_the_job(
    edge: TestClient, fake_server: FakeServer
) -> None:
    fake_server.tamper_weights = True
    done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
    assert done["state"] == "failed" and done["stage"] == "download"
    assert "sha256" in done["error"] and "refusing" in done["error"]
    assert fake_server.uploads == []


def test_base_weights_are_downloaded_once(edge: TestClient, fake_server: FakeServer) -> None:
    for _ in range(2):
        done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
        assert done["state"] == "done", done["error"]
    downloads = [r for r in fake_server.requests if r.url.path.endswith("/weights")]
    assert len(downloads) == 1
    assert done["result"]["bytes_downloaded"] == 0
    assert fake_server.uploads[0] != b""
    # stage 3 did not run: its fields keep their defaults
    assert done["result"]["downloads"] == ["cached"]
    assert done["result"]["finetune"] is None and done["result"]["model_version"] is None


def test_class_names_must_match_the_cycle(make_edge: EdgeFactory) -> None:
    other = build_split_model(
        ["good", "scratch"], backbone="tiny_cnn", input_size=32, pretrained=False
    )
    server = FakeServer(base_model=other, new_model=tiny_model(1))
    edge = make_edge(server.client())
    done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
    assert done["state"] == "failed"
    assert "['bright', 'dark']" in done["error"] and "['good', 'scratch']" in done["error"]
    assert server.uploads == [] and not any(
        r.url.path.endswith("/weights") for r in server.requests
    )


def test_finetune_job_defaults_to_the_latest_model(
    edge: TestClient, fake_server: FakeServer
) -> None:
    done = wait_job(edge, edge.post("/v1/jobs/finetune", headers=AUTH).json()["id"])
    assert done["state"] == "done", done["error"]
    assert done["result"]["model_version"] == 2
    assert done["result"]["cycle_id"] is None
    assert fake_server.uploads == []
    job = edge.post("/v1/jobs/finetune?model_version=1", headers=AUTH).json()
    done = wait_job(edge, job["id"])
    assert done["result"]["model_version"] == 1
    assert done["result"]["metrics"]["previous"] is not None


def test_finetune_job_takes_the_version_in_the_body(
    edge: TestClient, fake_server: FakeServer
) -> None:
    job = edge.post("/v1/jobs/finetune", headers=AUTH, json={"model_version": 1}).json()
    assert wait_job(edge, job["id"])["result"]["model_version"] == 1


def test_one_job_at_a_time(make_edge: EdgeFactory, fake_server: FakeServer) -> None:
    fake_server.polls_before_done = 10**9  # the cycle never finishes
    fake_server.deadline_s = 0.3
    edge = make_edge(fake_server.client(), wait_margin_s=0.0)
    first = edge.post("/v1/jobs/cycle", headers=AUTH).json()
    second = edge.post("/v1/jobs/extract", headers=AUTH)
    assert second.status_code == 409
    assert second.json()["detail"].startswith(f"job {first['id']} (cycle) is still running")
    done = wait_job(edge, first["id"])
    assert done["state"] == "failed" and done["stage"] == "wait"
    assert "gave up waiting" in done["error"]
    assert edge.post("/v1/jobs/extract", headers=AUTH).status_code == 202


def test_jobs_list_newest_first(edge: TestClient) -> None:
    ids = []
    for _ in range(2):
        job = edge.post("/v1/jobs/extract", headers=AUTH).json()
        wait_job(edge, job["id"])
        ids.append(job["id"])
    listed = edge.get("/v1/jobs", headers=AUTH).json()
    assert [j["id"] for j in listed] == ids[::-1]
    assert edge.get("/v1/jobs/nope", headers=AUTH).status_code == 404
