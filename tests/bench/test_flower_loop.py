"""Flower's FedAvg loop for real (flwr's strategy, our frozen-part cache), on tiny data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import flower
from fedinspect.demo import DemoOptions, DemoPlan, plan_demo
from fl_core.model import SplitModel, build_split_model
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
    accuracy = flower._accuracy
    calls: list[int] = []

    def ctrl_c_in_round_2(module: Any, client: Any) -> float:
        calls.append(1)
        if len(calls) == 3:  # two clients a round: the first call of round 2
            raise KeyboardInterrupt
        return accuracy(module, client)

    monkeypatch.setattr(flower, "_accuracy", ctrl_c_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        flower._fedavg(plan, "b1", [(1, 1e-3)], 3, 0.0, name="imgs", scratch=scratch)
    state = scratch / "imgs-seed0-b1-1-lr0.001.safetensors"
    assert [p.name for p in scratch.iterdir()] == [state.name]  # round 1, kept whole
    first = capsys.readouterr().err.splitlines()
    assert len(first) == 1 and ": round 1/3" in first[0]
    round_1 = float(first[0].split("accuracy ")[1].split(" ")[0])

    monkeypatch.setattr(flower, "_accuracy", accuracy)
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
