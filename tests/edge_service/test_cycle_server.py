"""A whole cycle against the real server app, in process: the server's TestClient is
the edge's server client (TestClient is an httpx.Client), the edge is driven through its
own TestClient, exactly as an operator would over HTTP."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from edge_service.config import Settings as EdgeSettings
from edge_service.main import create_app
from fl_core import training
from server_service.config import Settings as ServerSettings
from server_service.main import create_app as create_server_app
from tests.edge_service.conftest import AUTH, CLASSES, TestClient, make_settings, wait_job
from tests.factories import make_image_folder

SERVER_ADMIN = {"Authorization": "Bearer server-admin-token-0123456789"}


#: federated rounds of a cycle at the server's default settings
DEFAULT_ROUNDS = ServerSettings.model_fields["rounds"].default


def _server_settings(
    tmp_path: Path, class_names: list[str], rounds: int = 0, **more: Any
) -> ServerSettings:
    """A tiny server; one-shot cycles unless ``rounds`` says otherwise."""
    return ServerSettings(
        **more,
        rounds=rounds,
        admin_token=SecretStr("server-admin-token-0123456789"),
        data_dir=tmp_path / "server",
        backbone="tiny_cnn",
        pretrained=False,
        input_size=32,
        head_hidden=16,
        class_names=class_names,
        train_epochs=5,
        train_batch_size=8,
        min_edges=1,
        cycle_deadline_s=60.0,
        deadline_check_interval_s=0.05,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_server_app(_server_settings(tmp_path, CLASSES))) as client:
        yield client


def _register(server: TestClient, name: str) -> dict[str, str]:
    registered = server.post("/v1/edges", headers=SERVER_ADMIN, json={"name": name})
    assert registered.status_code in (200, 201), registered.text
    reg: dict[str, str] = registered.json()
    return reg


def _registered_edge(
    server: TestClient, folder: Path, data_dir: Path, **settings: Any
) -> EdgeSettings:
    """Settings of an edge registered with ``server`` as edge-1, on ``folder``."""
    reg = _register(server, "edge-1")
    return make_settings(
        data_dir, folder, token=SecretStr(reg["token"]), edge_id=reg["edge_id"], **settings
    )


@pytest.fixture
def default_server(tmp_path: Path) -> Iterator[TestClient]:
    """The tiny server with the default federated rounds."""
    settings = _server_settings(tmp_path, CLASSES, DEFAULT_ROUNDS)
    with TestClient(create_server_app(settings)) as client:
        yield client


def test_whole_cycle_in_process(
    default_server: TestClient,
    tmp_path: Path,
    image_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cycle at the default rounds: the head, then each round's model, then the edge
    fine-tunes the last one and deploys it."""
    server = default_server
    made = []  # the frozen stages' passes: (images, views)
    make_activations = training._activations

    def counted(model: Any, images: Any, end: int, views: int, *args: Any, **kw: Any) -> Any:
        made.append((len(images), views))
        return make_activations(model, images, end, views, *args, **kw)

    monkeypatch.setattr(training, "_activations", counted)
    last = 2 + DEFAULT_ROUNDS  # the head is version 2
    assert last > 2  # rounds are on by default
    settings = _registered_edge(
        server,
        image_folder,
        tmp_path / "edge",
        finetune_epochs=3,
        finetune_views=2,
        finetune_augment=True,
    )
    with TestClient(create_app(settings, server)) as edge:
        job = edge.post("/v1/jobs/cycle", headers=AUTH)
        assert job.status_code == 202
        done = wait_job(edge, job.json()["id"], timeout=120)
        assert done["state"] == "done", done["error"]
        result = done["result"]
        assert result["model_version"] == last and result["deployed"] is True
        # the rounds' local training is timed as a stage of its own
        assert result["stage_seconds"]["round"] > 0
        # the training views ran the frozen stages once, in the first round: the other
        # rounds and the fine-tuning after them trained on that cache
        views = settings.finetune_views
        assert views > 1 and made.count((result["n_train"], views)) == 1

        cycle = server.get(f"/v1/cycles/{result['cycle_id']}", headers=SERVER_ADMIN).json()
        assert cycle["state"] == "done" and cycle["result_model_version"] == last
        assert cycle["round"] == last - 2
        assert [u["edge_id"] for u in cycle["uploads"]] == [settings.edge_id]
        assert cycle["uploads"][0]["rows"] == result["n_train"]

        pixels = np.clip(np.random.default_rng(1).normal(200, 25, (32, 32)), 0, 255)
        out = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
        predicted = edge.post(
            "/v1/predict?heatmap=true",
            headers=AUTH,
            files={"files": ("part.png", out.getvalue(), "image/png")},
        )
        assert predicted.status_code == 200, predicted.text
        body = predicted.json()
        assert body["model_id"] == result["deployed_model_id"] and body["model_version"] == last
        assert body["predictions"][0]["label"] in CLASSES
        assert body["predictions"][0]["heatmap_png_base64"]

        # a second cycle: the edge joins a new one, reuses nothing stale, and gates
        again = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"], 120)
        assert again["state"] == "done", again["error"]
        assert again["result"]["cycle_id"] != result["cycle_id"]
        assert again["result"]["metrics"]["previous"] is not None


