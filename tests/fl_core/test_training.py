"""train_upper, finetune and evaluate on tiny data."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_core.data import batches, load_image_folder, split, symmetric_view
from fl_core.model import build_split_model
from fl_core.onnx_runtime import onnx_runner, torch_runner
from fl_core.training import (
    FinetuneConfig,
    UpperTrainConfig,
    class_weights,
    evaluate,
    evaluate_activations,
    evaluate_features,
    finetune,
    finetune_start,
    frozen_activations,
    train_activations,
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
    cfg = FinetuneConfig(epochs=15, lr=1e-2, train_from="b1", views=2, select="val_loss", seed=0)
    report = finetune(model, parts.train, parts.val, cfg)
    # the frozen stem saw each training image once per view and each val image once
    assert calls["n"] == 2 * len(parts.train) + len(parts.val)
    after = evaluate(model, parts.test)
    assert after.accuracy >= 0.9 > before.accuracy or after.accuracy > before.accuracy
    assert report.epochs_run >= 1 and report.metrics is not None


def test_the_first_views_are_the_symmetries_of_each_image_decoded_once(tmp_path: Path) -> None:
    ds = load_image_folder(make_image_folder(tmp_path, per_class=6, size=32))
    model = build_split_model(ds.class_names, "tiny_cnn", input_size=32, pretrained=False)
    start = finetune_start(model, "b1")
    acts = frozen_activations(model, ds, start, batch_size=64, views=4)
    assert len(acts.x) == 4 * len(ds)
    x, y = next(batches(ds, 32, 64))
    with torch.inference_mode():
        for view in range(4):  # one batch: its rows come view by view
            want = model.run_stages(model.normalize(symmetric_view(x, view)), 0, start)
            got = acts.x[view * len(x) : (view + 1) * len(x)]
            torch.testing.assert_close(got, want)
            assert torch.equal(acts.labels[view * len(x) : (view + 1) * len(x)], y)


def test_a_fixed_schedule_never_runs_the_validation_split(tmp_path: Path) -> None:
    parts, model = _tiny_task(tmp_path)
    seen = {"n": 0}
    model.stages[0].register_forward_pre_hook(
        lambda _m, i: seen.__setitem__("n", seen["n"] + i[0].shape[0])
    )
    cfg = FinetuneConfig(epochs=2, lr=1e-2, views=2, select="last", seed=0)
    report = finetune(model, parts.train, parts.val, cfg)
    assert seen["n"] == 2 * len(parts.train)  # no validation image went through
    assert (report.epochs_run, report.best_epoch, report.rows_val) == (2, 2, 0)


def _tiny_task(tmp_path: Path):  # type: ignore[no-untyped-def]
    ds = load_image_folder(make_image_folder(tmp_path, per_class=24, size=32))
    parts = split(ds, 0.15, 0.25, seed=0)
    model = build_split_model(ds.class_names, "tiny_cnn", input_size=32, pretrained=False)
    return parts, model


def test_finetune_runs_its_frozen_stages_on_the_given_runner(tmp_path: Path) -> None:
    parts, model = _tiny_task(tmp_path)
    twin = copy.deepcopy(model)
    cfg = FinetuneConfig(epochs=3, lr=1e-2, views=2, seed=0)  # from b1: stem and b0 frozen
    start = finetune_start(model, cfg.train_from)
    assert start == model.stage_index("b1") == 2
    runner = onnx_runner(model, end=start)
    calls = {"n": 0}
    model.stages[0].register_forward_pre_hook(lambda _m, _i: calls.__setitem__("n", 1))
    finetune(model, parts.train, None, cfg, frozen=runner)
    assert calls["n"] == 0  # torch never ran the frozen stem: ONNX Runtime did
    finetune(twin, parts.train, None, cfg)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=name)


def test_finetune_on_cached_views_trains_as_if_it_had_made_them(tmp_path: Path) -> None:
    """Stage 3 after rounds reuses the rounds' cache: the same model comes out, and the
    frozen stages see no training image."""
    parts, model = _tiny_task(tmp_path)
    twin = copy.deepcopy(model)
    cfg = FinetuneConfig(epochs=3, lr=1e-2, views=4, select="val_loss", seed=0)
    _, x, y = train_activations(model, parts.train, cfg)
    seen = {"n": 0}
    model.stages[0].register_forward_pre_hook(
        lambda _m, i: seen.__setitem__("n", seen["n"] + i[0].shape[0])
    )
    finetune(model, parts.train, parts.val, cfg, cached=(x, y))
    assert seen["n"] == len(parts.val)  # only the validation split ran the frozen stages
    finetune(twin, parts.train, parts.val, cfg)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="not 2 views of"):
        finetune(model, parts.train, None, replace(cfg, views=2), cached=(x, y))


def test_finetune_refuses_a_runner_that_stops_elsewhere(tmp_path: Path) -> None:
    parts, model = _tiny_task(tmp_path)
    with pytest.raises(ValueError, match="stops before stage 1, not 2"):
        finetune(
            model, parts.train, None, FinetuneConfig(epochs=1), frozen=onnx_runner(model, end=1)
        )


def test_models_sharing_frozen_weights_are_evaluated_from_one_pass(tmp_path: Path) -> None:
    parts, model = _tiny_task(tmp_path)
    start = finetune_start(model)
    acts = frozen_activations(model, parts.test, start, 8, torch_runner(model, end=start))
    assert len(acts.x) == len(parts.test) and acts.x.shape[1:] == (16, 8, 8)
    assert evaluate_activations(model, acts) == evaluate(model, parts.test)
    # fine-tuning from ``start`` leaves the frozen stages, and so the activations, valid
    finetune(model, parts.train, parts.val, FinetuneConfig(epochs=4, lr=1e-2, seed=0))
    assert acts.fits(model)
    assert evaluate_activations(model, acts) == evaluate(model, parts.test)
    # ONNX Runtime's pass gives the same predictions, through evaluate too
    ort = onnx_runner(model, end=start)
    torch.testing.assert_close(
        frozen_activations(model, parts.test, start, 8, ort).x, acts.x, atol=1e-5, rtol=1e-4
    )
    assert evaluate(model, parts.test, frozen=ort).accuracy == evaluate(model, parts.test).accuracy
    # a model with other frozen weights does not fit them
    other = build_split_model(
        model.class_names, "tiny_cnn", input_size=32, pretrained=False, seed=1
    )
    assert not acts.fits(other)
    with pytest.raises(ValueError, match="other weights below stage 2"):
        evaluate_activations(other, acts)
    with torch.no_grad():  # one batch-norm statistic moved is enough
        model.stages[1][1].running_mean.add_(0.5)
    assert not acts.fits(model)


def _skewed(n: int, minority: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that overlap almost entirely, the second one rare: no model separates
    them, so nothing beats answering the frequent class."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < minority).long()
    x = torch.randn(n, 32, generator=g) + y[:, None] * 0.15
    return x, y


def test_a_skewed_head_answers_for_its_data_not_for_balanced_classes() -> None:
    # the loss weighs classes equally (class_weights); without the logit adjustment for
    # the training data's prior such a model answers the rare class for about half of
    # the rows, far below always answering the frequent one
    x, y = _skewed(600, 0.1, 0)
    x_test, y_test = _skewed(2000, 0.1, 1)
    model = build_split_model(["common", "rare"], "tiny_cnn", pretrained=False)
    train_upper(model, x, y, UpperTrainConfig(epochs=30, seed=0))
    majority = float((y_test == 0).float().mean())
    assert evaluate_features(model, x_test, y_test).accuracy >= majority - 0.01
    model.set_class_prior(None)  # as it would answer for balanced classes
    assert evaluate_features(model, x_test, y_test).accuracy < majority - 0.1


def test_the_class_prior_travels_with_the_weights() -> None:
    from fl_core.model import model_from_bytes, model_to_bytes

    model = build_split_model(["a", "b", "c"], "tiny_cnn", pretrained=False)
    model.set_class_prior(torch.tensor([90, 9, 1]))
    again = model_from_bytes(model_to_bytes(model))
    assert torch.equal(again.logit_adjustment, model.logit_adjustment)
    adj = again.logit_adjustment
    assert adj[0] > adj[1] > adj[2] and abs(float(adj.sum())) < 1e-5
    # weights written before models carried a prior load as a uniform prior
    from fl_core import serialization

    tensors, meta = serialization.loads(model_to_bytes(model))
    del tensors["logit_adjustment"]
    old = model_from_bytes(serialization.dumps(tensors, meta))
    assert not old.logit_adjustment.any()
