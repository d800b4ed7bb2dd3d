"""bench.ingest's pieces that run without a server: the upload bodies it sends."""

from __future__ import annotations

import torch

from bench.ingest import _body, variant
from fl_core.features import unpack_features
from fl_core.schemas import FeatureSpec, PrivacyConfig

SPEC = FeatureSpec(
    backbone="tiny_cnn",
    cut="pooled",
    input_size=32,
    feature_shape=[16],
    privacy=PrivacyConfig(mode="pooled", clip_norm=4.0, noise_sigma=0.5),
    class_names=["ok", "defect"],
    base_model_version=1,
    base_model_sha256="0" * 64,
)


def test_variants_are_distinct_uploads_the_server_accepts() -> None:
    body = _body(SPEC, "edge-1", rows=8, seed=3)
    bodies = [body, *(variant(body, i) for i in range(5))]
    assert len(set(bodies)) == len(bodies)
    original = unpack_features(body, SPEC, max_rows=100)
    for other in bodies[1:]:
        batch = unpack_features(other, SPEC, max_rows=100)  # raises if refused
        assert torch.equal(batch.labels, original.labels)
        assert torch.equal(batch.features[1:], original.features[1:])
        assert batch.features.norm(dim=1)[0] <= original.features.norm(dim=1)[0]
