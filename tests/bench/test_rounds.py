"""bench.rounds: every recipe is a valid setting of the started server, and the summary
is the median over the seeds of what each run deployed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import rounds
from fedinspect.demo import DemoOptions, plan_demo


@pytest.mark.parametrize("recipe", list(rounds.RECIPES))
def test_each_recipe_is_a_setting_the_services_take(recipe: str) -> None:
    _, values = rounds.RECIPES[recipe]
    plan = plan_demo(DemoOptions(edges=3, settings=rounds.demo_settings(recipe)))
    plan.check_settings()  # raises SettingError on an unknown key or a refused value
    settings = plan.server_settings("a-token-of-the-right-length-0123", Path("/tmp/x"), 1)
    assert settings.rounds == int(values["ROUNDS"])
    edge = plan.placeholder_edge_settings(0)
    for key, value in rounds.EDGE_SETTINGS.get(recipe, {}).items():
        assert str(getattr(edge, key.lower())) == value
        if key.startswith("FINETUNE_"):  # the references train with the edges' recipe
            assert str(getattr(plan.finetune, key.removeprefix("FINETUNE_").lower())) == value


def _fake_demo(accuracies: list[float], rounds_seen: int) -> dict[str, Any]:
    def scores(a: float) -> dict[str, float]:
        return {"accuracy": a, "balanced_accuracy": a - 0.1, "macro_f1": a - 0.05}

    return {
        "edges": [
            {
                "federated": scores(a),
                "server_model": scores(a - 0.02),
                "rounds": [
                    {"test": scores(a - 0.01 * r), "bytes_uploaded": 100}
                    for r in range(rounds_seen)
                ],
            }
            for a in accuracies
        ],
        "bytes": {"uploaded": 1000, "downloaded": 3000, "raw_images": 10},
        "cycle": {"seconds": 12.5},
        "centralized": scores(0.9),
        "settings": {"set": {}},
    }


def test_runs_resume_and_summarise_as_medians(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, dict[str, str]]] = []
    by_seed = {0: [0.8, 0.9, 0.7], 1: [0.6, 0.6, 0.6], 2: [0.9, 0.9, 0.9]}

    def fake_run_demo(options: DemoOptions) -> dict[str, Any]:
        calls.append((options.seed, options.settings["server"]))
        n = int(options.settings["server"]["ROUNDS"])
        return _fake_demo(by_seed[options.seed], n)

    monkeypatch.setattr(rounds, "run_demo", fake_run_demo)
    rounds.run(tmp_path, [0, 1], ["r0", "r2"], 224, resume=False)
    results = rounds.run(tmp_path, [0, 1, 2], ["r0", "r2"], 224, resume=True)
    # the second call ran only seed 2
    assert [seed for seed, _ in calls] == [0, 0, 1, 1, 2, 2]
    r2 = results["summary"]["r2"]
    assert r2["seeds"] == [0, 1, 2]
    assert r2["accuracy"]["median"] == pytest.approx(0.8)  # means 0.8, 0.6, 0.9
    assert r2["accuracy"]["min"] == pytest.approx(0.6)
    assert len(next(r for r in results["runs"] if r["recipe"] == "r2")["rounds"]) == 2
    page = (tmp_path / "results.md").read_text()
    assert "| r0: one-shot cycle (R = 0) | 0,1,2 | 80.0 (60.0-90.0)" in page
