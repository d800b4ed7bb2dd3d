"""The deploy gate: the best of the fine-tuned candidate, the server's model and the
deployed model on the validation split, never below always answering the majority
class; the reason is recorded where an operator reads it."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edge_service.services import cycle
from edge_service.services.context import EdgeContext
from edge_service.services.gate import (
    MajorityBaseline,
    ModelName,
    choose_model,
    majority_baseline,
)
from fl_core.data import ImageSet, load_dataset_spec, split
from fl_core.model import SplitModel
from fl_core.schemas import EvalMetrics
from fl_core.training import (
    FinetuneConfig,
    evaluate,
    finetune,
    finetune_start,
    frozen_activations,
)
from tests.edge_service.conftest import (
    AUTH,
    EdgeFactory,
    TestClient,
    answer_always,
    answering,
    deploy_model,
    tiny_model,
    wait_job,
)
from tests.edge_service.fakes import FakeServer
from tests.factories import make_image_folder

BRIGHT, DARK = 0, 1  # indices in CLASSES


def _m(accuracy: float, balanced: float | None = None, n: int = 50) -> EvalMetrics:
    return EvalMetrics(
        n=n,
        accuracy=accuracy,
        balanced_accuracy=accuracy if balanced is None else balanced,
        macro_f1=0.0,
        per_class=[],
        confusion_matrix=[],
    )


def _ctx(client: TestClient) -> EdgeContext:
    ctx: EdgeContext = client.app.state.ctx  # type: ignore[attr-defined]
    return ctx


GOOD = MajorityBaseline(0, "functional", 0.5, 50)


# --------------------------------------------------------------------------- the rule


def test_the_best_of_three_on_validation_is_chosen() -> None:
    scores: dict[ModelName, EvalMetrics] = {
        "candidate": _m(0.8),
        "server_model": _m(0.9),
        "previous": _m(0.85),
    }
    choice = choose_model(scores, GOOD, deployed_id=3)
    assert choice.chosen == "server_model" and choice.deploy
    assert choice.reason == (
        "deployed the server model: validation accuracy 90.0% on 50 images, best of "
        "fine-tuned 80.0%, server model 90.0%, previously deployed 85.0%; always answering "
        "'functional' scores 50.0%"
    )
    best = choose_model({"candidate": _m(0.931), "server_model": _m(0.914)}, GOOD)
    assert best.chosen == "candidate" and best.deploy
    assert best.reason.startswith("deployed the fine-tuned model: validation accuracy 93.1%")
    kept = choose_model({"candidate": _m(0.7), "previous": _m(0.8)}, GOOD, deployed_id=3)
    assert kept.chosen == "previous" and not kept.deploy
    assert kept.reason.startswith("kept model 3: validation accuracy 80.0% on 50 images")


def test_ties_go_to_balanced_accuracy_then_the_deployed_then_the_fine_tuned_model() -> None:
    by_balanced = choose_model(
        {"candidate": _m(0.8, 0.75), "server_model": _m(0.8, 0.7), "previous": _m(0.8, 0.6)},
        GOOD,
    )
    assert by_balanced.chosen == "candidate"
    full_tie: dict[ModelName, EvalMetrics] = {
        "candidate": _m(0.8),
        "server_model": _m(0.8),
        "previous": _m(0.8),
    }
    no_churn = choose_model(full_tie, GOOD, deployed_id=3)
    assert no_churn.chosen == "previous" and not no_churn.deploy
    del full_tie["previous"]
    assert choose_model(full_tie, GOOD).chosen == "candidate"


def test_min_delta_lets_a_new_model_replace_a_slightly_better_deployed_one() -> None:
    within = choose_model({"candidate": _m(0.76), "previous": _m(0.8)}, GOOD, 0.05, deployed_id=3)
    assert within.chosen == "candidate" and within.deploy
    assert within.reason.endswith("(deploy_min_delta 0.05 lets it replace model 3)")
    beyond = choose_model({"candidate": _m(0.74), "previous": _m(0.8)}, GOOD, 0.05, deployed_id=3)
    assert beyond.chosen == "previous" and not beyond.deploy
    # at exactly delta below, the tie rules decide: balanced accuracy, then no churn
    boundary: dict[ModelName, EvalMetrics] = {"candidate": _m(0.75, 0.7), "previous": _m(0.8, 0.7)}
    assert choose_model(boundary, GOOD, 0.05).chosen == "previous"
    boundary["candidate"] = _m(0.75, 0.71)
    assert choose_model(boundary, GOOD, 0.05).chosen == "candidate"


def test_no_model_below_the_majority_class_is_deployed() -> None:
    skewed = MajorityBaseline(0, "functional", 0.94, 50)
    scores: dict[ModelName, EvalMetrics] = {"candidate": _m(0.075), "server_model": _m(0.405)}
    none = choose_model(scores, skewed)
    assert none.chosen is None and not none.deploy
    assert none.reason == (
        "nothing deployed: no model did as well as always answering 'functional' (94.0% of "
        "50 validation images); best was the server model at 40.5% (fine-tuned 7.5%, "
        "server model 40.5%)"
    )
    assert "deployed: no model was deployed" not in none.reason
    kept = choose_model({**scores, "previous": _m(0.3)}, skewed, deployed_id=3)
    assert kept.chosen == "previous" and not kept.deploy
    assert kept.reason.startswith(
        "kept model 3: no model did as well as always answering 'functional' (94.0% of 50 "
        "validation images); best was the server model at 40.5%"
    )
    worst = choose_model({"candidate": _m(0.2), "previous": _m(0.3)}, skewed, deployed_id=3)
    assert "; best was model 3 at 30.0% (fine-tuned 20.0%, previously deployed 30.0%)" in (
        worst.reason
    )
    # a model of a task whose classes changed was not scored, and stays all the same
    assert choose_model(scores, skewed, deployed_id=3).reason.startswith("kept model 3: no model")
    # a new model winning by delta but below the floor does not oust a deployed one above it
    above = choose_model({"candidate": _m(0.93), "previous": _m(0.95)}, skewed, 0.05, deployed_id=3)
    assert above.chosen == "previous" and not above.deploy
    # equal to the majority class is not worse than it
    assert choose_model({"candidate": _m(0.94)}, skewed).deploy


def test_an_empty_validation_split_is_scored_in_sample() -> None:
    majority = MajorityBaseline(0, "functional", 0.6, 120)
    choice = choose_model({"candidate": _m(0.9, n=120)}, majority, in_sample=True)
    assert choice.chosen == "candidate"
    assert choice.reason.startswith(
        "deployed the fine-tuned model: in-sample accuracy 90.0% on 120 training images "
        "(the validation split is empty), best of fine-tuned 90.0%"
    )
    below = choose_model({"candidate": _m(0.5, n=120)}, majority, in_sample=True)
    assert "(60.0% of 120 training images, in-sample: the validation split is empty)" in (
        below.reason
    )


def test_the_majority_class_is_the_most_frequent_in_training() -> None:
    base = majority_baseline([0, 1, 1, 1], np.array([0, 0, 1, 0]), ["a", "b"])
    assert (base.class_index, base.class_name, base.accuracy, base.n) == (1, "b", 0.25, 4)
    assert majority_baseline([0, 1], [1], ["a", "b"]).class_name == "a"  # first on a tie
    assert majority_baseline([2, 2], [], ["a", "b", "c"]).accuracy == 0.0


# --------------------------------------------------------------------------- on an edge


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


@pytest.fixture(scope="module")
def skewed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A label-skewed edge: 45 'bright' and 5 'dark' images (90/10)."""
    root = make_image_folder(
        tmp_path_factory.mktemp("skewed"), per_class=45, size=32, classes=("dark", "bright")
    )
    for extra in sorted((root / "dark").iterdir())[5:]:
        extra.unlink()
    return root


