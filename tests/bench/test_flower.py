"""``bench.flower``'s pure parts: summaries over seeds, the round and grid point chosen on
validation, the round loop's stop rule, and its resumable grid search (through
``bench.run`` with a faked Flower run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import demo_runs, flower
from bench import run as bench_run
from tests.bench.synthetic import (
    SEEDS,
    fake_flower_runs,
    fake_flower_seed,
    fake_old_flower_seed,
    fake_runs,
    recording_demos,
    results_dir_with_header,
)


def test_flower_summarize_takes_medians_over_seeds() -> None:
    s = flower.summarize(fake_flower_runs(), "flower")
    assert s["accuracy"]["mean"] == {"median": 0.7, "min": 0.6, "max": 0.8, "runs": 3}
    assert s["accuracy"]["per_edge"][0] == {"median": 0.8, "min": 0.7, "max": 0.9, "runs": 3}
    assert s["accuracy"]["per_edge"][1]["median"] == pytest.approx(0.6)
    assert len(s["accuracy"]["per_edge"]) == 2
    assert s["bytes"] == {"median": 5000, "min": 4000, "max": 6000, "runs": 3}
    assert s["seconds"]["edge_compute"] == {"median": 20.0, "min": 10.0, "max": 30.0, "runs": 3}
    assert s["seconds"]["wall"] == {"median": 40.0, "min": 20.0, "max": 60.0, "runs": 3}
    assert s["rounds"] == {"median": 5, "min": 4, "max": 6, "runs": 3}


def test_flower_summarize_keeps_per_seed_lists_in_seed_order() -> None:
    runs = fake_flower_runs()
    s = flower.summarize(runs, "flower")
    assert s["rounds_to_reach_ours"] == [2, None, 5]
    assert s["choice"] == [
        {"local_epochs": 3, "lr": pytest.approx(1e-3)},
        {"local_epochs": 3, "lr": pytest.approx(2e-3)},
        {"local_epochs": 3, "lr": pytest.approx(3e-3)},
    ]
    assert s["trained_from"] == "b11"  # the first seed's
    assert s["per_seed"] == [{**r["flower"], "seed": r["seed"]} for r in runs]


def test_flower_summarize_reads_only_the_named_configuration() -> None:
    head = flower.summarize(fake_flower_runs(), "flower_head")
    assert head["accuracy"]["mean"]["median"] == pytest.approx(0.5)
    assert head["rounds_to_reach_ours"] == [None, None, None]


def test_flower_summarize_says_how_the_round_was_chosen_and_shows_the_peek_apart() -> None:
    s = flower.summarize(fake_flower_runs(), "flower")
    assert s["selection"] == "validation"
    assert s["balanced_accuracy"]["mean"] == {"median": 0.6, "min": 0.5, "max": 0.7, "runs": 3}
    assert s["macro_f1"]["per_edge"][1]["median"] == pytest.approx(0.4)
    assert s["val_accuracy"]["mean"]["median"] == pytest.approx(0.75)
    # bytes and wall time are to the round chosen on validation (4, 5, 6), not the peek's
    assert s["bytes"]["median"] == 5000
    peek = s["test_selected"]
    assert "for reference only" in peek["note"]
    assert peek["accuracy"]["mean"]["median"] == pytest.approx(0.8)
    assert peek["rounds"] == [6, 7, 8]
    assert peek["choice"] == [{"local_epochs": 1, "lr": 1e-3}] * 3


def test_flower_summarize_of_the_earlier_protocol_says_it_chose_on_test() -> None:
    runs = [{"flower": fake_old_flower_seed(s, 0.7), "seed": s} for s in SEEDS]
    s = flower.summarize(runs, "flower")
    assert s["selection"] == "test"
    assert "test_selected" not in s and "balanced_accuracy" not in s
    runs[0]["flower"] = fake_flower_seed(0, 0.7, None)
    assert flower.summarize(runs, "flower")["selection"] == "mixed: test, validation"


def _round(rnd: int, val: float, test: float) -> dict[str, Any]:
    """One row of ``flower.rounds``'s history: two clients, the second without a
    validation split."""
    return {
        "round": rnd,
        "val": {
            "accuracy": [val, None],
            "balanced_accuracy": [val, None],
            "macro_f1": [val, None],
            "mean": val,
        },
        "test": {
            "accuracy": [test + 0.1, test - 0.1],
            "balanced_accuracy": [test, test - 0.2],
            "macro_f1": [test - 0.1, test - 0.1],
            "mean": test,
        },
    }


def test_flower_point_reports_the_test_scores_at_the_round_validation_chose() -> None:
    # validation peaks at round 2, test at round 3: round 2 is reported, 3 only as the peek
    history = [_round(1, 0.6, 0.9), _round(2, 0.8, 0.7), _round(3, 0.7, 0.95)]
    p = flower.point_result(3, 1e-3, history, 0.85, 250, 2, 30.0, 60.0, 5.0)
    assert p["selection"] == "validation"
    assert p["best_round"] == 2
    assert p["accuracy"] == {"per_edge": [0.8, 0.6], "mean": 0.7}
    assert p["balanced_accuracy"] == {"per_edge": [0.7, 0.5], "mean": 0.6}
    assert p["macro_f1"]["mean"] == pytest.approx(0.6)
    assert p["val_accuracy"] == {"per_edge": [0.8, None], "mean": 0.8}
    assert p["history_mean"] == [0.9, 0.7, 0.95]
    assert p["history_val_mean"] == [0.6, 0.8, 0.7]
    assert p["rounds_to_reach_ours"] == 1  # the test curve reaches 0.85 at round 1
    assert p["bytes_per_round"] == 2 * 250 * 2
    assert p["bytes"] == 1000 * 2  # to the chosen round
    # two of three rounds, plus the frozen part run once
    assert p["seconds"] == {
        "edge_compute_to_best": 25.0,
        "wall_to_best": 45.0,
        "frozen_part_once_s": 5.0,
    }
    assert p["test_selected"]["round"] == 3
    assert p["test_selected"]["accuracy"]["mean"] == 0.95
    assert p["test_selected"]["bytes"] == 3000


def test_flower_point_on_a_validation_tie_keeps_the_earlier_round() -> None:
    history = [_round(1, 0.5, 0.5), _round(2, 0.8, 0.6), _round(3, 0.8, 0.9)]
    assert flower.point_result(1, 1e-3, history, None, 1, 1, 1.0, 1.0, 0.0)["best_round"] == 2


def test_flower_grid_point_is_chosen_on_validation_not_test() -> None:
    peeks_well = flower.point_result(1, 1e-3, [_round(1, 0.6, 0.95)], None, 250, 2, 1.0, 1.0, 0.0)
    validates_well = flower.point_result(
        3, 1e-4, [_round(1, 0.8, 0.7)], None, 250, 2, 1.0, 1.0, 0.0
    )
    best = flower.choose_point([peeks_well, validates_well])
    assert (best["local_epochs"], best["lr"]) == (3, 1e-4)
    assert best["accuracy"]["mean"] == 0.7
    assert best["test_selected"]["local_epochs"] == 1  # the whole grid's peek
    assert best["test_selected"]["accuracy"]["mean"] == 0.95
    assert validates_well["test_selected"]["local_epochs"] == 3  # the stored point stays


def test_flower_rounds_stop_when_validation_stops_improving_whatever_test_does() -> None:
    val = [0.8, 0.7, 0.6, 0.5, 0.4]
    test = [0.5, 0.6, 0.7, 0.8, 0.9]

    def step(rnd: int) -> dict[str, Any]:
        row = _round(rnd, val[rnd - 1], test[rnd - 1])
        return {"val": row["val"], "test": row["test"]}

    history = flower.rounds(step, max_rounds=5, patience=2)
    assert [h["round"] for h in history] == [1, 2, 3]
    assert flower.select_round(history)["round"] == 1
    assert flower.select_round(history, "test")["round"] == 3
    # resumed after round 3: patience was spent at round 1, nothing more runs
    assert flower.rounds(step, 5, 2, history=history) == history


def test_ours_per_seed_keys_each_cycle_by_its_seed() -> None:
    ours = demo_runs.ours_per_seed(fake_runs())
    assert sorted(ours) == [0, 1, 2]
    assert ours[2] == {
        "mean": 0.4,  # (0.7 + 0.1) / 2
        "per_edge": [0.7, 0.1],
        "bytes": (1000 + 2) + (2000 + 2) + 2 * 5000,
        "wall": 20.0,
    }


def test_flower_same_seed_sets_each_seed_beside_our_cycle_on_that_seed() -> None:
    """Each seed draws its own splits, so Flower's seed s is compared with our seed s:
    not with the median over seeds, which on elpv lies 2.4 points from seed 1's cycle."""
    runs = fake_flower_runs()[:2]
    runs[0]["flower"] |= {"history_mean": [0.3, 0.85, 0.9, 0.9], "best_round": 3}
    runs[0]["flower"]["accuracy"]["mean"] = 0.9
    runs[0]["flower"]["seconds"] |= {"wall_to_best": 61.0, "frozen_part_once_s": 1.0}
    runs[0]["flower"] |= {"bytes": 3000, "bytes_per_round": 1000}
    ours = demo_runs.ours_per_seed(fake_runs())  # seed 0: mean 0.9, 12003 bytes, 30 s
    rows = flower.same_seed(runs, {0: ours[0]})  # no cycle for seed 1: left out
    assert [r["seed"] for r in rows] == [0]
    a = rows[0]["flower"]
    assert a["mean"] == 0.9 and a["points_above_ours"] == 0.0
    assert a["bytes_x_ours"] == round(3000 / 12003, 1)
    assert a["wall_x_ours"] == round(61.0 / 30.0, 2)
    # 0.85 at round 2 is under ours (0.9); round 3 is the first to reach it
    assert a["reaches_ours_at_round"] == 3
    assert a["to_reach_ours"] == {"bytes": 3000, "wall_s": 61.0}
    head = rows[0]["flower_head"]  # history [0.6], ours 0.9: never reached
    assert head["reaches_ours_at_round"] is None and head["to_reach_ours"] is None
    assert head["points_above_ours"] == -30.0


