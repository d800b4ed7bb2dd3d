"""The deployed model served through ONNX Runtime, and downloaded as an ONNX file."""

from __future__ import annotations

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from edge_service.services.context import EdgeContext
from fl_core.data import image_transform
from fl_core.model import SplitModel
from tests.edge_service.conftest import AUTH, CLASSES, EdgeFactory, TestClient, deploy_model
from tests.edge_service.conftest import tiny_model as _tiny
from tests.edge_service.fakes import FakeServer

ONNX_URL = "/v1/models/deployed/onnx"


def tiny_model(seed: int) -> SplitModel:
    """A tiny model with a skewed class prior (which the export must carry)."""
    model = _tiny(seed)
    model.set_class_prior(torch.tensor([25.0, 3.0]))
    return model


def _png(value: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(value)
    pixels = np.clip(rng.normal(value, 40, (size, size)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


IMAGES = [_png(v) for v in (30, 90, 150, 220)]


def _inputs() -> torch.Tensor:
    transform = image_transform(32, augment=False)
    return torch.stack([transform(Image.open(io.BytesIO(data))) for data in IMAGES])


def _predict(edge: TestClient) -> tuple[int, np.ndarray]:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES)]
    response = edge.post("/v1/predict", headers=AUTH, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    scores = np.array([[p["scores"][c] for c in CLASSES] for p in body["predictions"]])
    assert [p["label"] for p in body["predictions"]] == [CLASSES[i] for i in scores.argmax(1)]
    return body["model_id"], scores


def _torch_scores(model: SplitModel) -> np.ndarray:
    with torch.inference_mode():
        return model(_inputs()).softmax(dim=1).numpy()


def _ctx(edge: TestClient) -> EdgeContext:
    ctx: EdgeContext = edge.app.state.ctx  # type: ignore[attr-defined]
    return ctx


def test_predictions_go_through_onnxruntime_and_equal_torchs(edge: TestClient) -> None:
    model = tiny_model(3)
    deploy_model(_ctx(edge), model)
    _, scores = _predict(edge)
    serving = _ctx(edge).deployed.serving()
    assert serving is not None and serving.runner.backend == "onnxruntime"
    expected = _torch_scores(model)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert (scores.argmax(1) == expected.argmax(1)).all()


def test_the_onnx_download_gives_the_predictions_of_the_edge(edge: TestClient) -> None:
    local = deploy_model(_ctx(edge), tiny_model(3), base_version=7)
    _, scores = _predict(edge)
    response = edge.get(ONNX_URL, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-fedinspect-model-id"] == str(local.id)
    assert response.headers["x-fedinspect-model-version"] == "7"
    assert f"fedinspect-model-{local.id}.onnx" in response.headers["content-disposition"]

    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["fedinspect.class_names"]) == CLASSES
    assert meta["fedinspect.input_size"] == "32"
    (probs,) = session.run(["probabilities"], {"images": _inputs().numpy()})
    np.testing.assert_allclose(probs, scores, atol=1e-6)


def test_a_new_deploy_or_a_rollback_changes_the_served_export(edge: TestClient) -> None:
    ctx = _ctx(edge)
    first_model, second_model = tiny_model(3), tiny_model(4)
    first = deploy_model(ctx, first_model, 1)
    assert _predict(edge)[0] == first.id
    first_file = edge.get(ONNX_URL, headers=AUTH).content

    second = deploy_model(ctx, second_model, 2)
    model_id, scores = _predict(edge)
    assert model_id == second.id
    np.testing.assert_allclose(scores, _torch_scores(second_model), atol=1e-5)
    second_file = edge.get(ONNX_URL, headers=AUTH)
    assert second_file.headers["x-fedinspect-model-id"] == str(second.id)
    assert second_file.content != first_file

    # the rollback serves the first model again, from its kept export
    assert edge.post(f"/v1/models/{first.id}/activate", headers=AUTH).status_code == 200
    model_id, scores = _predict(edge)
    assert model_id == first.id
    np.testing.assert_allclose(scores, _torch_scores(first_model), atol=1e-5)
    serving = ctx.deployed.serving()
    assert serving is not None and serving.runner.onnx_bytes == first_file
    assert sorted(p.name for p in ctx.settings.onnx_dir.iterdir()) == sorted(
        f"{m.sha256}.onnx" for m in (first, second)
    )


def test_the_export_happens_once_per_deployment(
    edge: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_service.services import serving

    calls: list[int] = []
    real = serving.model_runner

    def counted(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(serving, "model_runner", counted)
    deploy_model(_ctx(edge), tiny_model(3))
    for _ in range(3):
        _predict(edge)
    edge.get(ONNX_URL, headers=AUTH)
    assert len(calls) == 1


def test_no_deployed_model_is_404(edge: TestClient) -> None:
    response = edge.get(ONNX_URL, headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": "no model deployed yet: run a cycle first"}


def test_the_download_needs_the_admin_token(edge: TestClient) -> None:
    deploy_model(_ctx(edge), tiny_model(3))
    assert edge.get(ONNX_URL).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert edge.get(ONNX_URL, headers=wrong).status_code == 401


def test_with_the_torch_backend_predictions_run_in_torch_and_the_file_downloads(
    make_edge: EdgeFactory, fake_server: FakeServer
) -> None:
    edge = make_edge(fake_server.client(), extract_backend="torch")
    model = tiny_model(3)
    deploy_model(_ctx(edge), model)
    _, scores = _predict(edge)
    serving = _ctx(edge).deployed.serving()
    assert serving is not None and serving.runner.backend == "torch"
    np.testing.assert_allclose(scores, _torch_scores(model), atol=1e-6)
    response = edge.get(ONNX_URL, headers=AUTH)
    assert response.status_code == 200
    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    (probs,) = session.run(["probabilities"], {"images": _inputs().numpy()})
    np.testing.assert_allclose(probs, scores, atol=1e-5)


def test_the_route_is_documented_with_its_errors(edge: TestClient) -> None:
    spec = edge.get("/openapi.json").json()["paths"][ONNX_URL]["get"]
    assert "application/octet-stream" in spec["responses"]["200"]["content"]
    assert {"401", "404", "409"} <= set(spec["responses"])


def test_a_request_larger_than_a_batch_is_decoded_and_run_in_batches(
    make_edge: EdgeFactory, fake_server: FakeServer
) -> None:
    edge = make_edge(fake_server.client(), batch_size=3)
    model = tiny_model(3)
    deploy_model(_ctx(edge), model)
    _, scores = _predict(edge)  # 4 images: a batch of 3, then one of 1
    np.testing.assert_allclose(scores, _torch_scores(model), atol=1e-5)
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES)]
    body = edge.post("/v1/predict?heatmap=true", headers=AUTH, files=files).json()
    assert [p["heatmap_class"] for p in body["predictions"]] == [
        CLASSES[i] for i in scores.argmax(1)
    ]
    assert all(p["heatmap_png_base64"] for p in body["predictions"])


def test_a_corrupt_image_in_a_later_batch_is_refused_by_name(
    make_edge: EdgeFactory, fake_server: FakeServer
) -> None:
    edge = make_edge(fake_server.client(), batch_size=2)
    deploy_model(_ctx(edge), tiny_model(3))
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES)]
    files.append(("files", ("cut.png", IMAGES[0][:-200], "image/png")))
    response = edge.post("/v1/predict", headers=AUTH, files=files)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("cut.png: the image is truncated or corrupt")


def test_the_export_is_made_at_deployment_not_by_the_first_request(edge: TestClient) -> None:
    ctx = _ctx(edge)
    local = deploy_model(ctx, tiny_model(3))
    assert (ctx.settings.onnx_dir / f"{local.sha256}.onnx").is_file()


def test_a_failing_deploy_listener_does_not_undo_the_deployment(edge: TestClient) -> None:
    ctx = _ctx(edge)

    def broken(_model: object) -> None:
        raise RuntimeError("no room on the disk")

    ctx.registry.on_deploy(broken)
    local = deploy_model(ctx, tiny_model(3))
    deployed = ctx.registry.deployed()
    assert deployed is not None and deployed.id == local.id
    assert _predict(edge)[0] == local.id
