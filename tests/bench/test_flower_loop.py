"""Flower's FedAvg loop for real (flwr's strategy, our frozen-part cache and our
fine-tuning recipe), on tiny data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import flower
from fedinspect.demo import DemoOptions, DemoPlan, plan_demo
from fl_core import training
from fl_core.model import SplitModel, build_split_model
from fl_core.training import FinetuneConfig, finetune_start
from tests.factories import make_image_folder


def _tiny_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DemoPlan:
    """Two edges of a small image folder at 32 px on an untrained tiny CNN."""
    root = make_image_folder(tmp_path / "imgs", per_class=30)
    plan = plan_demo(DemoOptions(edges=2, dataset=str(root), quick=True, input_size=32))

    def untrained(*args: Any, **kwargs: Any) -> SplitModel:
        return build_split_model(*args, **kwargs | {"pretrained": False})

    monkeypatch.setattr(flower, "build_split_model", untrained)
    return replace(plan, backbone="tiny_cnn")


def test_fedavg_trains_rounds_and_counts_what_flower_would_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _tiny_plan(tmp_path, monkeypatch)
    grid = [(1, 1e-3), (2, 1e-2)]
    best = flower._fedavg(plan, "b1", grid, max_rounds=2, target=0.0, name="imgs")

    assert (best["local_epochs"], best["lr"]) in grid
    assert best["rounds_run"] == 2 and best["rounds"] == best["best_round"] in (1, 2)
    assert best["rounds_to_reach_ours"] == 1  # any accuracy reaches a target of 0
    assert len(best["accuracy"]["per_edge"]) == 2
    assert 0.0 <= best["accuracy"]["mean"] <= 1.0
    # every round sends the parameters of b1 and the head down to and up from each client
    assert best["bytes_per_round"] == 2 * best["parameter_bytes"] * 2
    assert best["bytes"] == best["bytes_per_round"] * best["best_round"]
    assert best["trained_from"] == "b1"
    assert best["selection"] == "validation"
    assert len(best["history_val_mean"]) == len(best["history_mean"]) == 2
    for metric in ("balanced_accuracy", "macro_f1", "val_accuracy"):
        assert 0.0 <= best[metric]["mean"] <= 1.0
    peek = best["test_selected"]
    assert peek["accuracy"]["mean"] == max(
        p["test_selected"]["accuracy"]["mean"] for p in best["grid"]
    )
    assert peek["accuracy"]["mean"] >= best["accuracy"]["mean"]
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(": round")[0] for ln in lines] == [
        "[flower] imgs seed 0, b1, 1 epochs lr 0.001",
        "[flower] imgs seed 0, b1, 1 epochs lr 0.001",
        "[flower] imgs seed 0, b1, 2 epochs lr 0.01",
        "[flower] imgs seed 0, b1, 2 epochs lr 0.01",
    ]


def test_fedavg_keeps_finished_grid_points_and_trains_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _tiny_plan(tmp_path, monkeypatch)
    done: dict[str, Any] = {}
    saves: list[list[str]] = []

    def saved() -> None:
        saves.append(sorted(done))

    first = flower._fedavg(plan, "b1", [(1, 1e-3)], 1, 0.0, name="imgs", done=done, saved=saved)
    assert saves == [["1:0.001"]]  # saved as soon as the point finished
    kept = json.loads(json.dumps(done["1:0.001"]))
    capsys.readouterr()

    grid = [(1, 1e-3), (2, 1e-2)]
    best = flower._fedavg(plan, "b1", grid, 1, 0.0, name="imgs", done=done, saved=saved)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[flower] imgs seed 0, b1, 1 epochs lr 0.001: trained before, kept"
    assert [ln.split(": round")[0] for ln in lines[1:]] == [
        "[flower] imgs seed 0, b1, 2 epochs lr 0.01"
    ]
    assert saves[-1] == ["1:0.001", "2:0.01"]
    assert done["1:0.001"] == kept  # the stored point is not touched by the report
    assert [(p["local_epochs"], p["lr"]) for p in best["grid"]] == [(1, 1e-3), (2, 0.01)]
    assert best["grid"][0] == kept  # each point's own result, not only the winner's
    assert best["grid"][1] == done["2:0.01"]
    if (best["local_epochs"], best["lr"]) == (1, 1e-3):
        assert best["accuracy"] == first["accuracy"]

    def no_frozen_part(*args: Any) -> Any:
        raise AssertionError("every point was trained before: nothing to compute")

    monkeypatch.setattr(flower, "_clients", no_frozen_part)
    again = flower._fedavg(plan, "b1", grid, 1, 0.0, name="imgs", done=done, saved=saved)
    assert again["accuracy"] == best["accuracy"]


def test_an_interrupted_grid_point_goes_on_from_its_last_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _tiny_plan(tmp_path, monkeypatch)
    scratch = tmp_path / "running"
    evaluate = flower._evaluate
    calls: list[int] = []

    def ctrl_c_in_round_2(model: Any, clients: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # after the clients' training in round 2
            raise KeyboardInterrupt
        return evaluate(model, clients)

    monkeypatch.setattr(flower, "_evaluate", ctrl_c_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        flower._fedavg(plan, "b1", [(1, 1e-3)], 3, 0.0, name="imgs", scratch=scratch)
    state = scratch / "imgs-seed0-b1-1-lr0.001.safetensors"
    assert [p.name for p in scratch.iterdir()] == [state.name]  # round 1, kept whole
    first = capsys.readouterr().err.splitlines()
    assert len(first) == 1 and ": round 1/3" in first[0]
    round_1 = float(first[0].split(" test ")[1].split(" ")[0])

    monkeypatch.setattr(flower, "_evaluate", evaluate)
    done: dict[str, Any] = {}
    best = flower._fedavg(plan, "b1", [(1, 1e-3)], 3, 0.0, name="imgs", done=done, scratch=scratch)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[flower] imgs seed 0, b1, 1 epochs lr 0.001: resumed after round 1"
    assert [ln.split(" mean")[0].split(": ")[1] for ln in lines[1:]] == [
        "round 2/3,",
        "round 3/3,",
    ]
    assert best["rounds_run"] == 3
    assert best["history_mean"][0] == pytest.approx(round_1, abs=1e-4)
    assert not state.exists()  # finished: the point lives in ``done`` now
    assert done["1:0.001"]["rounds_run"] == 3


def test_points_of_the_earlier_protocol_are_trained_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resumed seed must not mix points chosen on test (trained on train+val by the
    old loop) with points chosen on validation."""
    plan = _tiny_plan(tmp_path, monkeypatch)
    old = {"accuracy": {"mean": 0.99}, "best_round": 1, "rounds_run": 1}  # no "selection"
    done: dict[str, Any] = {"1:0.001": old}
    best = flower._fedavg(plan, "b1", [(1, 1e-3)], 1, 0.0, name="imgs", done=done)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "[flower] imgs seed 0, b1, 1 epochs lr 0.001: trained by an earlier protocol or "
        "recipe, trained again"
    )
    assert done["1:0.001"]["selection"] == best["selection"] == "validation"


