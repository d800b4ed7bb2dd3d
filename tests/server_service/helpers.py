"""Helpers of the server tests: tiny settings, a lifespan-running TestClient, edges,
valid and hand-made feature uploads, and a bounded wait for a cycle state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_core import serialization
from fl_core.features import CLASSES_KEY, EDGE_KEY, SPEC_HASH_KEY, pack_features
from fl_core.schemas import FeatureSpec
from server_service.config import Settings
from server_service.main import create_app
from tests.testclient import TestClient

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of a tiny, fast server (tiny_cnn at 32 px, two training epochs, no rounds)."""
    values: dict[str, Any] = {
        "admin_token": ADMIN_TOKEN,
        "data_dir": data_dir,
        "backbone": "tiny_cnn",
        "pretrained": False,
        "input_size": 32,
        "head_hidden": 8,
        "train_epochs": 2,
        "train_batch_size": 8,
        "cycle_deadline_s": 60.0,
        "deadline_check_interval_s": 0.05,
        "min_edges": 1,
        # a cycle ends at the head (one-shot): the rounds' tests ask for rounds
        "rounds": 0,
        # rows on the wire (the default mode sends statistics; test_privacy_modes covers
        # it), without the pooled mode's noise: it is sized for efficientnet's pooled
        # rows and would drown the signal of these tests' random 32-wide rows
        "privacy": {"mode": "pooled", "noise_sigma": 0.0},
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Edge:
    edge_id: str
    name: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def running(settings: Settings) -> Iterator[TestClient]:
    """A TestClient whose lifespan (database, base model, watcher) runs."""
    with TestClient(create_app(settings)) as client:
        yield client


def spec_of(cycle: dict[str, Any]) -> FeatureSpec:
    return FeatureSpec.model_validate(cycle["spec"])


def random_rows(spec: FeatureSpec, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn([rows, *spec.feature_shape], generator=gen)
    labels = torch.arange(rows) % len(spec.class_names)
    # Shift each class so that the pooled rows are learnable.
    features[labels == 1] += 2.0
    return features, labels


def make_upload(cycle: dict[str, Any], edge_id: str, rows: int = 12, seed: int = 0) -> bytes:
    """A valid upload for ``cycle``: random rows shaped like its spec's features."""
    spec = spec_of(cycle)
    features, labels = random_rows(spec, rows, seed)
    return pack_features(features, labels, spec, edge_id)


def raw_upload(
    cycle: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    spec_hash: str | None = None,
) -> bytes:
    """An upload built by hand (bypassing pack_features' checks), to test refusals."""
    spec = spec_of(cycle)
    meta = {
        SPEC_HASH_KEY: spec_hash if spec_hash is not None else spec.spec_hash(),
        EDGE_KEY: "hand-made",
        CLASSES_KEY: "[]",
    }
    return serialization.dumps(tensors, meta)


def put_features(client: TestClient, cycle_id: int, edge: Edge, body: bytes) -> Any:
    return client.put(
        f"/v1/cycles/{cycle_id}/features",
        content=body,
        headers={**edge.headers, "Content-Type": "application/octet-stream"},
    )


def wait_for_state(
    client: TestClient, cycle_id: int, states: set[str], timeout_s: float = 30.0
) -> dict[str, Any]:
    """Poll a cycle until its state is one of ``states`` (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        cycle: dict[str, Any] = client.get(f"/v1/cycles/{cycle_id}", headers=ADMIN).json()
        if cycle["state"] in states:
            return cycle
        if time.monotonic() > deadline:
            raise AssertionError(f"cycle {cycle_id} still {cycle['state']} after {timeout_s}s")
        time.sleep(0.02)