def _skewed_edge(make_edge: EdgeFactory, server: FakeServer, folder: Path) -> TestClient:
    return make_edge(server.client(), dataset=folder, val_fraction=0.2, test_fraction=0.2)


def test_trained_candidate_replaces_a_worse_deployed_model(
    edge: TestClient, trained_model: SplitModel
) -> None:
    ctx = _ctx(edge)
    splits = ctx.data.splits()
    worse = deploy_model(ctx, answering(DARK))
    outcome = ctx.cycles.gate_and_register(trained_model, 2, splits)
    assert outcome.chosen == "candidate" and outcome.deployed
    assert outcome.previous_model_id == worse.id and outcome.previous is not None
    assert outcome.validation["candidate"].accuracy > outcome.validation["previous"].accuracy
    assert outcome.candidate.accuracy > outcome.previous.accuracy
    assert outcome.deployed_metrics == outcome.candidate
    assert ctx.registry.deployed() == outcome.local_model.model_copy(update={"active": True})
    assert outcome.serving_model == ctx.registry.deployed()


def test_worse_candidate_is_not_deployed_and_the_reason_is_shown(
    edge: TestClient, trained_model: SplitModel
) -> None:
    ctx = _ctx(edge)
    splits = ctx.data.splits()
    good = ctx.cycles.gate_and_register(trained_model, 2, splits)
    assert good.deployed and good.candidate.accuracy >= 0.9
    bad = ctx.cycles.gate_and_register(answering(DARK), 3, splits)
    assert not bad.deployed and bad.chosen == "previous"
    assert bad.decision.startswith(f"kept model {good.local_model.id}: validation accuracy")
    assert bad.previous is not None and bad.previous.accuracy == good.candidate.accuracy
    assert bad.deployed_metrics == bad.previous

    deployed = edge.get("/v1/status", headers=AUTH).json()["deployed_model"]
    assert deployed["id"] == good.local_model.id
    models = {m["id"]: m for m in edge.get("/v1/models", headers=AUTH).json()}
    assert models[bad.local_model.id]["active"] is False
    assert models[bad.local_model.id]["note"].startswith("not chosen: kept model")
    evaluation = edge.get("/v1/evaluation", headers=AUTH).json()
    assert evaluation["deployed"]["id"] == good.local_model.id
    assert evaluation["decision"] == bad.decision
    assert f"recorded as model {bad.local_model.id}" in evaluation["decision"]
    assert evaluation["chosen"] == "previous"
    assert evaluation["candidate_model_id"] == bad.local_model.id
    assert set(evaluation["validation_accuracy"]) == {"candidate", "previous"}


