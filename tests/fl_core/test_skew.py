"""Label skew on shipped data: the server's model from the default privacy mode, set to
each edge's class frequencies, is never worse than always answering that edge's
majority class, and costs little against raw feature rows.

Real images (elpv, and NEU-DET relabelled to two classes when it is present), real
ImageNet features at a small input size, Dirichlet label skew over three edges, every
upload packed, validated and decoded as on the wire.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_core.data import (
    ImageSet,
    dirichlet_indices,
    load_dataset_spec,
    load_image_folder,
    stratified_indices,
)
from fl_core.features import extract_images, make_spec
from fl_core.model import build_split_model
from fl_core.privacy import pack_upload, training_rows, unpack_upload
from fl_core.schemas import PrivacyConfig
from fl_core.training import UpperTrainConfig, evaluate_features, train_upper

NEU_DET = Path(__file__).resolve().parents[3] / "shared" / "data" / "neu-det"
EDGES = 3


def _neu_two_classes() -> ImageSet:
    if not NEU_DET.is_dir():
        pytest.skip(f"NEU-DET is not at {NEU_DET} (it is not on users' machines)")
    ds = load_image_folder(NEU_DET)
    crazing = ds.class_names.index("crazing")
    idx, _ = stratified_indices(ds.labels, [600, len(ds) - 600], 0)
    ds = ds.subset(idx)
    records = [type(r)(r.path, int(r.label == crazing), r.attrs) for r in ds.records]
    return ImageSet(records, ["other", "crazing"], "neu-det:2")


def _features(ds: ImageSet) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    model = build_split_model(ds.class_names, input_size=96)
    f, y = extract_images(model, ds, 64)
    return f, y.long(), ds.class_names


@pytest.fixture(scope="module", params=["elpv", "neu-det"])
def features(request: pytest.FixtureRequest) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    if request.param == "elpv":
        return _features(load_dataset_spec("elpv:limit=600"))
    return _features(_neu_two_classes())


def _server_model(
    f: torch.Tensor, y: torch.Tensor, names: list[str], parts: list[np.ndarray], mode: str
) -> torch.nn.Module:
    model = build_split_model(names, input_size=96, pretrained=False)
    spec = make_spec(model, 1, "0" * 64, PrivacyConfig(mode=mode))  # type: ignore[arg-type]
    uploads = []
    for e, p in enumerate(parts):
        idx = torch.from_numpy(p)
        body = pack_upload(f[idx], y[idx], spec, f"edge-{e}", seed=e)
        uploads.append(unpack_upload(body, spec, 10**6))
    x, labels = training_rows(uploads, seed=0)
    train_upper(model, x, labels, UpperTrainConfig(epochs=40, seed=0))
    return model


@pytest.mark.slow
def test_server_model_for_each_skewed_edge_beats_its_majority(
    features: tuple[torch.Tensor, torch.Tensor, list[str]],
) -> None:
    f, y, names = features
    # each edge holds a skewed share of the data and keeps a quarter of it for testing
    shares = [np.array(p) for p in dirichlet_indices(y.numpy(), EDGES, alpha=0.5, seed=0)]
    train_parts, tests = [], []
    for share in shares:
        tr, te = stratified_indices(y[share].numpy(), [3, 1], 0)
        train_parts.append(share[tr])
        tests.append(share[te])
    stats_model = _server_model(f, y, names, train_parts, "stats")
    rows_model = _server_model(f, y, names, train_parts, "pooled")
    for part, test in zip(train_parts, tests, strict=True):
        if len(test) < 20:
            continue
        x_te, y_te = f[torch.from_numpy(test)], y[torch.from_numpy(test)]
        majority = float(np.bincount(y_te.numpy(), minlength=len(names)).max() / len(test))
        stats_model.set_class_prior(torch.bincount(y[torch.from_numpy(part)], minlength=2))
        acc = evaluate_features(stats_model, x_te, y_te).accuracy
        assert acc >= majority - 0.02, (acc, majority, len(test))
    # statistics cost little against raw rows, on the pooled test shares
    all_test = torch.from_numpy(np.concatenate(tests))
    pooled_prior = torch.bincount(y[torch.from_numpy(np.concatenate(train_parts))], minlength=2)
    stats_model.set_class_prior(pooled_prior)
    from_stats = evaluate_features(stats_model, f[all_test], y[all_test]).accuracy
    from_rows = evaluate_features(rows_model, f[all_test], y[all_test]).accuracy
    assert from_stats >= from_rows - 0.04, (from_stats, from_rows)