def test_flower_same_seed_costs_to_reach_ours_pro_rata_to_the_best_round() -> None:
    runs = fake_flower_runs()[:1]
    f = runs[0]["flower"]
    f |= {"history_mean": [0.95, 0.99, 0.97, 0.99], "best_round": 2, "bytes_per_round": 500}
    f["accuracy"]["mean"] = 0.99
    f["seconds"] |= {"wall_to_best": 25.0, "frozen_part_once_s": 5.0}
    ours = {0: {"mean": 0.95, "per_edge": [0.95], "bytes": 100, "wall": 50.0}}
    a = flower.same_seed(runs, ours)[0]["flower"]
    assert a["reaches_ours_at_round"] == 1  # a tie with ours counts as reaching it
    assert a["to_reach_ours"] == {"bytes": 500, "wall_s": 15.0}  # 5 s frozen + 20 s / 2


def _steps(means: list[float]) -> tuple[list[int], Any]:
    """Rounds whose mean validation accuracies are ``means``; their test means, 0.2
    below, are there to be recorded, not to steer."""
    called: list[int] = []

    def step(rnd: int) -> dict[str, Any]:
        called.append(rnd)
        m = means[rnd - 1]
        row = _round(rnd, m, m - 0.2)
        row["val"] |= {"accuracy": [m + 0.1, m - 0.1]}
        return {"val": row["val"], "test": row["test"]}

    return called, step


