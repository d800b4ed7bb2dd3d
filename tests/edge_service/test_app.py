"""Settings, app wiring, OpenAPI and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import SecretStr, ValidationError

from edge_service.config import Settings
from edge_service.main import apply_threads, run
from tests.edge_service.conftest import AUTH, TestClient, wait_job
from tests.edge_service.fakes import FakeServer

TOKEN = "edge-admin-token-0123456789"


def test_admin_token_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDINSPECT_EDGE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="admin_token"):
        Settings()  # type: ignore[call-arg]
    with pytest.raises(SystemExit, match="FEDINSPECT_EDGE_ADMIN_TOKEN"):
        run()
    with pytest.raises(ValidationError):
        Settings(admin_token=SecretStr(""))


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDINSPECT_EDGE_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("FEDINSPECT_EDGE_DATASET", "elpv:type=mono")
    monkeypatch.setenv("FEDINSPECT_EDGE_PORT", "8123")
    monkeypatch.setenv("FEDINSPECT_EDGE_FINETUNE_TRAIN_FROM", "upper")
    s = Settings()  # type: ignore[call-arg]
    assert (s.dataset, s.port, s.finetune_train_from) == ("elpv:type=mono", 8123, "upper")
    assert s.server_url == "http://127.0.0.1:8000" and s.retry_budget_s == 120
    assert s.val_fraction == 0.1 and s.test_fraction == 0.25 and s.deploy_min_delta == 0.0
    assert s.max_predict_bytes == 20 * 1024 * 1024 and s.poll_max_interval_s == 10
    assert s.data_dir == Path("data/edge") and s.token is None
    assert TOKEN not in repr(s.admin_token)


def test_every_setting_is_described() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_openapi_documents_every_route(edge: TestClient) -> None:
    schema = edge.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (method, path)
            assert "200" in op["responses"] or "202" in op["responses"], (method, path)
            if path != "/health":
                assert "401" in op["responses"], (method, path)
    assert set(schema["paths"]) >= {
        "/health",
        "/metrics",
        "/v1/status",
        "/v1/jobs",
        "/v1/jobs/cycle",
        "/v1/jobs/extract",
        "/v1/jobs/finetune",
        "/v1/jobs/{job_id}",
        "/v1/predict",
        "/v1/models",
        "/v1/models/{model_id}/activate",
        "/v1/evaluation",
    }


def test_metrics_count_jobs_bytes_and_requests(edge: TestClient, fake_server: FakeServer) -> None:
    done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
    assert done["state"] == "done"
    text = edge.get("/metrics", headers=AUTH).text
    assert 'fedinspect_edge_jobs{state="done"} 1.0' in text
    assert 'fedinspect_edge_jobs{state="running"} 0.0' in text
    uploaded = float(done["result"]["bytes_uploaded"])
    downloaded = float(done["result"]["bytes_downloaded"])
    assert f"fedinspect_edge_uploaded_bytes_total {uploaded}" in text
    assert f"fedinspect_edge_downloaded_bytes_total {downloaded}" in text
    # requests are counted by route template, as on the server
    assert (
        'fedinspect_edge_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}'
        in text
    )


def test_threads_setting_sizes_the_torch_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        apply_threads(Settings(admin_token=SecretStr(TOKEN)))  # unset: left as it is
        assert torch.get_num_threads() == before
        monkeypatch.setenv("FEDINSPECT_EDGE_THREADS", "1")
        apply_threads(Settings(admin_token=SecretStr(TOKEN)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValidationError):
        Settings(admin_token=SecretStr(TOKEN), threads=0)


def test_openapi_documents_the_job_result(edge: TestClient) -> None:
    schemas = edge.get("/openapi.json").json()["components"]["schemas"]
    result = schemas["Job"]["properties"]["result"]
    assert {"$ref": "#/components/schemas/CycleJobResult"} in result["anyOf"]
    fields = set(schemas["CycleJobResult"]["properties"])
    assert {"metrics", "majority", "finetune", "chosen", "stage_seconds"} <= fields
    assert set(schemas["FinetuneSummary"]["properties"]) == {"epochs_run", "best_epoch"}