def test_after_rounds_the_last_rounds_model_can_stand_as_the_candidate(
    default_server: TestClient,
    tmp_path: Path,
    image_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AFTER_ROUNDS=last_round: stage 3 trains nothing; the gate weighs the model this
    edge trained in the last round against the server's final model, and one of them
    serves."""
    from edge_service.services import cycle as cycle_module

    def no_finetune(*args: Any, **kw: Any) -> Any:
        raise AssertionError("stage 3 fine-tuned after the rounds")

    trained = []  # each local training: the model it trained
    local_training = cycle_module.finetune_activations

    def counted(model: Any, *args: Any, **kw: Any) -> Any:
        trained.append(model)
        return local_training(model, *args, **kw)

    monkeypatch.setattr(cycle_module, "finetune", no_finetune)
    monkeypatch.setattr(cycle_module, "finetune_activations", counted)
    server = default_server
    round_epochs = ServerSettings.model_fields["round_epochs"].default
    settings = _registered_edge(server, image_folder, tmp_path / "edge", after_rounds="last_round")
    with TestClient(create_app(settings, server)) as edge:
        done = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"], 120)
        assert done["state"] == "done", done["error"]
        result = done["result"]
        assert result["model_version"] == 2 + DEFAULT_ROUNDS
        assert len(trained) == DEFAULT_ROUNDS  # the rounds' training, and nothing after
        assert result["finetune"] == {"epochs_run": round_epochs, "best_epoch": round_epochs}
        assert result["metrics"]["candidate"] is not None
        assert result["metrics"]["server_model"] is not None
        models = {m["id"]: m for m in edge.get("/v1/models", headers=AUTH).json()}
        served = result["deployed_model_id"]
        assert (served == result["local_model_id"]) == (result["chosen"] == "candidate")
        assert models[served]["active"] and models[served]["base_version"] == 2 + DEFAULT_ROUNDS


def test_rounds_in_int8_travel_in_half_the_bytes_and_rebuild_to_the_bit(
    tmp_path: Path, image_folder: Path
) -> None:
    """ROUND_DTYPE=int8: the edge's updates and the averaged ones it downloads carry int8
    codes; it rebuilds each round's model from the parent and the update (the sha256
    the server announced), and the cycle ends deployed."""
    results = {}
    for dtype in ("float16", "int8"):
        settings = _server_settings(tmp_path / dtype, CLASSES, 2, round_dtype=dtype)
        with TestClient(create_server_app(settings)) as server:
            edge_settings = _registered_edge(server, image_folder, tmp_path / dtype / "edge")
            with TestClient(create_app(edge_settings, server)) as edge:
                job = edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"]
                done = wait_job(edge, job, timeout=120)
                assert done["state"] == "done", done["error"]
                results[dtype] = result = done["result"]
                assert result["model_version"] == 4 and result["deployed"] is True
                # the second round's model and the last: rebuilt from the averaged update
                assert result["downloads"][-2:] == ["update", "update"]
                manifest = server.get("/v1/models/4/manifest", headers=SERVER_ADMIN).json()
                assert manifest["update"]["dtype"] == dtype
    sent = {d: [r["bytes_uploaded"] for r in results[d]["rounds"]] for d in results}
    for f16, i8 in zip(sent["float16"], sent["int8"], strict=True):
        assert i8 < 0.75 * f16  # values in half the bytes, plus scales and the header


def test_an_edge_with_some_of_the_classes_in_another_order(tmp_path: Path) -> None:
    """Label skew against the real server: the edge's folders, listed alphabetically,
    are two of the server's three classes, in another order; the server trains on the
    statistics of the classes the edge has, and the edge deploys a three-class model."""
    classes = ["functional", "scratch", "defective"]
    folder = make_image_folder(
        tmp_path / "images", per_class=24, size=32, classes=("functional", "defective")
    )
    with TestClient(create_server_app(_server_settings(tmp_path, classes))) as server:
        settings = _registered_edge(server, folder, tmp_path / "edge")
        with TestClient(create_app(settings, server)) as edge:
            done = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"], 120)
            assert done["state"] == "done", done["error"]
            result = done["result"]
            assert result["model_version"] == 2
            per_class = result["metrics"]["candidate"]["per_class"]
            assert [c["name"] for c in per_class] == classes
            assert [c["support"] > 0 for c in per_class] == [True, False, True]