def test_server_model_beating_the_candidate_is_deployed(
    edge: TestClient, trained_model: SplitModel
) -> None:
    ctx = _ctx(edge)
    splits = ctx.data.splits()
    outcome = ctx.cycles.gate_and_register(answering(DARK), 2, splits, server_model=trained_model)
    assert outcome.chosen == "server_model" and outcome.deployed
    val = outcome.validation
    assert val["server_model"].accuracy > val["candidate"].accuracy
    assert outcome.deployed_metrics == outcome.server_model == evaluate(trained_model, splits.test)
    served = outcome.serving_model
    assert served is not None and served.id != outcome.local_model.id
    assert served.source == "base" and served.base_version == 2 and served.active
    assert not outcome.local_model.active  # the fine-tuned one is kept for an operator

    evaluation = edge.get("/v1/evaluation", headers=AUTH).json()
    assert evaluation["deployed"]["id"] == served.id
    assert evaluation["decision"].startswith("deployed the server model: validation accuracy")
    assert (
        f"(server model 2 recorded as model {served.id}, the fine-tuned one as model "
        f"{outcome.local_model.id})" in evaluation["decision"]
    )
    assert evaluation["chosen"] == "server_model"
    assert evaluation["validation_accuracy"] == {
        "candidate": val["candidate"].accuracy,
        "server_model": val["server_model"].accuracy,
    }
    predicted = edge.post("/v1/predict", headers=AUTH, files={"files": ("x.png", _png())})
    assert predicted.json()["model_id"] == served.id


