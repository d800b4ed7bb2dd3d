"""POST /v1/predict: labels, scores, Grad-CAM heat maps, and refusing bad images."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edge_service.services.context import EdgeContext
from edge_service.services.predict import grad_cam
from tests.edge_service.conftest import (
    AUTH,
    CLASSES,
    EdgeFactory,
    TestClient,
    deploy_model,
    tiny_model,
)
from tests.edge_service.fakes import FakeServer


def png(width: int, height: int, value: int = 200, mode: str = "L") -> bytes:
    rng = np.random.default_rng(0)
    shape = (height, width) if mode == "L" else (height, width, 3)
    pixels = np.clip(rng.normal(value, 20, shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def claims_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    assert data[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(ihdr))
    return data[:12] + ihdr + crc + data[33:]


def deploy_tiny(client: TestClient) -> int:
    ctx: EdgeContext = client.app.state.ctx  # type: ignore[attr-defined]
    return deploy_model(ctx, tiny_model(2), 4).id


def test_no_model_deployed_is_409(edge: TestClient) -> None:
    response = edge.post("/v1/predict", headers=AUTH, files={"files": ("a.png", png(8, 8))})
    assert response.status_code == 409
    assert response.json() == {"detail": "no model deployed yet: run a cycle first"}


def test_predict_several_images(edge: TestClient) -> None:
    model_id = deploy_tiny(edge)
    files = [
        ("files", ("bright.png", png(40, 30, 220), "image/png")),
        ("files", ("dark.png", png(33, 33, 40, mode="RGB"), "image/png")),
        ("files", ("dot.png", png(1, 1), "image/png")),
    ]
    response = edge.post("/v1/predict", headers=AUTH, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == model_id and body["model_version"] == 4
    assert body["latency_ms"] > 0
    assert [p["filename"] for p in body["predictions"]] == ["bright.png", "dark.png", "dot.png"]
    for p in body["predictions"]:
        assert p["label"] in CLASSES
        assert set(p["scores"]) == set(CLASSES)
        assert abs(sum(p["scores"].values()) - 1.0) < 1e-5
        assert p["label"] == max(p["scores"], key=p["scores"].get)
        assert p["heatmap_png_base64"] is None


def test_heatmap_is_a_png_of_the_image_size(edge: TestClient) -> None:
    deploy_tiny(edge)
    files = [("files", ("a.png", png(48, 36), "image/png")), ("files", ("b.png", png(1, 1)))]
    response = edge.post("/v1/predict?heatmap=true", headers=AUTH, files=files)
    assert response.status_code == 200, response.text
    sizes = []
    for p in response.json()["predictions"]:
        raw = base64.b64decode(p["heatmap_png_base64"])
        assert raw.startswith(b"\x89PNG")
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            sizes.append((img.size, img.mode))
    assert sizes == [((48, 36), "RGB"), ((1, 1), "RGB")]


def test_grad_cam_map_is_normalised_and_spatial() -> None:
    model = tiny_model(0)
    cam = grad_cam(model, __import__("torch").rand(1, 3, 32, 32), 1)
    assert cam.shape == (4, 4)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "data", "status", "fragment"),
    [
        ("notes.txt", b"this is not an image at all", 422, "notes.txt: not an image"),
        ("empty.png", b"", 422, "empty.png: empty file"),
        ("cut.png", png(64, 64)[:-200], 422, "cut.png: the image is truncated or corrupt"),
    ],
)
def test_bad_images_are_refused(
    edge: TestClient, name: str, data: bytes, status: int, fragment: str
) -> None:
    deploy_tiny(edge)
    response = edge.post("/v1/predict", headers=AUTH, files={"files": (name, data)})
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_too_many_pixels_is_413(make_edge: EdgeFactory, fake_server: FakeServer) -> None:
    edge = make_edge(fake_server.client(), max_image_pixels=20 * 20)
    deploy_tiny(edge)
    ok = edge.post("/v1/predict", headers=AUTH, files={"files": ("ok.png", png(20, 20))})
    assert ok.status_code == 200
    big = edge.post("/v1/predict", headers=AUTH, files={"files": ("big.png", png(21, 20))})
    assert big.status_code == 413
    assert big.json()["detail"] == "big.png: 21x20 = 420 pixels; the limit is 400"


@pytest.mark.parametrize(
    ("size", "detail"),
    [
        ((10000, 6000), "bomb.png: 10000x6000 = 60000000 pixels; the limit is 50000000"),
        ((20000, 20000), "bomb.png: image too large"),  # past PIL's own hard limit
    ],
)
def test_decompression_bomb_is_413(edge: TestClient, size: tuple[int, int], detail: str) -> None:
    deploy_tiny(edge)
    bomb = claims_size(png(4, 4), *size)
    response = edge.post("/v1/predict", headers=AUTH, files={"files": ("bomb.png", bomb)})
    assert response.status_code == 413
    assert response.json()["detail"].startswith(detail)


def test_too_many_bytes_is_413(make_edge: EdgeFactory, fake_server: FakeServer) -> None:
    edge = make_edge(fake_server.client(), max_predict_bytes=4000)
    deploy_tiny(edge)
    big = png(128, 128)
    assert len(big) > 4000
    response = edge.post("/v1/predict", headers=AUTH, files={"files": ("big.png", big)})
    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large: the limit is 4000 bytes"
    small = edge.post("/v1/predict", headers=AUTH, files={"files": ("s.png", png(8, 8))})
    assert small.status_code == 200


def test_streamed_body_over_the_limit_is_413(
    make_edge: EdgeFactory, fake_server: FakeServer
) -> None:
    edge = make_edge(fake_server.client(), max_predict_bytes=4000)
    deploy_tiny(edge)
    boundary = "xyz"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png(128, 128)
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> object:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    response = edge.post(
        "/v1/predict",
        headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=chunks(),  # type: ignore[arg-type]
    )
    assert response.status_code == 413
    assert "request body too large" in response.json()["detail"]


def test_no_files_is_422(edge: TestClient) -> None:
    deploy_tiny(edge)
    response = edge.post("/v1/predict", headers=AUTH, data={"x": "1"})
    assert response.status_code == 422


def test_predictions_are_counted_in_metrics(edge: TestClient) -> None:
    deploy_tiny(edge)
    for _ in range(2):
        edge.post("/v1/predict", headers=AUTH, files={"files": ("a.png", png(8, 8))})
    text = edge.get("/metrics", headers=AUTH).text
    assert "fedinspect_edge_predictions_total 2.0" in text
    assert "fedinspect_edge_prediction_latency_seconds_count 2.0" in text


def test_heatmap_as_png_names_the_class_it_shows(edge: TestClient) -> None:
    deploy_tiny(edge)
    one = {"files": ("a.png", png(48, 36), "image/png")}
    as_json = edge.post("/v1/predict?heatmap=true", headers=AUTH, files=one).json()
    (scored,) = as_json["predictions"]
    assert scored["heatmap_class"] == scored["label"]

    response = edge.post("/v1/predict?format=png", headers=AUTH, files=one)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content == base64.b64decode(scored["heatmap_png_base64"])
    assert response.headers["X-FedInspect-Label"] == scored["label"]
    assert response.headers["X-FedInspect-Heatmap-Class"] == scored["label"]
    assert json.loads(response.headers["X-FedInspect-Scores"]) == pytest.approx(scored["scores"])

    two = [("files", ("a.png", png(8, 8))), ("files", ("b.png", png(8, 8)))]
    refused = edge.post("/v1/predict?format=png", headers=AUTH, files=two)
    assert refused.status_code == 422
    assert refused.json() == {"detail": "format=png answers one heat map: send one image, not 2"}
