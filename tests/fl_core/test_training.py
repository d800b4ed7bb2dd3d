"""train_upper, finetune and evaluate on tiny data."""

from __future__ import annotations

from pathlib import Path

import torch

from fl_core.data import load_image_folder, split
from fl_core.model import build_split_model
from fl_core.training import (
    FinetuneConfig,
    UpperTrainConfig,
    class_weights,
    evaluate,
    evaluate_features,
    finetune,
    train_upper,
)
from tests.factories import make_image_folder


def _separable(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.3).long()  # imbalanced on purpose
    x = torch.randn(n, 32, generator=g) + y[:, None] * 1.5
    return x, y


def test_class_weights_balance_classes() -> None:
    w = class_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 0.0]))


def test_train_upper_learns_and_is_deterministic() -> None:
    x, y = _separable()
    cfg = UpperTrainConfig(epochs=30, seed=1)
    m1 = build_split_model(["a", "b"], "tiny_cnn", pretrained=False)
    r1 = train_upper(m1, x, y, cfg)
    assert r1.metrics is not None and r1.metrics.accuracy > 0.85
    assert r1.rows_train + r1.rows_val == 200 and r1.rows_val == 30
    m2 = build_split_model(["a", "b"], "tiny_cnn", pretrained=False)
    train_upper(m2, x, y, cfg)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    xt, yt = _separable(seed=5)
    assert evaluate_features(m1, xt, yt).accuracy > 0.85


def test_train_upper_on_a_handful_of_rows_in_one_batch_per_epoch() -> None:
    x, y = _separable(n=12)
    for epochs in (1, 2, 10):
        model = build_split_model(["a", "b"], "tiny_cnn", pretrained=False)
        report = train_upper(model, x, y, UpperTrainConfig(epochs=epochs, batch_size=64))
        assert report.epochs_run >= 1


def test_train_upper_leaves_the_lower_part_alone() -> None:
    x, y = _separable()
    model = build_split_model(["a", "b"], "tiny_cnn", pretrained=False)
    before = [p.clone() for p in model.lower_parameters()]
    train_upper(model, x, y, UpperTrainConfig(epochs=3))
    assert all(torch.equal(a, b) for a, b in zip(before, model.lower_parameters(), strict=True))


def test_finetune_improves_and_runs_frozen_part_once_per_view(tmp_path: Path) -> None:
    ds = load_image_folder(make_image_folder(tmp_path, per_class=24, size=32))
    parts = split(ds, 0.15, 0.25, seed=0)
    model = build_split_model(ds.class_names, "tiny_cnn", input_size=32, pretrained=False)
    before = evaluate(model, parts.test)
    calls = {"n": 0}

    def count(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        calls["n"] += inputs[0].shape[0]

    model.stages[0].register_forward_pre_hook(count)
    cfg = FinetuneConfig(epochs=15, lr=1e-2, train_from="b1", views=2, seed=0)
    report = finetune(model, parts.train, parts.val, cfg)
    # the frozen stem saw each training image once per view and each val image once
    assert calls["n"] == 2 * len(parts.train) + len(parts.val)
    after = evaluate(model, parts.test)
    assert after.accuracy >= 0.9 > before.accuracy or after.accuracy > before.accuracy
    assert report.epochs_run >= 1 and report.metrics is not None
