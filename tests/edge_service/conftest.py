"""Fixtures of the edge tests: a tiny ImageFolder, tiny models, settings, a fake server
and an edge app driven through its TestClient (lifespan included)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pydantic import SecretStr

from edge_service.config import Settings
from edge_service.main import create_app
from edge_service.services.context import EdgeContext
from fl_core.model import SplitModel, build_split_model
from fl_core.schemas import LocalModel
from fl_core.training import evaluate
from tests.edge_service.fakes import EDGE_TOKEN, FakeServer
from tests.factories import make_image_folder
from tests.testclient import TestClient

ADMIN_TOKEN = "edge-admin-secret-0123"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLASSES = ["bright", "dark"]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 tiny grey PNGs in two classes that differ by brightness."""
    return make_image_folder(
        tmp_path_factory.mktemp("images"), per_class=20, size=32, classes=("dark", "bright")
    )


def tiny_model(seed: int = 0) -> SplitModel:
    return build_split_model(
        CLASSES, backbone="tiny_cnn", input_size=32, pretrained=False, seed=seed
    )


def answer_always(model: SplitModel, class_index: int) -> SplitModel:
    """Make ``model`` answer class ``class_index`` whatever the image (in place)."""
    last = list(model.head.modules())[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[class_index] = 20.0
    return model


def answering(class_index: int, seed: int = 5) -> SplitModel:
    """A tiny model that always answers ``CLASSES[class_index]``."""
    return answer_always(tiny_model(seed), class_index)


def deploy_model(ctx: EdgeContext, model: SplitModel, base_version: int = 1) -> LocalModel:
    """Record ``model`` and deploy it, bypassing the deploy gate (as an operator could)."""
    metrics = evaluate(model, ctx.data.splits().test)
    local = ctx.registry.add_candidate(model, base_version, metrics, note="set up by a test")
    return ctx.registry.deploy(local.id, "deployed by the test")


def make_settings(data_dir: Path, dataset: Path | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "admin_token": SecretStr(ADMIN_TOKEN),
        "token": SecretStr(EDGE_TOKEN),
        "name": "edge-test",
        "data_dir": data_dir,
        "dataset": str(dataset),
        "batch_size": 16,
        "finetune_epochs": 2,
        "finetune_views": 1,
        "finetune_augment": False,
        "finetune_train_from": "b1",
        "retry_base_s": 0.001,
        "retry_max_s": 0.01,
        "retry_budget_s": 2.0,
        "poll_interval_s": 0.01,
        "poll_max_interval_s": 0.02,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def fake_server() -> FakeServer:
    return FakeServer(base_model=tiny_model(0), new_model=tiny_model(1))


EdgeFactory = Callable[..., TestClient]


@pytest.fixture
def make_edge(tmp_path: Path, image_folder: Path) -> Iterator[Callable[..., TestClient]]:
    """``make_edge(server_client, **settings)`` -> a started edge TestClient."""
    opened: list[TestClient] = []

    def factory(server_client: httpx.Client | None = None, **overrides: Any) -> TestClient:
        dataset = overrides.pop("dataset", image_folder)
        settings = make_settings(tmp_path / "edge", dataset, **overrides)
        client = TestClient(create_app(settings, server_client))
        client.__enter__()
        opened.append(client)
        return client

    yield factory
    for client in reversed(opened):
        client.app.state.ctx.runner.wait_idle(60)  # type: ignore[attr-defined]
        client.__exit__(None, None, None)


@pytest.fixture
def edge(make_edge: EdgeFactory, fake_server: FakeServer) -> TestClient:
    return make_edge(fake_server.client())


def wait_job(client: TestClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll a job until it ends; returns it. Fails the test past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")
