"""Delta download of base models: after a cycle, the edge fetches only the tensors that
changed (the part above the cut), rebuilds the exact full weights, and falls back to a
full download when the server cannot serve a delta or the rebuilt bytes do not check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import SecretStr

from edge_service.db import EdgeStore
from edge_service.main import create_app
from edge_service.services.registry import ModelRegistry
from edge_service.services.weights import LAST_BASE_KEY, FetchedWeights, fetch_base_weights
from fl_core import serialization
from fl_core.blobstore import LocalBlobStore
from fl_core.errors import RemoteError
from fl_core.model import build_split_model, model_from_bytes, model_to_bytes
from fl_core.rounds import apply_update, pack_aggregate
from fl_core.schemas import AggregatedUpdate, ModelManifest
from tests.edge_service.conftest import AUTH, TestClient, make_settings, tiny_model, wait_job
from tests.edge_service.test_cycle_server import SERVER_ADMIN, server  # noqa: F401  (fixture)


def test_a_cycle_downloads_the_base_in_full_then_only_the_changed_head(
    server: TestClient,  # noqa: F811
    tmp_path: Path,
    image_folder: Path,
) -> None:
    reg = server.post("/v1/edges", headers=SERVER_ADMIN, json={"name": "edge-1"}).json()
    settings = make_settings(
        tmp_path / "edge", image_folder, token=SecretStr(reg["token"]), edge_id=reg["edge_id"]
    )
    v1_size = server.get("/v1/models/1", headers=SERVER_ADMIN).json()["size"]
    with TestClient(create_app(settings, server)) as edge:
        done = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"], 120)
        assert done["state"] == "done", done["error"]
        result = done["result"]
    assert result["downloads"] == ["full", "delta"]
    v2 = server.get("/v1/models/2", headers=SERVER_ADMIN).json()
    delta_bytes = result["bytes_downloaded"] - v1_size
    assert 0 < delta_bytes < v2["size"]
    # the rebuilt file is the server's, byte for byte
    blobs = LocalBlobStore(tmp_path / "edge" / "blobs")
    assert blobs.exists(v2["sha256"])
    assert (
        blobs.get(v2["sha256"]) == server.get("/v1/models/2/weights", headers=SERVER_ADMIN).content
    )


class _StubClient:
    """Serves version 2 of a tiny model; can lie about the subset or lack the routes."""

    def __init__(
        self,
        v2: bytes,
        tamper: bool = False,
        has_delta: bool = True,
        update: AggregatedUpdate | None = None,
        update_file: bytes = b"",
    ) -> None:
        self.v2, self.tamper, self.has_delta = v2, tamper, has_delta
        self.update, self.update_file = update, update_file
        self.calls: list[str] = []

    def get_manifest(self, version: int) -> ModelManifest:
        self.calls.append("manifest")
        if not self.has_delta:
            raise RemoteError("server answered 404 to GET /v1/models/2/manifest", 404)
        return ModelManifest(
            version=version,
            sha256=serialization.sha256_bytes(self.v2),
            tensors=serialization.tensor_digests(self.v2),
            update=self.update,
        )

    def download_update(self, version: int, sha256: str) -> bytes:
        self.calls.append("update")
        return self.update_file

    def download_tensors(self, version: int, names: list[str]) -> bytes:
        self.calls.append(f"subset:{len(names)}")
        tensors, meta = serialization.loads(serialization.subset(self.v2, names))
        if self.tamper:
            tensors = {n: t + 1 for n, t in tensors.items()}
        return serialization.dumps(tensors, meta)

    def download_weights(self, version: int, sha256: str) -> bytes:
        self.calls.append("full")
        return self.v2


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(EdgeStore.open(tmp_path / "edge.db"), LocalBlobStore(tmp_path / "b"))


def _versions() -> tuple[bytes, bytes]:
    v1_model = tiny_model(0)
    v1 = model_to_bytes(v1_model)
    v2_model = tiny_model(0)
    v2_model.head[-1].weight.data += 0.5  # a cycle retrains the head only
    return v1, model_to_bytes(v2_model)


def _fetch(
    client: _StubClient, registry: ModelRegistry, weights: bytes, backbone: str | None = None
) -> FetchedWeights:
    """fetch_base_weights of ``weights`` (version 2) through the stub server."""
    return fetch_base_weights(
        client,  # type: ignore[arg-type]
        registry,
        2,
        serialization.sha256_bytes(weights),
        backbone=backbone,
    )


def _hold(registry: ModelRegistry, weights: bytes) -> None:
    registry.store.set_state(LAST_BASE_KEY, registry.blobs.put(weights))


def test_delta_fetches_only_changed_tensors(registry: ModelRegistry) -> None:
    v1, v2 = _versions()
    _hold(registry, v1)
    client = _StubClient(v2)
    got = _fetch(client, registry, v2)
    assert got.how == "delta" and got.data == v2
    assert client.calls == ["manifest", "subset:1"]
    assert got.fetched_tensors == 1 < got.total_tensors
    assert 0 < got.downloaded < len(v2)
    assert registry.store.get_state(LAST_BASE_KEY) == serialization.sha256_bytes(v2)
    # held now: the next call downloads nothing
    again = _fetch(client, registry, v2)
    assert again.how == "cached" and again.downloaded == 0


@pytest.mark.parametrize("stub", ["tampered subset", "no delta routes"])
def test_delta_falls_back_to_a_full_download(registry: ModelRegistry, stub: str) -> None:
    v1, v2 = _versions()
    _hold(registry, v1)
    client = _StubClient(v2, tamper=stub == "tampered subset", has_delta=stub != "no delta routes")
    got = _fetch(client, registry, v2)
    assert got.how == "full" and got.data == v2 and got.downloaded == len(v2)
    assert client.calls[-1] == "full"


def test_without_a_previous_base_the_download_is_full(registry: ModelRegistry) -> None:
    _, v2 = _versions()
    client = _StubClient(v2)
    got = _fetch(client, registry, v2)
    assert got.how == "full" and client.calls == ["full"]


def test_a_first_base_model_fetches_only_what_differs_from_the_local_imagenet_weights(
    registry: ModelRegistry,
) -> None:
    # the server's first base model: ImageNet weights below the cut, a fresh head
    base = build_split_model(["ok", "crack", "dirt"], "efficientnet_lite0", seed=7)
    with torch.no_grad():
        next(base.stages.parameters()).add_(0.01)  # a tensor the local weights lack
    v1 = model_to_bytes(base)
    client = _StubClient(v1)
    got = _fetch(client, registry, v1, backbone="efficientnet_lite0")
    assert got.how == "delta" and got.data == v1
    head = sum(p.numel() * 4 for p in base.head.parameters())
    # the head, its logit adjustment, the changed tensor, the manifest: a tenth of the file
    assert head < got.downloaded < len(v1) / 10
    assert got.fetched_tensors == len(list(base.head.state_dict())) + 2


def test_a_backbone_without_local_weights_downloads_the_first_base_in_full(
    registry: ModelRegistry,
) -> None:
    _, v2 = _versions()  # tiny_cnn: no pretrained weights anywhere
    client = _StubClient(v2)
    got = _fetch(client, registry, v2, backbone="tiny_cnn")
    assert got.how == "full" and got.data == v2 and client.calls == ["full"]


def _round_versions(lie: bool = False) -> tuple[bytes, bytes, AggregatedUpdate, bytes]:
    """Version 1 and the round's model 2 = 1 + an averaged update, as the server makes
    them; with ``lie`` the update file announced is not the one that made version 2."""
    v1 = model_to_bytes(tiny_model(0))
    model = model_from_bytes(v1)
    mean = {n: torch.full_like(p, 0.01) for n, p in model.head.named_parameters(prefix="head")}
    wire, file = pack_aggregate(mean, "float16", serialization.sha256_bytes(v1))
    apply_update(model, wire)
    v2 = model_to_bytes(model)
    if lie:
        _, file = pack_aggregate(
            {n: t * 2 for n, t in mean.items()}, "float16", serialization.sha256_bytes(v1)
        )
    update = AggregatedUpdate(
        parent=1,
        parent_sha256=serialization.sha256_bytes(v1),
        sha256=serialization.sha256_bytes(file),
        size=len(file),
        dtype="float16",
    )
    return v1, v2, update, file


def test_a_rounds_model_comes_as_its_averaged_update(registry: ModelRegistry) -> None:
    v1, v2, update, file = _round_versions()
    _hold(registry, v1)
    client = _StubClient(v2, update=update, update_file=file)
    got = _fetch(client, registry, v2)
    assert got.how == "update" and got.data == v2
    assert client.calls == ["manifest", "update"]
    names = list(serialization.inspect_header(file)[0])
    assert got.fetched_tensors == len(names) < got.total_tensors
    changed = serialization.subset(v2, names)  # what the delta would have fetched
    assert len(file) < got.downloaded < len(file) + 4000  # the update and the manifest
    assert len(file) < 0.6 * len(changed)


def test_an_update_that_does_not_rebuild_the_weights_falls_back_to_the_tensors(
    registry: ModelRegistry,
) -> None:
    v1, v2, update, file = _round_versions(lie=True)
    _hold(registry, v1)
    client = _StubClient(v2, update=update, update_file=file)
    got = _fetch(client, registry, v2)
    assert got.how == "delta" and got.data == v2
    assert client.calls[:2] == ["manifest", "update"] and client.calls[2].startswith("subset")


def test_an_update_of_weights_the_edge_does_not_hold_is_not_fetched(
    registry: ModelRegistry,
) -> None:
    _, v2, update, file = _round_versions()
    _hold(registry, model_to_bytes(tiny_model(1)))  # another parent
    client = _StubClient(v2, update=update, update_file=file)
    got = _fetch(client, registry, v2)
    assert got.data == v2 and "update" not in client.calls
