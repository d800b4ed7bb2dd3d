"""The deploy gate: a trained model beats a random one; a worse candidate is rejected
and the reason is recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_service.services import cycle
from edge_service.services.context import EdgeContext
from edge_service.services.cycle import deploy_gate
from fl_core.data import ImageSet, load_dataset_spec, split
from fl_core.metrics import compute_metrics
from fl_core.model import SplitModel
from fl_core.schemas import EvalMetrics
from fl_core.training import (
    FinetuneConfig,
    evaluate,
    finetune,
    finetune_start,
    frozen_activations,
)
from tests.edge_service.conftest import AUTH, EdgeFactory, TestClient, tiny_model
from tests.edge_service.fakes import FakeServer


def _metrics(accuracy: float) -> EvalMetrics:
    n = 100
    right = round(accuracy * n)
    y_true = [0] * n
    y_pred = [0] * right + [1] * (n - right)
    return compute_metrics(np.array(y_true), np.array(y_pred), ["a", "b"])


def test_gate_rules() -> None:
    assert deploy_gate(_metrics(0.6), None, 0.0).deploy
    assert deploy_gate(_metrics(0.8), _metrics(0.8), 0.0).deploy
    worse = deploy_gate(_metrics(0.7), _metrics(0.8), 0.0)
    assert not worse.deploy and worse.reason.startswith("rejected: candidate accuracy 0.7000")
    assert deploy_gate(_metrics(0.75), _metrics(0.8), 0.05).deploy


@pytest.fixture(scope="module")
def trained_model(image_folder: Path) -> SplitModel:
    splits = split(load_dataset_spec(str(image_folder)), 0.1, 0.25, 0)
    model = tiny_model(3)
    finetune(
        model,
        splits.train,
        splits.val,
        FinetuneConfig(epochs=15, batch_size=8, lr=1e-2, train_from="stem", augment=False),
    )
    return model


def test_trained_candidate_replaces_a_random_model(
    edge: TestClient, trained_model: SplitModel
) -> None:
    ctx: EdgeContext = edge.app.state.ctx  # type: ignore[attr-defined]
    test = ctx.data.splits().test
    first = ctx.cycles.gate_and_register(tiny_model(5), 1, test)
    assert first.deployed and first.previous is None
    second = ctx.cycles.gate_and_register(trained_model, 2, test)
    assert second.candidate.accuracy > first.candidate.accuracy
    assert second.deployed and second.previous is not None
    assert ctx.registry.deployed() == second.local_model.model_copy(update={"active": True})


def test_worse_candidate_is_rejected_with_a_reason(
    edge: TestClient, trained_model: SplitModel
) -> None:
    ctx: EdgeContext = edge.app.state.ctx  # type: ignore[attr-defined]
    test = ctx.data.splits().test
    good = ctx.cycles.gate_and_register(trained_model, 2, test)
    assert good.deployed and good.candidate.accuracy >= 0.9
    bad = ctx.cycles.gate_and_register(tiny_model(5), 3, test)
    assert not bad.deployed
    assert bad.decision.startswith("rejected: candidate accuracy")
    assert bad.previous is not None and bad.previous.accuracy == good.candidate.accuracy

    deployed = edge.get("/v1/status", headers=AUTH).json()["deployed_model"]
    assert deployed["id"] == good.local_model.id
    models = {m["id"]: m for m in edge.get("/v1/models", headers=AUTH).json()}
    assert models[bad.local_model.id]["active"] is False
    assert models[bad.local_model.id]["note"].startswith("rejected:")
    evaluation = edge.get("/v1/evaluation", headers=AUTH).json()
    assert evaluation["deployed"]["id"] == good.local_model.id
    assert evaluation["decision"].startswith("rejected: candidate accuracy")
    assert f"model {bad.local_model.id}" in evaluation["decision"]


def test_min_delta_lets_a_slightly_worse_candidate_through(
    make_edge: EdgeFactory, fake_server: FakeServer, trained_model: SplitModel
) -> None:
    edge = make_edge(fake_server.client(), deploy_min_delta=1.0)
    ctx: EdgeContext = edge.app.state.ctx  # type: ignore[attr-defined]
    test = ctx.data.splits().test
    ctx.cycles.gate_and_register(trained_model, 2, test)
    assert ctx.cycles.gate_and_register(tiny_model(5), 3, test).deployed


def test_gate_reuses_test_activations_only_for_models_they_fit(
    edge: TestClient, trained_model: SplitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx: EdgeContext = edge.app.state.ctx  # type: ignore[attr-defined]
    test = ctx.data.splits().test
    good = ctx.cycles.gate_and_register(trained_model, 2, test)
    candidate = tiny_model(5)  # its stem and b0 differ from the deployed model's
    acts = frozen_activations(candidate, test, finetune_start(candidate))
    full_passes: list[SplitModel] = []

    def counting(model: SplitModel, images: ImageSet, batch_size: int = 64) -> EvalMetrics:
        full_passes.append(model)
        return evaluate(model, images, batch_size)

    monkeypatch.setattr(cycle, "evaluate", counting)
    outcome = ctx.cycles.gate_and_register(candidate, 3, test, test_acts=acts)
    # the candidate from the activations, the deployed model (other frozen weights) in full
    assert [m.class_names for m in full_passes] == [trained_model.class_names]
    assert full_passes[0] is not candidate
    assert outcome.candidate == evaluate(candidate, test)
    assert outcome.previous is not None and outcome.previous.accuracy == good.candidate.accuracy