def test_rounds_stop_after_patience_rounds_without_a_better_mean() -> None:
    called, step = _steps([0.5, 0.7, 0.6, 0.7, 0.65, 0.9, 0.95])
    history = flower.rounds(step, max_rounds=7, patience=3)
    # best 0.7 at round 2; rounds 3, 4 (equal is not better), 5 bring nothing: stop
    assert called == [1, 2, 3, 4, 5]
    assert [h["round"] for h in history] == [1, 2, 3, 4, 5]
    assert history[1]["val"]["accuracy"] == [pytest.approx(0.8), pytest.approx(0.6)]
    assert history[1]["val"]["mean"] == pytest.approx(0.7)
    assert history[1]["test"]["mean"] == pytest.approx(0.5)


def test_rounds_without_patience_run_every_round() -> None:
    called, step = _steps([0.9, 0.1, 0.1, 0.1])
    assert len(flower.rounds(step, max_rounds=4, patience=None)) == 4
    assert called == [1, 2, 3, 4]


def test_rounds_print_a_line_per_round_when_labelled(capsys: pytest.CaptureFixture[str]) -> None:
    _, step = _steps([0.5, 0.75])
    flower.rounds(step, max_rounds=2, patience=None, label="neu-det seed 0, b11")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == [
        "[flower] neu-det seed 0, b11: round 1/2, mean accuracy validation 0.5000 test 0.3000",
        "[flower] neu-det seed 0, b11: round 2/2, mean accuracy validation 0.7500 test 0.5500",
    ]
    flower.rounds(step, max_rounds=1, patience=None)
    assert capsys.readouterr().err == ""


