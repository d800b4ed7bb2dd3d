"""The lower part run by ONNX Runtime: same features as torch, a checked export, a
clean fallback to torch, and the edge's overlapped extraction path."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_core import features, onnx_runtime
from fl_core.data import batches, load_image_folder, prefetch
from fl_core.features import extract_features, extract_images
from fl_core.model import build_split_model
from fl_core.onnx_runtime import OnnxUnavailable, lower_runner, onnx_runner, torch_runner
from tests.factories import make_image_folder

CLASSES = ["dark", "bright"]


def _model(cut: str = "pooled", seed: int = 0):  # type: ignore[no-untyped-def]
    return build_split_model(CLASSES, "tiny_cnn", cut, pretrained=False, seed=seed)


@pytest.fixture(autouse=True)
def _fresh_sessions() -> None:
    """Each test exports for itself: none reuses a session another test checked."""
    onnx_runtime.clear_sessions()


def test_a_checked_export_is_reused_while_the_stages_are_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exports = []
    real = onnx_runtime.export_lower

    def counting(model: object, end: int | None = None) -> bytes:
        exports.append(end)
        return real(model, end)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_runtime, "export_lower", counting)
    model = _model()
    first = lower_runner(model, end=2)
    assert first.setup_s > 0 and exports == [2]
    # another model with the same stem and b0 (a different head, b1 trained): reused
    twin = _model()
    with torch.no_grad():
        twin.stages[2][0].weight.mul_(2.0)
        twin.head[-1].bias.add_(1.0)
    again = lower_runner(twin, end=2)
    assert exports == [2] and again.setup_s == 0.0 and "export reused" in again.reason
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(again(x), first(x))
    # other stages, other weights or other threads: exported anew
    lower_runner(model)
    lower_runner(_model(seed=1), end=2)
    lower_runner(model, end=2, threads=1)
    assert exports == [2, 4, 2, 2]  # 4: up to the cut (pooled)
    # at most CACHED_SESSIONS are kept: the least recently used is exported again
    for seed in range(2, 2 + onnx_runtime.CACHED_SESSIONS):
        lower_runner(_model(seed=seed), end=2)
    n = len(exports)
    lower_runner(model, end=2)
    assert len(exports) == n + 1


@pytest.mark.parametrize("cut", ["pooled", "b0"])
def test_onnx_lower_matches_torch_at_any_batch_size(cut: str) -> None:
    model = _model(cut)
    runner = onnx_runner(model)
    assert runner.backend == "onnxruntime"
    assert runner.max_abs_diff is not None and runner.max_abs_diff < 1e-4
    for n in (1, 5):
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            expected = model.lower(x)
        got = runner(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("end", [1, 2, 3])
def test_a_runner_can_stop_before_any_stage(end: int) -> None:
    model = _model()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(end))
    with torch.inference_mode():
        expected = model.run_stages(model.normalize(x), 0, end)
    for runner in (onnx_runner(model, end=end), lower_runner(model, "torch", end=end)):
        assert runner.end == end
        torch.testing.assert_close(runner(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("end", [0, 5])
def test_a_runner_refuses_an_end_outside_the_model(end: int) -> None:
    with pytest.raises(ValueError, match=r"end must be in 1\.\.4, got"):
        lower_runner(_model(), end=end)
    with pytest.raises(ValueError, match=r"end must be in 1\.\.4, got"):
        torch_runner(_model(), end=end)


def test_extraction_refuses_a_runner_that_is_not_the_lower_part(tmp_path: Path) -> None:
    images = load_image_folder(make_image_folder(tmp_path, per_class=2, size=32))
    model = _model()
    with pytest.raises(ValueError, match="stops before stage 2, not after the cut"):
        extract_images(model, images, 4, lower=torch_runner(model, end=2))


def test_export_leaves_the_model_in_eval_mode_and_unchanged() -> None:
    model = _model()
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        before = model.lower(x).clone()
    onnx_runtime.export_lower(model)
    assert not model.training
    with torch.inference_mode():
        assert torch.equal(model.lower(x), before)


def test_a_failed_export_falls_back_to_torch_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(_model: object, _end: object = None) -> bytes:
        raise RuntimeError("operator not supported")

    monkeypatch.setattr(onnx_runtime, "export_lower", broken)
    runner = lower_runner(_model())
    assert runner.backend == "torch"
    assert "ONNX export failed" in runner.reason and "operator not supported" in runner.reason


def test_a_session_that_disagrees_with_torch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Wrong:
        def run(self, _names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.zeros((feeds["images"].shape[0], 32), dtype=np.float32) + 1.0]

    monkeypatch.setattr(onnx_runtime, "make_session", lambda _b, _t=None: Wrong())
    with pytest.raises(OnnxUnavailable, match="differs from torch"):
        onnx_runner(_model())
    assert lower_runner(_model()).backend == "torch"


def test_torch_backend_is_used_when_asked() -> None:
    runner = lower_runner(_model(), "torch")
    assert runner.backend == "torch" and runner.max_abs_diff is None


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("imgs"), per_class=10, size=40, classes=("dark", "bright")
    )


@pytest.mark.parametrize("overlap", [True, False])
def test_edge_extraction_path_gives_torchs_features(folder: Path, overlap: bool) -> None:
    images = load_image_folder(folder)
    model = _model()
    want_x, want_y = extract_features(model, batches(images, 32, 6))
    threads = torch.get_num_threads()
    got_x, got_y = extract_images(model, images, 6, lower=onnx_runner(model), overlap=overlap)
    assert torch.get_num_threads() == threads  # restored after extraction
    assert torch.equal(got_y, want_y)
    torch.testing.assert_close(got_x, want_x, atol=1e-4, rtol=1e-4)
    tx, ty = extract_images(model, images, 6, lower=torch_runner(model), overlap=overlap)
    assert torch.equal(ty, want_y) and torch.equal(tx, want_x)


def test_prefetch_keeps_order_and_raises_the_producers_error() -> None:
    assert list(prefetch(range(10), depth=3)) == list(range(10))

    def failing():  # type: ignore[no-untyped-def]
        yield 1
        raise ValueError("bad image")

    got = []
    with pytest.raises(ValueError, match="bad image"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]


def test_prefetch_stops_its_thread_when_the_consumer_stops() -> None:
    before = threading.active_count()
    for i in prefetch(iter(range(1_000_000)), depth=1):
        if i == 3:
            break
    # the generator's finally ran on break-and-collect: the producer has exited
    assert threading.active_count() == before


@pytest.mark.parametrize(("cores", "overlaps"), [(2, False), (4, True)])
def test_extraction_overlaps_decoding_only_with_a_core_to_spare(
    folder: Path, monkeypatch: pytest.MonkeyPatch, cores: int, overlaps: bool
) -> None:
    images = load_image_folder(folder)
    model = _model()
    runner = onnx_runner(model, threads=2)
    prefetched = []

    def spy(items, depth=2):  # type: ignore[no-untyped-def]
        prefetched.append(depth)
        return prefetch(items, depth)

    monkeypatch.setattr(features, "prefetch", spy)
    monkeypatch.setattr(features, "usable_cores", lambda: cores)
    _, y = extract_images(model, images, 6, lower=runner)
    assert bool(prefetched) is overlaps and len(y) == len(images)
    extract_images(model, images, 6, lower=runner, overlap=True)  # asked for: always
    assert len(prefetched) == int(overlaps) + 1


def _with_prior(seed: int = 0):  # type: ignore[no-untyped-def]
    """A model whose class prior is not uniform, so the export must carry it."""
    model = _model(seed=seed)
    model.set_class_prior(torch.tensor([30.0, 2.0]))
    return model


@pytest.mark.parametrize("batch", [1, 5])
def test_the_whole_model_in_onnx_gives_torchs_probabilities(batch: int) -> None:
    model = _with_prior()
    runner = onnx_runtime.model_runner(model, threads=1)
    assert runner.backend == "onnxruntime" and runner.onnx_bytes is not None
    x = torch.rand(batch, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x).softmax(dim=1).numpy()
    got = runner(x)
    assert got.shape == (batch, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_the_model_export_names_its_classes_and_input_size() -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_runtime.export_model(_model(), {"extra": "1"}))
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[onnx_runtime.META_CLASS_NAMES] == '["dark", "bright"]'
    assert meta[onnx_runtime.META_INPUT_SIZE] == "32" and meta["extra"] == "1"
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]


def test_an_export_of_another_model_is_refused_and_exported_again() -> None:
    other = onnx_runtime.export_model(_model(seed=1))
    with pytest.raises(OnnxUnavailable, match="differs from torch"):
        onnx_runtime.onnx_model_runner(_with_prior(), onnx_bytes=other)
    runner = onnx_runtime.model_runner(_with_prior(), onnx_bytes=other)
    assert runner.backend == "onnxruntime" and runner.onnx_bytes != other


def test_a_model_that_cannot_be_exported_is_served_by_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(_model: object, _meta: object = None) -> bytes:
        raise RuntimeError("operator not supported")

    monkeypatch.setattr(onnx_runtime, "export_model", broken)
    model = _model()
    runner = onnx_runtime.model_runner(model)
    assert runner.backend == "torch" and "operator not supported" in runner.reason
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(runner(x), model(x).softmax(dim=1).numpy(), atol=1e-6)
    assert onnx_runtime.model_runner(model, "torch").reason == "torch requested"
