"""Privacy modes on the server: settings, stats uploads (valid and refused), training
on virtual features, and the privacy recorded in the model's metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fl_core.errors import ConfigError
from fl_core.privacy import pack_stats
from server_service.config import Settings, load_settings
from tests.server_service.helpers import (
    ADMIN,
    ADMIN_TOKEN,
    Edge,
    TestClient,
    make_settings,
    make_upload,
    put_features,
    random_rows,
    raw_upload,
    running,
    spec_of,
    wait_for_state,
)


def _register(client: TestClient, name: str) -> Edge:
    body = client.post("/v1/edges", json={"name": name}, headers=ADMIN).json()
    return Edge(edge_id=body["edge_id"], name=body["name"], token=body["token"])


def _stats_upload(cycle: dict[str, Any], edge_id: str, rows: int = 24, seed: int = 0) -> bytes:
    spec = spec_of(cycle)
    features, labels = random_rows(spec, rows, seed)
    return pack_stats(features, labels, spec, edge_id, seed=seed)


def test_privacy_mode_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FEDINSPECT_SERVER_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("FEDINSPECT_SERVER_PRIVACY__MODE", "stats")
    monkeypatch.setenv("FEDINSPECT_SERVER_PRIVACY__NOISE_SIGMA", "0.25")
    s = load_settings()
    assert (s.privacy.mode, s.privacy.noise_sigma) == ("stats", 0.25)
    monkeypatch.setenv("FEDINSPECT_SERVER_CUT", "b10")
    with pytest.raises(ConfigError, match=r"FEDINSPECT_SERVER_PRIVACY: .*cut must be 'pooled'"):
        load_settings()


def test_spatial_mode_cuts_at_the_backbones_spatial_block(data_dir: Path) -> None:
    settings = make_settings(data_dir, privacy={"mode": "spatial"})
    with running(settings) as client:
        edge = _register(client, "a")
        cycle = client.post("/v1/cycles", headers=edge.headers).json()
        assert cycle["spec"]["cut"] == "b0"  # tiny_cnn's default spatial cut
        assert cycle["spec"]["privacy"]["mode"] == "spatial"
        assert len(cycle["spec"]["feature_shape"]) == 3


def test_a_cut_alone_still_means_spatial(data_dir: Path) -> None:
    with running(make_settings(data_dir, cut="b1", privacy={"noise_sigma": 0.0})) as client:
        edge = _register(client, "a")
        spec = client.post("/v1/cycles", headers=edge.headers).json()["spec"]
        assert (spec["cut"], spec["privacy"]["mode"]) == ("b1", "spatial")


@pytest.fixture
def stats_client(data_dir: Path) -> Any:
    settings = make_settings(
        data_dir,
        min_edges=2,
        max_upload_rows=50,
        train_epochs=3,
        privacy={"mode": "stats", "stats_min_count": 4, "clip_norm": 10.0, "noise_sigma": 0.1},
    )
    with running(settings) as client:
        yield client


def test_stats_uploads_train_a_model_that_records_its_privacy(stats_client: TestClient) -> None:
    client = stats_client
    a, b = _register(client, "a"), _register(client, "b")
    cycle = client.post("/v1/cycles", headers=a.headers).json()
    assert cycle["spec"]["privacy"]["mode"] == "stats"
    resp = put_features(client, cycle["id"], a, _stats_upload(cycle, a.edge_id, rows=24, seed=1))
    assert resp.status_code == 201, resp.text
    assert resp.json()["rows"] == 24
    put_features(client, cycle["id"], b, _stats_upload(cycle, b.edge_id, rows=16, seed=2))
    done = wait_for_state(client, cycle["id"], {"done", "failed"})
    assert done["state"] == "done", done["reason"]
    model = client.get(f"/v1/models/{done['result_model_version']}", headers=ADMIN).json()
    assert model["privacy"] == cycle["spec"]["privacy"]
    assert model["privacy"]["mode"] == "stats" and model["privacy"]["noise_sigma"] == 0.1
    trained = model["trained_from"]
    assert trained["rows_per_edge"] == {a.edge_id: 24, b.edge_id: 16}
    # one virtual row per row the statistics were computed from
    assert trained["rows_train"] + trained["rows_val"] == 40


def test_stats_mode_refuses_rows(stats_client: TestClient) -> None:
    edge = _register(stats_client, "a")
    cycle = stats_client.post("/v1/cycles", headers=edge.headers).json()
    rows = make_upload(cycle, edge.edge_id)
    resp = put_features(stats_client, cycle["id"], edge, rows)
    assert resp.status_code == 422
    assert resp.json()["detail"] == (
        "a stats upload must hold exactly the tensors ['counts', 'factors', 'means', 'vars']"
    )


def _dim(cycle: dict[str, Any]) -> int:
    return int(cycle["spec"]["feature_shape"][0])


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (lambda d: {"counts": torch.tensor([8, 8, 8])}, "counts must be int64 of shape [2]"),
        (lambda d: {"means": torch.zeros(2, d + 1)}, "means must be float32 of shape [2, {d}]"),
        (lambda d: {"vars": torch.ones(2, d).double()}, "vars must be float32 of shape [2, {d}]"),
        (lambda d: {"counts": torch.tensor([8, -8])}, "counts must not be negative"),
        (lambda d: {"counts": torch.tensor([8, 2])}, "a class count must be 0 or at least 4"),
        (lambda d: {"counts": torch.tensor([0, 0])}, "upload holds no rows"),
        (lambda d: {"counts": torch.tensor([40, 40])}, "upload holds 80 rows; the limit is 50"),
        (
            lambda d: {"means": torch.full((2, d), float("nan"))},
            "means, vars and factors must be finite",
        ),
        (lambda d: {"vars": -torch.ones(2, d)}, "vars must not be negative"),
        (
            lambda d: {"factors": torch.ones(1, d)},
            "too many factors (1) for 16 rows: at most one for every 32 rows",
        ),
    ],
)
def test_malformed_stats_uploads_are_refused(
    stats_client: TestClient, change: Any, detail: str
) -> None:
    edge = _register(stats_client, "a")
    cycle = stats_client.post("/v1/cycles", headers=edge.headers).json()
    d = _dim(cycle)
    tensors = {
        "counts": torch.tensor([8, 8]),
        "means": torch.zeros(2, d),
        "vars": torch.ones(2, d),
        "factors": torch.zeros(0, d),
    }
    body = raw_upload(cycle, tensors | change(d))
    resp = put_features(stats_client, cycle["id"], edge, body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == detail.format(d=d)
    got = stats_client.get(f"/v1/cycles/{cycle['id']}", headers=ADMIN).json()
    assert got["uploads"] == []


def test_default_sends_statistics_and_pooled_mode_is_noised(tmp_path: Path) -> None:
    s = Settings(admin_token=ADMIN_TOKEN, data_dir=tmp_path)
    assert (s.privacy.mode, s.privacy.clip_norm, s.privacy.noise_sigma) == ("stats", None, 0.0)
    assert s.privacy.stats_rank == 32
    # asking for rows starts from the pooled mode's bound and noise; an explicit noise
    # replaces it; a wire dtype of rows asks for rows
    pooled = make_settings(tmp_path, privacy={"mode": "pooled"}).privacy
    assert (pooled.clip_norm, pooled.noise_sigma) == (24.0, 2.0)
    assert make_settings(tmp_path, privacy={"dtype": "float16"}).privacy.noise_sigma == 2.0
    assert make_settings(tmp_path, privacy={"noise_sigma": 0}).privacy.mode == "stats"
    # other modes and a spatial cut start without the pooled rows' bound and noise
    stats = make_settings(tmp_path, privacy={"mode": "stats"}).privacy
    assert (stats.clip_norm, stats.noise_sigma) == (None, 0.0)
    spatial = Settings(admin_token=ADMIN_TOKEN, data_dir=tmp_path, cut="b1").privacy
    assert (spatial.clip_norm, spatial.noise_sigma) == (None, 0.0)
