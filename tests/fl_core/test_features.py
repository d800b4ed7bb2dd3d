"""Extraction, privacy transforms, and the upload wire format."""

from __future__ import annotations

import pytest
import torch

from fl_core import serialization
from fl_core.errors import InvalidInput, NotSafetensors
from fl_core.features import (
    apply_privacy,
    extract_features,
    make_spec,
    pack_features,
    unpack_features,
    validate_upload_header,
)
from fl_core.model import build_split_model
from fl_core.schemas import PrivacyConfig

CLASSES = ["ok", "bad"]


def _spec(privacy: PrivacyConfig | None = None, cut: str = "pooled"):  # type: ignore[no-untyped-def]
    model = build_split_model(CLASSES, "tiny_cnn", cut, pretrained=False)
    return model, make_spec(model, 1, "ab" * 32, privacy)


def test_extraction_streams_batches_and_reports_progress() -> None:
    model, _ = _spec()
    batches = [(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    seen: list[tuple[int, int]] = []
    feats, labels = extract_features(model, iter(batches), 12, lambda d, t: seen.append((d, t)))
    assert feats.shape == (12, 32) and labels.tolist() == [0, 1, 0, 1] * 3
    assert seen == [(4, 12), (8, 12), (12, 12)]
    with torch.no_grad():
        assert torch.allclose(feats[:4], model.lower(batches[0][0]), atol=1e-6)


def test_spec_hash_is_stable_and_sensitive() -> None:
    _, spec = _spec()
    assert spec.spec_hash() == spec.model_copy().spec_hash()
    other = spec.model_copy(update={"base_model_version": 2})
    assert other.spec_hash() != spec.spec_hash()


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_pack_unpack_round_trip(dtype: str) -> None:
    _, spec = _spec(PrivacyConfig(dtype=dtype))  # type: ignore[arg-type]
    feats = torch.randn(10, 32)
    labels = torch.randint(0, 2, (10,))
    data = pack_features(feats, labels, spec, "edge-1")
    batch = unpack_features(data, spec, max_rows=100)
    assert batch.edge_id == "edge-1" and batch.spec_hash == spec.spec_hash()
    assert torch.equal(batch.labels, labels)
    tol = {"float32": 0.0, "float16": 1e-2, "int8": 3e-2}[dtype]
    assert (batch.features - feats).abs().max() <= tol * feats.abs().max() + 1e-7


def test_upload_sizes_shrink_with_dtype() -> None:
    sizes = {}
    for dtype in ("float32", "float16", "int8"):
        _, spec = _spec(PrivacyConfig(dtype=dtype))  # type: ignore[arg-type]
        sizes[dtype] = len(pack_features(torch.randn(64, 32), torch.zeros(64).long(), spec, "e"))
    assert sizes["float32"] > sizes["float16"] > sizes["int8"]


def test_clipping_bounds_every_row() -> None:
    x = torch.randn(50, 32) * 10
    clipped = apply_privacy(x, PrivacyConfig(clip_norm=1.0))
    assert clipped.norm(dim=1).max() <= 1.0 + 1e-5
    small = torch.full((1, 32), 0.01)
    assert torch.equal(apply_privacy(small, PrivacyConfig(clip_norm=1.0)), small)


def test_gaussian_noise_has_the_stated_sigma() -> None:
    x = torch.zeros(2000, 32)
    noisy = apply_privacy(x, PrivacyConfig(noise_sigma=0.5), torch.Generator().manual_seed(0))
    assert noisy.std().item() == pytest.approx(0.5, rel=0.03)


def _rebuild(spec, **override):  # type: ignore[no-untyped-def]
    tensors = {"features": torch.randn(3, 32), "labels": torch.tensor([0, 1, 0])}
    tensors.update(override)
    from fl_core.features import SPEC_HASH_KEY

    return serialization.dumps(tensors, {SPEC_HASH_KEY: spec.spec_hash()})


def test_validation_refuses_bad_uploads() -> None:
    _, spec = _spec()
    ok = _rebuild(spec)
    assert validate_upload_header(ok, spec, 10) == 3
    _, other = _spec(PrivacyConfig(dtype="float16"))
    with pytest.raises(InvalidInput, match="spec hash does not match"):
        unpack_features(_rebuild(other), spec, 10)
    with pytest.raises(InvalidInput, match="shape"):
        unpack_features(_rebuild(spec, features=torch.randn(3, 31)), spec, 10)
    with pytest.raises(InvalidInput, match="dtype F64"):
        unpack_features(_rebuild(spec, features=torch.randn(3, 32).double()), spec, 10)
    nan = torch.randn(3, 32)
    nan[1, 2] = float("nan")
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        unpack_features(_rebuild(spec, features=nan), spec, 10)
    with pytest.raises(InvalidInput, match=r"labels must lie in \[0, 1\]"):
        unpack_features(_rebuild(spec, labels=torch.tensor([0, 2, 0])), spec, 10)
    with pytest.raises(InvalidInput, match="int64"):
        unpack_features(_rebuild(spec, labels=torch.tensor([0, 1, 0], dtype=torch.int32)), spec, 10)
    with pytest.raises(InvalidInput, match="limit is 2"):
        unpack_features(ok, spec, 2)
    with pytest.raises(InvalidInput, match="exactly the tensors"):
        unpack_features(_rebuild(spec, extra=torch.ones(1)), spec, 10)
    with pytest.raises(NotSafetensors):
        unpack_features(b"not a safetensors body", spec, 10)


def test_pack_refuses_rows_of_the_wrong_shape() -> None:
    _, spec = _spec()
    with pytest.raises(InvalidInput, match="spec says"):
        pack_features(torch.randn(2, 5), torch.zeros(2).long(), spec, "e")


def test_model_stays_trainable_after_extraction() -> None:
    from fl_core.training import UpperTrainConfig, train_upper

    model, _ = _spec()
    feats, labels = extract_features(model, iter([(torch.rand(8, 3, 32, 32), torch.arange(8) % 2)]))
    # extraction runs under inference mode: it must leave no parameter frozen, and its
    # features must feed training
    assert all(p.requires_grad for p in model.parameters())
    before = [p.detach().clone() for p in model.head.parameters()]
    train_upper(model, feats, labels, UpperTrainConfig(epochs=1, val_fraction=0))
    after = [p.detach() for p in model.head.parameters()]
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
