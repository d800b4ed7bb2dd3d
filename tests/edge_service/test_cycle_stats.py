"""A whole cycle in ``stats`` privacy mode, in process: the edge uploads per-class
statistics of its features (no rows), the real server app trains on virtual features,
and the edge fine-tunes and deploys the result."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from edge_service.main import create_app
from fl_core import serialization
from fl_core.privacy import max_factors
from server_service.config import Settings as ServerSettings
from server_service.main import create_app as create_server_app
from tests.edge_service.conftest import AUTH, CLASSES, TestClient, make_settings, wait_job

SERVER_ADMIN = {"Authorization": "Bearer server-admin-token-0123456789"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(
        admin_token=SecretStr("server-admin-token-0123456789"),
        data_dir=tmp_path / "server",
        backbone="tiny_cnn",
        pretrained=False,
        input_size=32,
        head_hidden=16,
        class_names=CLASSES,
        train_epochs=5,
        train_batch_size=8,
        min_edges=1,
        cycle_deadline_s=60.0,
        deadline_check_interval_s=0.05,
        privacy={"mode": "stats", "stats_min_count": 4},
        rounds=0,  # the cycle ends at the head trained on the statistics
    )
    with TestClient(create_server_app(settings)) as client:
        yield client


def test_whole_cycle_in_stats_mode(server: TestClient, tmp_path: Path, image_folder: Path) -> None:
    reg = server.post("/v1/edges", headers=SERVER_ADMIN, json={"name": "edge-1"}).json()
    settings = make_settings(
        tmp_path / "edge",
        image_folder,
        token=SecretStr(reg["token"]),
        edge_id=reg["edge_id"],
        finetune_epochs=2,
    )
    with TestClient(create_app(settings, server)) as edge:
        done = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"], 120)
        assert done["state"] == "done", done["error"]
        result = done["result"]
        assert result["model_version"] == 2 and result["rows_uploaded"] == result["n_train"]

        cycle = server.get(f"/v1/cycles/{result['cycle_id']}", headers=SERVER_ADMIN).json()
        assert cycle["state"] == "done" and cycle["spec"]["privacy"]["mode"] == "stats"
        (upload,) = cycle["uploads"]
        assert upload["rows"] == result["n_train"]
        # what left the edge: statistics per class, no row of features
        runtime = server.app.state.runtime  # type: ignore[attr-defined]
        tensors, _ = serialization.loads(runtime.blobs.get(upload["sha256"]))
        dim = cycle["spec"]["feature_shape"][0]
        # and at most one principal direction for every 32 rows they summarise
        rows = int(tensors["counts"].sum())
        assert {k: list(v.shape) for k, v in tensors.items()} == {
            "counts": [2],
            "means": [2, dim],
            "vars": [2, dim],
            "factors": [max_factors(rows, cycle["spec"]["privacy"]["stats_rank"]), dim],
        }
        assert int(tensors["counts"].sum()) == result["n_train"]

        model = server.get("/v1/models/2", headers=SERVER_ADMIN).json()
        assert model["privacy"]["mode"] == "stats"
        assert model["trained_from"]["rows_per_edge"] == {reg["edge_id"]: result["n_train"]}