def test_rounds_keep_going_while_the_mean_improves() -> None:
    called, step = _steps([0.1, 0.2, 0.3, 0.4])
    flower.rounds(step, max_rounds=4, patience=1)
    assert called == [1, 2, 3, 4]


def test_rounds_go_on_from_a_stored_history_and_report_each_round() -> None:
    means = [0.5, 0.7, 0.6, 0.7, 0.65, 0.9, 0.95]
    called, step = _steps(means)
    stored = flower.rounds(step, max_rounds=2, patience=3)  # interrupted after round 2
    called.clear()
    seen: list[int] = []
    history = flower.rounds(
        step, max_rounds=7, patience=3, history=stored, after=lambda h: seen.append(len(h))
    )
    # the same stop as an uninterrupted run (best at round 2, stop after round 5)
    assert called == [3, 4, 5]
    assert [h["round"] for h in history] == [1, 2, 3, 4, 5]
    assert seen == [3, 4, 5]  # reported after every round, with the rounds so far


def test_rounds_run_nothing_when_the_stored_history_already_met_the_stop_rule() -> None:
    called, step = _steps([0.5, 0.7, 0.6, 0.6, 0.6, 0.9])
    stored = flower.rounds(step, max_rounds=6, patience=3)
    assert len(stored) == 5
    called.clear()
    assert flower.rounds(step, max_rounds=6, patience=3, history=stored) == stored
    assert called == []


def test_winners_are_each_configurations_chosen_point() -> None:
    seed0 = fake_flower_runs()[0]
    seed0["flower_head"] |= {"local_epochs": 1, "lr": 3e-3}
    assert flower.winners(seed0) == {"flower": [(3, 1e-3)], "flower_head": [(1, 3e-3)]}