def test_nothing_below_the_majority_class_is_deployed_and_the_reason_is_shown(
    make_edge: EdgeFactory, fake_server: FakeServer, skewed_folder: Path
) -> None:
    edge = _skewed_edge(make_edge, fake_server, skewed_folder)
    ctx = _ctx(edge)
    splits = ctx.data.splits()
    assert splits.val.counts() == {"bright": 9, "dark": 1}
    first = ctx.cycles.gate_and_register(
        answering(DARK, 5), 2, splits, server_model=answering(DARK, 6)
    )
    assert not first.deployed and first.chosen is None and first.serving_model is None
    assert first.majority.class_name == "bright" and first.majority.accuracy == 0.9
    assert ctx.registry.deployed() is None
    evaluation = edge.get("/v1/evaluation", headers=AUTH).json()
    assert evaluation["deployed"] is None
    assert evaluation["decision"].startswith(
        "nothing deployed: no model did as well as always answering 'bright' (90.0% of 10 "
        "validation images); best was the fine-tuned model at 10.0%"
    )
    assert "deployed: no model was deployed" not in evaluation["decision"]
    assert {k: evaluation[k] for k in _GATE_FIELDS} == {
        "chosen": None,
        "scored_on": "validation",
        "n_scored": 10,
        "validation_accuracy": {"candidate": 0.1, "server_model": 0.1},
        "majority_class": "bright",
        "majority_accuracy": 0.9,
        "candidate_model_id": first.local_model.id,
    }

    # a model that already serves stays, though it too is below the majority class
    serving = deploy_model(ctx, answering(DARK, 7))
    second = ctx.cycles.gate_and_register(
        answering(DARK, 8), 3, splits, server_model=answering(DARK, 9)
    )
    assert not second.deployed and second.chosen == "previous"
    evaluation = edge.get("/v1/evaluation", headers=AUTH).json()
    assert evaluation["deployed"]["id"] == serving.id
    assert evaluation["decision"].startswith(
        f"kept model {serving.id}: no model did as well as always answering 'bright' (90.0% "
        "of 10 validation images)"
    )


