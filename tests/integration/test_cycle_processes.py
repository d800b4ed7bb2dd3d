"""One whole cycle with REAL processes: a server and an edge started as ``python -c
"from ... import run; run()"`` with settings in the environment, talking HTTP on
127.0.0.1, driven over HTTP as an operator would. Uses a small real partition of elpv
(48 solar-cell images) and the pretrained EfficientNet-Lite0 at 64 px."""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("elpv_dataset")

from fl_core.data import ELPV_CLASSES, load_dataset_spec
from server_service.config import Settings as ServerSettings
from tests.integration.processes import HOST, Process, free_port, wait_healthy

JOB_TIMEOUT_S = 240.0


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.mark.slow
def test_cycle_with_real_processes(tmp_path: Path, processes: list[Process]) -> None:
    server_admin = secrets.token_urlsafe(24)
    edge_admin = secrets.token_urlsafe(24)
    server_port, edge_port = free_port(), free_port()
    server_url, edge_url = f"http://{HOST}:{server_port}", f"http://{HOST}:{edge_port}"

    server = Process(
        "server",
        "server",
        {
            "FEDINSPECT_SERVER_ADMIN_TOKEN": server_admin,
            "FEDINSPECT_SERVER_DATA_DIR": str(tmp_path / "server"),
            "FEDINSPECT_SERVER_HOST": HOST,
            "FEDINSPECT_SERVER_PORT": str(server_port),
            "FEDINSPECT_SERVER_BACKBONE": "efficientnet_lite0",
            "FEDINSPECT_SERVER_INPUT_SIZE": "64",
            "FEDINSPECT_SERVER_MIN_EDGES": "1",
            "FEDINSPECT_SERVER_TRAIN_EPOCHS": "20",
            "FEDINSPECT_SERVER_CYCLE_DEADLINE_S": "120",
        },
        tmp_path,
    )
    processes.append(server)
    wait_healthy(server_url, server)

    admin = {"Authorization": f"Bearer {server_admin}"}
    reg = httpx.post(f"{server_url}/v1/edges", headers=admin, json={"name": "edge-1"}, timeout=30)
    assert reg.status_code in (200, 201), reg.text
    edge_reg: dict[str, Any] = reg.json()

    edge = Process(
        "edge",
        "edge",
        {
            "FEDINSPECT_EDGE_SERVER_URL": server_url,
            "FEDINSPECT_EDGE_TOKEN": edge_reg["token"],
            "FEDINSPECT_EDGE_EDGE_ID": edge_reg["edge_id"],
            "FEDINSPECT_EDGE_ADMIN_TOKEN": edge_admin,
            "FEDINSPECT_EDGE_NAME": "edge-1",
            "FEDINSPECT_EDGE_HOST": HOST,
            "FEDINSPECT_EDGE_PORT": str(edge_port),
            "FEDINSPECT_EDGE_DATA_DIR": str(tmp_path / "edge"),
            "FEDINSPECT_EDGE_DATASET": "elpv:limit=48",
            "FEDINSPECT_EDGE_BATCH_SIZE": "16",
            "FEDINSPECT_EDGE_FINETUNE_EPOCHS": "2",
            "FEDINSPECT_EDGE_FINETUNE_VIEWS": "2",
            "FEDINSPECT_EDGE_POLL_INTERVAL_S": "0.5",
            "FEDINSPECT_EDGE_POLL_MAX_INTERVAL_S": "2",
        },
        tmp_path,
    )
    processes.append(edge)
    wait_healthy(edge_url, edge)

    auth = {"Authorization": f"Bearer {edge_admin}"}
    with httpx.Client(base_url=edge_url, headers=auth, timeout=30.0) as client:
        assert client.get("/v1/status", headers={"Authorization": "Bearer nope"}).status_code == 401
        started = client.post("/v1/jobs/cycle")
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]

        deadline = time.monotonic() + JOB_TIMEOUT_S
        job: dict[str, Any] = {}
        progress: list[float] = []
        while time.monotonic() < deadline:
            server.check_alive()
            edge.check_alive()
            job = client.get(f"/v1/jobs/{job_id}").json()
            progress.append(job["progress"])
            if job["state"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert job.get("state") == "done", (
            f"job ended as {job}\n--- edge ---\n{edge.tail()}\n--- server ---\n{server.tail()}"
        )
        assert progress == sorted(progress)
        result = job["result"]
        # the default cycle: the head (version 2), then a version per federated round
        last = 2 + ServerSettings.model_fields["rounds"].default
        assert result["model_version"] == last > 2 and result["n_train"] > 0
        # the features sent are smaller than the images; each round adds its update (on
        # 48 images, the update of the trained blocks outweighs the images themselves)
        sent_in_rounds = sum(r["bytes_uploaded"] for r in result["rounds"])
        assert len(result["rounds"]) == last - 2 and sent_in_rounds > 0
        assert 0 < result["bytes_uploaded"] - sent_in_rounds < result["raw_train_bytes"]
        # on 48 images the gate may find no model as good as always answering the
        # majority class and deploy nothing; an operator can still put the recorded
        # fine-tuned model into service, which is what this test needs for predict
        served = result["metrics"]["validation"].get(result["chosen"] or "", {})
        if result["deployed"]:
            assert served["accuracy"] >= result["majority"]["validation_accuracy"]
        else:
            assert "no model did as well as always answering" in result["decision"]
            activated = client.post(f"/v1/models/{result['local_model_id']}/activate")
            assert activated.status_code == 200, activated.text

        image = load_dataset_spec("elpv:limit=48").records[0].path
        predicted = client.post(
            "/v1/predict?heatmap=true",
            files={"files": (image.name, io.BytesIO(image.read_bytes()), "image/png")},
        )
        assert predicted.status_code == 200, predicted.text
        body = predicted.json()
        assert body["predictions"][0]["label"] in ELPV_CLASSES
        assert body["model_version"] == last
        status = client.get("/v1/status").json()
        assert status["deployed_model"]["id"] == body["model_id"]
        assert status["last_cycle_id"] == result["cycle_id"]