@pytest.mark.usefixtures("no_heavy_work")
def test_full_flower_searches_the_grid_on_the_first_seed_only_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeds after the first get its winners; an interrupted run keeps finished seeds."""
    results_dir_with_header(tmp_path, monkeypatch, mode="full")
    recording_demos(monkeypatch)
    bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3)
    fl = {s: r for s, r in zip(SEEDS, fake_flower_runs(), strict=True)}
    asked: list[tuple[int, Any]] = []
    interrupt_on: list[int] = [2]  # Ctrl-C during seed 2, the first time

    def fake(quick: bool, ds: str, seed: int, target: float, grids: Any = None, *_: Any) -> Any:
        if seed in interrupt_on:
            asked.append((seed, "interrupted"))
            raise KeyboardInterrupt
        asked.append((seed, grids))
        return fl[seed]

    monkeypatch.setattr(flower, "run", fake)
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(False, tmp_path, only=["flower"])
    winner = flower.winners(fl[0])
    assert asked == [(0, None), (1, winner), (2, "interrupted")]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in saved["flower_runs"]["elpv"]] == [0, 1]
    assert saved["flower"]["rounds_to_reach_ours"] == [2, None]

    interrupt_on.clear()
    done = bench_run.run_bench(False, tmp_path, only=["flower"], resume=True)
    assert asked[-1] == (2, winner)  # only the missing seed, with seed 0's winners
    assert done["flower"]["rounds_to_reach_ours"] == [2, None, 5]
    assert [r["seed"] for r in done["flower_runs"]["elpv"]] == [0, 1, 2]


@pytest.mark.usefixtures("no_heavy_work")
def test_an_interrupted_flower_seed_resumes_from_its_last_finished_grid_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 0's grid takes hours at 300 px: each point it finishes is saved at once, and a
    resumed run hands the finished points back instead of training them again."""
    results_dir_with_header(tmp_path, monkeypatch, mode="full")
    recording_demos(monkeypatch)
    bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3)
    fl = {s: r for s, r in zip(SEEDS, fake_flower_runs(), strict=True)}
    handed: list[tuple[int, dict[str, Any]]] = []
    point = {
        "accuracy": {"mean": 0.5},
        "local_epochs": 1,
        "lr": 1e-3,
        "best_round": 3,
        "rounds_run": 7,
    }

    def fake(
        quick: bool,
        ds: str,
        seed: int,
        target: float,
        grids: Any = None,
        done: Any = None,
        saved: Any = None,
        scratch: Any = None,
    ) -> Any:
        handed.append((seed, json.loads(json.dumps(done))))
        assert scratch == tmp_path / "flower_running"  # beside results.json
        if seed == 0 and not done:
            done.setdefault("flower", {})[flower.point_key(1, 1e-3)] = point
            saved()
            raise KeyboardInterrupt  # Ctrl-C in the grid's second point
        return fl[seed]

    monkeypatch.setattr(flower, "run", fake)
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(False, tmp_path, only=["flower"])
    saved_now = json.loads((tmp_path / "results.json").read_text())
    assert saved_now["flower_partial"] == {"elpv": {"0": {"flower": {"1:0.001": point}}}}
    assert not saved_now["flower_runs"]["elpv"]

    done = bench_run.run_bench(False, tmp_path, only=["flower"], resume=True)
    assert handed[1] == (0, {"flower": {"1:0.001": point}})  # the finished point comes back
    assert [seed for seed, _ in handed[2:]] == [1, 2]
    assert all(kept == {} for _, kept in handed[2:])  # other seeds start clean
    assert "flower_partial" not in done  # finished seeds leave nothing half-done behind
    assert [r["seed"] for r in done["flower_runs"]["elpv"]] == [0, 1, 2]
    assert all("bench_commit" in r for r in done["flower_runs"]["elpv"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert "flower_partial" not in on_disk

    # a fresh (not resumed) Flower run of elpv drops elpv's rounds in progress, only
    scratch = tmp_path / "flower_running"
    scratch.mkdir()
    (scratch / "elpv-seed0-b11-3-lr0.001.safetensors").write_bytes(b"x")
    (scratch / "neu-det-seed0-b11-1-lr0.001.safetensors").write_bytes(b"x")
    with pytest.raises(KeyboardInterrupt):  # the fake's Ctrl-C in seed 0, started afresh
        bench_run.run_bench(False, tmp_path, only=["flower"], datasets=["elpv"])
    assert [p.name for p in scratch.iterdir()] == ["neu-det-seed0-b11-1-lr0.001.safetensors"]