def test_skewed_edge_deploys_no_worse_than_the_majority_class(
    make_edge: EdgeFactory,
    skewed_folder: Path,
    trained_model: SplitModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The elpv story: fine-tuning on a 90/10 edge yields a model that answers the rare
    class; the server's model (good) must serve instead, and the job says so."""
    server = FakeServer(base_model=tiny_model(0), new_model=trained_model)
    edge = _skewed_edge(make_edge, server, skewed_folder)
    real_finetune = cycle.finetune

    def gone_wrong(model: SplitModel, *args: Any, **kwargs: Any) -> Any:
        report = real_finetune(model, *args, **kwargs)
        answer_always(model, DARK)  # in place, as fine-tuning works
        return report

    full_passes: list[int] = []

    def counting(model: SplitModel, images: ImageSet, batch_size: int = 64) -> EvalMetrics:
        full_passes.append(len(images))
        return evaluate(model, images, batch_size)

    monkeypatch.setattr(cycle, "finetune", gone_wrong)
    monkeypatch.setattr(cycle, "evaluate", counting)
    done = wait_job(edge, edge.post("/v1/jobs/finetune", headers=AUTH).json()["id"])
    assert done["state"] == "done", done["error"]
    # both models scored from one pass of the frozen stages over each split
    assert full_passes == []
    result = done["result"]
    majority = result["majority"]
    assert majority == {
        "class_name": "bright",
        "validation_accuracy": 0.9,
        "test_accuracy": 0.9,
        "n_scored": 10,
        "scored_on": "validation",
    }
    val = result["metrics"]["validation"]
    assert val["candidate"]["accuracy"] < majority["validation_accuracy"]  # the old gate's pick
    assert result["chosen"] == "server_model" and result["deployed"] is True
    assert val[result["chosen"]]["accuracy"] >= majority["validation_accuracy"]
    assert result["metrics"]["deployed"] == result["metrics"]["server_model"]
    assert result["metrics"]["deployed"]["accuracy"] >= majority["test_accuracy"]
    models = {m["id"]: m for m in edge.get("/v1/models", headers=AUTH).json()}
    served = models[result["deployed_model_id"]]
    assert served["active"] and served["source"] == "base" and served["base_version"] == 2
    assert not models[result["local_model_id"]]["active"]


def test_empty_validation_split_is_scored_in_sample(
    make_edge: EdgeFactory, fake_server: FakeServer, trained_model: SplitModel
) -> None:
    edge = make_edge(fake_server.client(), val_fraction=0.0)
    ctx = _ctx(edge)
    splits = ctx.data.splits()
    assert not len(splits.val)
    outcome = ctx.cycles.gate_and_register(trained_model, 2, splits, server_model=answering(DARK))
    assert outcome.in_sample and outcome.chosen == "candidate"
    assert outcome.validation["candidate"].n == len(splits.train)
    evaluation = edge.get("/v1/evaluation", headers=AUTH).json()
    assert evaluation["scored_on"] == "train" and evaluation["n_scored"] == len(splits.train)
    assert "in-sample" in evaluation["decision"]


def test_min_delta_lets_a_slightly_worse_candidate_through(
    make_edge: EdgeFactory, fake_server: FakeServer, trained_model: SplitModel
) -> None:
    edge = make_edge(fake_server.client(), deploy_min_delta=1.0)
    ctx = _ctx(edge)
    splits = ctx.data.splits()
    assert ctx.cycles.gate_and_register(trained_model, 2, splits).deployed
    # no better than the majority class (answering it), but within delta of the deployed
    worse = ctx.cycles.gate_and_register(answering(BRIGHT), 3, splits)
    assert worse.deployed and worse.chosen == "candidate"
    assert "deploy_min_delta 1 lets it replace model" in worse.decision


def test_gate_reuses_activations_only_for_models_they_fit(
    edge: TestClient, trained_model: SplitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _ctx(edge)
    splits = ctx.data.splits()
    deploy_model(ctx, trained_model)
    candidate = tiny_model(5)  # its stem and b0 differ from the deployed model's
    server = copy.deepcopy(candidate)
    start = finetune_start(candidate, "b1")
    val_acts = frozen_activations(candidate, splits.val, start)
    test_acts = frozen_activations(candidate, splits.test, start)
    full_passes: list[tuple[SplitModel, int]] = []

    def counting(model: SplitModel, images: ImageSet, batch_size: int = 64) -> EvalMetrics:
        full_passes.append((model, len(images)))
        return evaluate(model, images, batch_size)

    monkeypatch.setattr(cycle, "evaluate", counting)
    outcome = ctx.cycles.gate_and_register(
        candidate, 3, splits, server_model=server, scored_acts=val_acts, test_acts=test_acts
    )
    # candidate and server model from the activations; the deployed model (other frozen
    # weights) in full, once on validation and once on test
    assert [n for _, n in full_passes] == [len(splits.val), len(splits.test)]
    assert all(m is not candidate and m is not server for m, _ in full_passes)
    assert outcome.validation["candidate"] == evaluate(candidate, splits.val)
    assert outcome.candidate == evaluate(candidate, splits.test)
    assert outcome.previous == evaluate(trained_model, splits.test)


_GATE_FIELDS = (
    "chosen",
    "scored_on",
    "n_scored",
    "validation_accuracy",
    "majority_class",
    "majority_accuracy",
    "candidate_model_id",
)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8), 200).save(out, format="PNG")
    return out.getvalue()