def test_points_of_another_recipe_are_trained_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A seed resumed after the fine-tuning recipe changed must not keep points (or a
    point in progress) that local training made with the old recipe."""
    plan = _tiny_plan(tmp_path, monkeypatch)
    scratch = tmp_path / "running"
    done: dict[str, Any] = {}
    flower._fedavg(plan, "b1", [(1, 1e-3)], 1, 0.0, name="imgs", done=done)
    assert done["1:0.001"]["recipe"] == flower.recipe_tag(plan, "b1")
    state = scratch / "imgs-seed0-b1-2-lr0.01.safetensors"
    progress = flower._Progress([np.zeros(1)], [{"round": 1}], 1.0, 1.0)
    flower._save_progress(state, progress, flower.recipe_tag(plan, "b1"))
    assert flower._load_progress(state, flower.recipe_tag(plan, "b1")) is not None
    capsys.readouterr()

    other = replace(plan, finetune=replace(plan.finetune, views=1))
    assert flower.recipe_tag(other, "b1") != flower.recipe_tag(plan, "b1")
    assert flower._load_progress(state, flower.recipe_tag(other, "b1")) is None
    flower._fedavg(other, "b1", [(1, 1e-3)], 1, 0.0, name="imgs", done=done)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("trained by an earlier protocol or recipe, trained again")
    assert done["1:0.001"]["recipe"] == flower.recipe_tag(other, "b1")


def test_each_client_trains_with_fl_core_finetune_activations_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local training is our recipe, called, on the client's train split alone (its
    validation split is kept apart for choosing the round)."""
    plan = _tiny_plan(tmp_path, monkeypatch)
    real = training.finetune_activations
    calls: list[dict[str, Any]] = []

    def spy(
        model: SplitModel, start: int, x: torch.Tensor, y: torch.Tensor, *args: Any, **kw: Any
    ) -> Any:
        calls.append({"model": model, "start": start, "rows": len(x), "args": args, **kw})
        return real(model, start, x, y, *args, **kw)

    monkeypatch.setattr(training, "finetune_activations", spy)
    best = flower._fedavg(plan, "b1", [(2, 1e-2)], max_rounds=3, target=None, name="imgs")

    assert best["rounds_run"] == 3
    assert len(calls) == 3 * 2  # every round, every client
    views = plan.finetune.views
    train_rows = [views * len(plan.split(spec).train) for spec in plan.edge_specs]
    assert [c["rows"] for c in calls] == train_rows * 3
    for c in calls:
        assert c["start"] == finetune_start(c["model"], "b1")
        assert c["args"] == () and "x_val" not in c  # no validation: exactly the epochs
        config: FinetuneConfig = c["config"]
        assert (config.epochs, config.lr, config.batch_size) == (2, 1e-2, plan.batch_size)
        assert config.backbone_lr_scale == plan.finetune.backbone_lr_scale


def test_what_clients_exchange_is_what_finetune_activations_changes() -> None:
    torch.manual_seed(0)
    model = build_split_model(["a", "b", "c"], "tiny_cnn", input_size=32, pretrained=False)
    start = finetune_start(model, "b1")
    keys = flower.exchanged_keys(model, start)
    assert "logit_adjustment" in keys  # set per client from its labels: averaged too
    assert not [k for k in keys if k.startswith(tuple(f"stages.{i}." for i in range(start)))]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        x = model.run_stages(model.normalize(torch.rand(12, 3, 32, 32)), 0, start)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    training.finetune_activations(model, start, x, y, config=FinetuneConfig(epochs=2, lr=1e-2))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "logit_adjustment" in changed and any(k.startswith("head.") for k in changed)
    assert set(changed) <= set(keys)
