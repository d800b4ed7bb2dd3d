"""``fedinspect bench``'s pure parts on synthetic inputs: no demo, no training, no network.

The synthetic runs have the shape of ``fedinspect.demo.run_demo``'s result; the numbers
are picked so that the median over seeds, the mean over edges and their order of
application give different answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import demo_runs, extraction, flower, ingest, wire
from bench import run as bench_run
from bench.report import to_markdown
from bench.stats import fmt, summary

# ---------------------------------------------------------------------------- helpers

EDGE_NAMES = ("edge-1", "edge-2")
SEEDS = (0, 1, 2)
# federated accuracy per seed (rows) and edge (columns): per-edge medians 0.7 / 0.5
# (mean of medians 0.6), per-seed means 0.9 / 0.5 / 0.4 (median of means 0.5)
FEDERATED = ((0.9, 0.9), (0.5, 0.5), (0.7, 0.1))
LOCAL_ONLY = ((0.6, 0.3), (0.4, 0.2), (0.5, 0.4))
CENTRALIZED = (0.95, 0.85, 0.9)
CYCLE_S = (30.0, 12.0, 20.0)
TOTAL_S = (100.0, 80.0, 90.0)
WAIT_S = 1000.0  # idle time an edge spends waiting for the others: never compute


def _scores(acc: float | None) -> dict[str, float] | None:
    return None if acc is None else {"accuracy": acc, "macro_f1": round(acc - 0.05, 4)}


def _edge(
    i: int, seed: int, server_model: float | None = 0.55, uploaded: int = 1000
) -> dict[str, Any]:
    return {
        "name": EDGE_NAMES[i],
        "dataset": f"elpv:type=part{i}",
        "n_train": 100 + i,
        "n_test": 40,
        "local_only": _scores(LOCAL_ONLY[seed][i]),
        "base": _scores(0.5),
        "server_model": _scores(server_model),
        "federated": _scores(FEDERATED[seed][i]),
        "deployed": True,
        "decision": "deploy",
        "bytes": {
            "uploaded": uploaded * (i + 1) + seed,
            "downloaded": 5000,
            "raw_images": 200_000,
        },
        # every stage grows with the seed and the edge, so medians are not trivial
        "stage_seconds": {
            "request": 0.1,
            "download": 1.0 + seed,
            "extract": 2.0 * (i + 1) + seed,
            "upload": 0.5,
            "wait": WAIT_S,
            "finetune": 3.0,
            "evaluate": 0.25,
        },
    }


def _run(seed: int, edges: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One ``run_demo`` result, with the totals computed the way ``run_demo`` does."""
    rows = edges if edges is not None else [_edge(i, seed) for i in range(len(EDGE_NAMES))]
    return {
        "dataset": "elpv",
        "quick": True,
        "seed": seed,
        "input_size": 224,
        "backbone": "efficientnet_lite0",
        "class_names": ["functional", "defective"],
        "edges": rows,
        "centralized": _scores(CENTRALIZED[seed]),
        "mean_federated_accuracy": round(
            sum(r["federated"]["accuracy"] for r in rows) / len(rows), 4
        ),
        "cycle": {"id": f"c{seed}", "model_version": 2, "seconds": CYCLE_S[seed]},
        "bytes": {
            k: sum(r["bytes"][k] for r in rows) for k in ("uploaded", "downloaded", "raw_images")
        },
        "references_seconds": 5.0,
        "total_seconds": TOTAL_S[seed],
    }


def _runs() -> list[dict[str, Any]]:
    return [_run(s) for s in SEEDS]


def _flower_seed(seed: int, mean: float, reach: int | None) -> dict[str, Any]:
    """One configuration of ``flower.run``'s result for one seed (``_fedavg``'s shape)."""
    return {
        "local_epochs": 3,
        "lr": 1e-3 * (seed + 1),
        "selection": "validation",
        "best_round": 4 + seed,
        "rounds": 4 + seed,
        "accuracy": {"per_edge": [mean + 0.1, mean - 0.1], "mean": mean},
        "balanced_accuracy": {"per_edge": [mean, mean - 0.2], "mean": mean - 0.1},
        "macro_f1": {"per_edge": [mean - 0.1, mean - 0.3], "mean": mean - 0.2},
        "val_accuracy": {"per_edge": [mean + 0.05, None], "mean": mean + 0.05},
        "rounds_to_reach_ours": reach,
        "history_mean": [mean],
        "history_val_mean": [mean + 0.05],
        "bytes_per_round": 1000,
        "bytes": 1000 * (4 + seed),
        "parameter_bytes": 250,
        "seconds": {
            "edge_compute_to_best": 10.0 * (seed + 1),
            "wall_to_best": 20.0 * (seed + 1),
            "frozen_part_once_s": 1.0,
        },
        "test_selected": {
            "local_epochs": 1,
            "lr": 1e-3,
            "round": 6 + seed,
            "accuracy": {"per_edge": [mean + 0.15, mean + 0.05], "mean": mean + 0.1},
            "bytes": 1000 * (6 + seed),
        },
        "trained_from": "b11" if seed == 0 else "something-else",
        "grid": [{"local_epochs": 3, "lr": 1e-3}],
    }


def _old_flower_seed(seed: int, mean: float) -> dict[str, Any]:
    """The same, as stored by the earlier protocol (chosen on test, accuracy alone)."""
    new = _flower_seed(seed, mean, None)
    gone = ("selection", "balanced_accuracy", "macro_f1", "val_accuracy", "test_selected")
    return {k: v for k, v in new.items() if k not in gone and k != "history_val_mean"}


def _flower_runs() -> list[dict[str, Any]]:
    means = (0.8, 0.6, 0.7)
    reach = (2, None, 5)
    return [
        {
            "flower": _flower_seed(s, means[s], reach[s]),
            "flower_head": _flower_seed(s, means[s] - 0.2, None),
            "engine": "flwr FedAvg",
            "seed": s,
        }
        for s in SEEDS
    ]


def _header(**extra: Any) -> dict[str, Any]:
    """What ``run_bench`` writes before any section runs."""
    return {
        "mode": "quick",
        "command": "fedinspect bench --quick --out /tmp/x",
        "started_at": "2024-01-01T00:00:00+00:00",
        "machine": {
            "git_commit": "abc123",
            "cpu": "Test CPU",
            "cores": 2,
            "python": "3.11.0",
            "torch": "2.0",
            "onnxruntime": None,
            "platform": "Linux",
            "load_average_at_start": [0.5, 0.4, 0.3],
        },
        "notes": [],
        **extra,
    }


# ------------------------------------------------------------------------- bench.stats


def test_summary_odd_list_median_is_the_middle_value() -> None:
    assert summary([3.0, 1.0, 2.0, 10.0, 0.5]) == {
        "median": 2.0,
        "min": 0.5,
        "max": 10.0,
        "runs": 5,
    }


def test_summary_even_list_median_is_the_mean_of_the_middle_two() -> None:
    s = summary((10.0, 1.0, 2.0, 4.0))  # any sequence, unsorted
    assert s == {"median": 3.0, "min": 1.0, "max": 10.0, "runs": 4}


def test_summary_rounds_every_figure_to_digits() -> None:
    values = [1.23456, 2.34567, 3.45678]
    assert summary(values, 2) == {"median": 2.35, "min": 1.23, "max": 3.46, "runs": 3}
    assert summary([1 / 3]) == {"median": 0.333, "min": 0.333, "max": 0.333, "runs": 1}
    assert summary([1234.4, 1300.6], 0) == {
        "median": 1268.0,
        "min": 1234.0,
        "max": 1301.0,
        "runs": 2,
    }


def test_summary_of_nothing_has_no_figures_and_zero_runs() -> None:
    assert summary([]) == {"median": None, "min": None, "max": None, "runs": 0}


def test_fmt_shows_median_and_range_and_a_dash_when_empty() -> None:
    assert fmt(summary([2.0, 1.0, 3.5]), " s") == "2 s (1-3.5)"
    assert fmt(summary([])) == "-"
    assert fmt(None) == "-"


# --------------------------------------------------------------------- bench.demo_runs


def test_accuracy_table_takes_medians_over_seeds_per_edge() -> None:
    t = demo_runs.accuracy_table(_runs())
    assert t["seeds"] == [0, 1, 2]
    assert t["quick"] is True
    assert t["input_size"] == 224
    assert [(e["name"], e["dataset"]) for e in t["edges"]] == [
        ("edge-1", "elpv:type=part0"),
        ("edge-2", "elpv:type=part1"),
    ]
    first, second = t["edges"]
    assert first["federated"] == {"median": 0.7, "min": 0.5, "max": 0.9, "runs": 3}
    assert second["federated"] == {"median": 0.5, "min": 0.1, "max": 0.9, "runs": 3}
    assert first["local_only"] == {"median": 0.5, "min": 0.4, "max": 0.6, "runs": 3}
    assert second["local_only"] == {"median": 0.3, "min": 0.2, "max": 0.4, "runs": 3}
    assert first["base"] == {"median": 0.5, "min": 0.5, "max": 0.5, "runs": 3}
    assert t["centralized"] == {"median": 0.9, "min": 0.85, "max": 0.95, "runs": 3}


def test_accuracy_table_mean_is_median_over_seeds_of_the_edge_mean() -> None:
    mean = demo_runs.accuracy_table(_runs())["mean"]
    # per-seed means 0.9, 0.5, 0.4: median 0.5 (the mean of per-edge medians would be 0.6)
    assert mean["federated"]["median"] == pytest.approx(0.5)
    assert mean["federated"]["min"] == pytest.approx(0.4)
    assert mean["federated"]["max"] == pytest.approx(0.9)
    assert mean["federated"]["runs"] == 3
    # local-only per-seed means 0.45, 0.3, 0.45
    assert mean["local_only"]["median"] == pytest.approx(0.45)
    assert mean["local_only"]["min"] == pytest.approx(0.3)
    assert set(mean) == {"local_only", "base", "server_model", "federated"}


def test_accuracy_table_per_edge_skips_seeds_without_a_score() -> None:
    runs = _runs()
    runs[1]["edges"][0]["server_model"] = None
    runs[2]["edges"][0]["server_model"] = _scores(0.75)
    first = demo_runs.accuracy_table(runs)["edges"][0]
    assert first["server_model"] == {"median": 0.65, "min": 0.55, "max": 0.75, "runs": 2}


def test_accuracy_table_of_one_run_has_one_run_everywhere() -> None:
    t = demo_runs.accuracy_table([_run(2)])
    assert t["seeds"] == [2]
    assert t["edges"][1]["federated"] == {"median": 0.1, "min": 0.1, "max": 0.1, "runs": 1}
    assert t["mean"]["federated"]["median"] == pytest.approx(0.4)
    assert t["centralized"]["runs"] == 1


def test_cycle_stages_pools_every_edge_and_seed_per_stage() -> None:
    c = demo_runs.cycle_stages(_runs())
    assert c["cycle_s"] == {"median": 20.0, "min": 12.0, "max": 30.0, "runs": 3}
    assert c["demo_total_s"] == {"median": 90.0, "min": 80.0, "max": 100.0, "runs": 3}
    stages = c["stages"]
    assert set(stages) == {
        "request",
        "download",
        "extract",
        "upload",
        "wait",
        "finetune",
        "evaluate",
    }
    # extract: edge 1 -> 2, 3, 4 and edge 2 -> 4, 5, 6 over seeds 0..2
    assert stages["extract"] == {"median": 4.0, "min": 2.0, "max": 6.0, "runs": 6}
    # download: 1, 2, 3 on both edges; even count -> mean of the middle two
    assert stages["download"] == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 6}
    # wait is reported as its own stage (it is excluded only from edge compute)
    assert stages["wait"]["median"] == WAIT_S


def test_cycle_stages_rounds_stage_seconds_to_two_digits() -> None:
    runs = [_run(0)]
    for e in runs[0]["edges"]:
        e["stage_seconds"]["finetune"] = 3.14159
    assert demo_runs.cycle_stages(runs)["stages"]["finetune"]["median"] == 3.14


def test_ours_for_flower_edge_compute_excludes_wait() -> None:
    ours = demo_runs.ours_for_flower(_runs())
    # per seed: sum over both edges of every stage but wait
    expected = [
        sum(
            v
            for e in r["edges"]
            for k, v in e["stage_seconds"].items()
            if k != "wait"  # 1000 s each: including it would dwarf the rest
        )
        for r in _runs()
    ]
    assert expected == pytest.approx([15.7, 19.7, 23.7])
    assert ours["seconds"]["edge_compute"] == {
        "median": 19.7,
        "min": 15.7,
        "max": 23.7,
        "runs": 3,
    }
    assert ours["seconds"]["wall"] == {"median": 20.0, "min": 12.0, "max": 30.0, "runs": 3}
    assert ours["rounds"] == 1


def test_ours_for_flower_bytes_are_upload_plus_download_over_all_edges() -> None:
    ours = demo_runs.ours_for_flower(_runs())
    # per seed: uploads (1000 + s) + (2000 + s), downloads 5000 + 5000
    assert ours["bytes_uploaded"] == {"median": 3002, "min": 3000, "max": 3004, "runs": 3}
    assert ours["bytes_downloaded"] == {"median": 10000, "min": 10000, "max": 10000, "runs": 3}
    assert ours["bytes"] == {"median": 13002, "min": 13000, "max": 13004, "runs": 3}


def test_ours_for_flower_accuracy_per_edge_and_mean() -> None:
    acc = demo_runs.ours_for_flower(_runs())["accuracy"]
    assert acc["per_edge"] == [
        {"median": 0.7, "min": 0.5, "max": 0.9, "runs": 3},
        {"median": 0.5, "min": 0.1, "max": 0.9, "runs": 3},
    ]
    # the runs' own mean_federated_accuracy (0.9, 0.5, 0.4), median over seeds
    assert acc["mean"] == {"median": 0.5, "min": 0.4, "max": 0.9, "runs": 3}


# ------------------------------------------------------------------------ bench.flower


def test_flower_summarize_takes_medians_over_seeds() -> None:
    s = flower.summarize(_flower_runs(), "flower")
    assert s["accuracy"]["mean"] == {"median": 0.7, "min": 0.6, "max": 0.8, "runs": 3}
    assert s["accuracy"]["per_edge"][0] == {"median": 0.8, "min": 0.7, "max": 0.9, "runs": 3}
    assert s["accuracy"]["per_edge"][1]["median"] == pytest.approx(0.6)
    assert len(s["accuracy"]["per_edge"]) == 2
    assert s["bytes"] == {"median": 5000, "min": 4000, "max": 6000, "runs": 3}
    assert s["seconds"]["edge_compute"] == {"median": 20.0, "min": 10.0, "max": 30.0, "runs": 3}
    assert s["seconds"]["wall"] == {"median": 40.0, "min": 20.0, "max": 60.0, "runs": 3}
    assert s["rounds"] == {"median": 5, "min": 4, "max": 6, "runs": 3}


def test_flower_summarize_keeps_per_seed_lists_in_seed_order() -> None:
    runs = _flower_runs()
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
    head = flower.summarize(_flower_runs(), "flower_head")
    assert head["accuracy"]["mean"]["median"] == pytest.approx(0.5)
    assert head["rounds_to_reach_ours"] == [None, None, None]


def test_flower_summarize_says_how_the_round_was_chosen_and_shows_the_peek_apart() -> None:
    s = flower.summarize(_flower_runs(), "flower")
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
    runs = [{"flower": _old_flower_seed(s, 0.7), "seed": s} for s in SEEDS]
    s = flower.summarize(runs, "flower")
    assert s["selection"] == "test"
    assert "test_selected" not in s and "balanced_accuracy" not in s
    runs[0]["flower"] = _flower_seed(0, 0.7, None)
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
    ours = demo_runs.ours_per_seed(_runs())
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
    runs = _flower_runs()[:2]
    runs[0]["flower"] |= {"history_mean": [0.3, 0.85, 0.9, 0.9], "best_round": 3}
    runs[0]["flower"]["accuracy"]["mean"] = 0.9
    runs[0]["flower"]["seconds"] |= {"wall_to_best": 61.0, "frozen_part_once_s": 1.0}
    runs[0]["flower"] |= {"bytes": 3000, "bytes_per_round": 1000}
    ours = demo_runs.ours_per_seed(_runs())  # seed 0: mean 0.9, 12003 bytes, 30 s
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
    runs = _flower_runs()[:1]
    f = runs[0]["flower"]
    f |= {"history_mean": [0.95, 0.99, 0.97, 0.99], "best_round": 2, "bytes_per_round": 500}
    f["accuracy"]["mean"] = 0.99
    f["seconds"] |= {"wall_to_best": 25.0, "frozen_part_once_s": 5.0}
    ours = {0: {"mean": 0.95, "per_edge": [0.95], "bytes": 100, "wall": 50.0}}
    a = flower.same_seed(runs, ours)[0]["flower"]
    assert a["reaches_ours_at_round"] == 1  # a tie with ours counts as reaching it
    assert a["to_reach_ours"] == {"bytes": 500, "wall_s": 15.0}  # 5 s frozen + 20 s / 2


# ------------------------------------------------------------------------ bench.report


def test_to_markdown_with_every_section_errored_lists_the_errors() -> None:
    r = _header(
        extraction=None,
        wire=None,
        ingest=None,
        accuracy={},
        cycle={},
        errors={"extraction": "RuntimeError: boom", "demo elpv": "ValueError: no data"},
    )
    md = to_markdown(r)
    assert md.startswith("# FedInspect benchmarks (quick)\n")
    assert "Test CPU, 2 cores" in md
    assert "total - s." in md  # no total_seconds yet
    assert "## Sections that failed" in md
    assert "- extraction: RuntimeError: boom" in md
    assert "- demo elpv: ValueError: no data" in md
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
        assert section not in md


def test_to_markdown_of_the_bare_header_has_no_sections() -> None:
    md = to_markdown(_header(notes=["NEU-DET skipped: absent"]))
    assert "- NEU-DET skipped: absent" in md
    assert "## " not in md
    assert md.endswith("\n")


def _extraction_size() -> dict[str, Any]:
    return {
        "input_size": 224,
        "batch_size": 32,
        "threads": 2,
        "images": 64,
        "torch_nchw_img_s": summary([100.0, 110.0, 90.0], 1),
        "torch_img_s": summary([120.0, 125.0, 115.0], 1),
        "onnxruntime_img_s": summary([150.0, 160.0, 140.0], 1),
        "breakdown": {
            "the edge now (overlap only with a spare core)": summary([130.5, 131.0, 129.0], 1),
        },
        "ratio": 0.871,
        "onnx_setup_s": 1.25,
        "onnx_max_abs_diff": 2.5e-6,
    }


def test_to_markdown_shows_the_extraction_numbers() -> None:
    md = to_markdown(_header(extraction={"sizes": [_extraction_size()]}, total_seconds=321.5))
    assert "## 1. Extraction against the CPU's limit" in md
    assert "224 px, batch 32, 2 threads, 64 elpv images" in md
    assert "| reference: ONNX Runtime on decoded tensors | 150 (140-160) |" in md
    assert "| edge path: the edge now (overlap only with a spare core) | 130.5 (129-131) |" in md
    assert "**0.871**" in md
    assert "1.25 s (max abs diff 2.5e-06)" in md
    assert "total 321.5 s." in md
    assert "## Sections that failed" not in md


def test_to_markdown_shows_wire_ingest_and_measured_bytes() -> None:
    w = {
        "raw_bytes_per_image": 12345.6,
        "upload_bytes_per_image": {"float16": 2600.0, "int8": 1400.0},
        "ratio": {"float16": 0.2106, "int8": 0.1134},
        "download_bytes_per_cycle": {
            "first_cycle": 630_000,
            "later_cycles": 600_000,
            "base_from_local_weights": 30_000,
            "base_changed_tensors": 0,
            "without_local_weights_first_cycle": 5_600_000,
            "full_model": 5_000_000,
            "delta": 600_000,
            "changed_tensors": 4,
            "total_tensors": 200,
            "without_delta_first_cycle": 10_000_000,
        },
        "measured_in_demo": [
            {"name": "edge-1", "n_train": 100, "uploaded": 1, "downloaded": 2, "raw_images": 3}
        ],
    }
    row = {
        "edges": 50,
        "uploads": 100,
        "upload_bytes": 4096,
        "uploads_per_s": 77.7,
        "mb_per_s": 0.3,
        "p50_ms": 12.0,
        "p99_ms": 99.0,
        "errors": 0,
        "retries_429_503": 3,
        "peak_rss_mb": 321.0,
    }
    md = to_markdown(_header(wire=w, ingest=[row]))
    assert "raw image bytes on disk: 12346 per image" in md
    assert "| int8 | 1400 | 0.1134 |" in md
    assert "4 of 200 tensors" in md
    assert "base 30000 as a delta from the local ImageNet weights" in md
    assert "5600000 without them" in md
    assert "| edge-1 | 100 | 1 | 2 | 3 |" in md
    assert "| 50 | 100 | 4096 | 77.7 | 0.3 | 12.0 | 99.0 | 0 | 3 | 321.0 |" in md


def test_to_markdown_shows_accuracy_cycle_and_flower_from_the_aggregates() -> None:
    runs = _runs()
    fl = _flower_runs()
    stages = demo_runs.cycle_stages(runs)
    r = _header(
        accuracy={"elpv": demo_runs.accuracy_table(runs)},
        cycle={"quick_s": stages["cycle_s"], "full_s": None, "stages": stages["stages"]},
        ours=demo_runs.ours_for_flower(runs),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
        engine="flwr FedAvg",
    )
    md = to_markdown(r)
    assert "quick demo cycle: 20 s (12-30); full demo cycle: -" in md
    assert "| extract | 4 (2-6) |" in md
    assert "### elpv (quick, 224 px, seeds [0, 1, 2])" in md
    assert (
        "| edge-1 | 50.0 (40.0-60.0) | 50.0 (50.0-50.0) | 55.0 (55.0-55.0) | 70.0 (50.0-90.0) |"
        in md
    )
    assert "centralized upper bound: 90.0 (85.0-95.0)" in md
    assert "## 6. Against Flower (elpv)" in md
    ours_row = next(line for line in md.splitlines() if line.startswith("| ours (1 cycle)"))
    assert "| 50.0 (40.0-90.0) |" in ours_row  # mean federated accuracy
    assert "0.0 MB (0.0-0.0)" in ours_row  # 13 kB
    assert "| 19.7 (15.7-23.7) | 20 (12-30) |" in ours_row
    fl_row = next(line for line in md.splitlines() if line.startswith("| Flower FedAvg, b11+"))
    assert "| 70.0 (60.0-80.0) |" in fl_row
    assert "| 5 (4-6) |" in fl_row
    assert (
        "flower: rounds to reach the median of our means (all seeds), per seed: [2, None, 5]" in md
    )
    assert "engine: flwr FedAvg" in md
    assert "Grid points" not in md  # grids stored as bare (epochs, lr) pairs: nothing to list
    assert "Same seed" not in md  # no per-seed comparison stored: no table


def test_to_markdown_sets_each_flower_seed_beside_ours_on_the_same_seed() -> None:
    fl = _flower_runs()
    fl[0]["flower"] |= {"history_mean": [0.5, 0.8], "best_round": 2, "bytes_per_round": 2_000_000}
    fl[0]["flower"]["accuracy"]["mean"] = 0.95
    fl[0]["flower"] |= {"bytes": 4_000_000}
    ours = {0: {"mean": 0.8, "per_edge": [0.8], "bytes": 1_000_000, "wall": 10.0}}
    r = _header(
        ours=demo_runs.ours_for_flower(_runs()),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
        same_seed=flower.same_seed(fl, ours),
    )
    md = to_markdown(r)
    assert "Same seed, same splits" in md
    # wall to best 20 s with 1 s frozen: round 2 of 2 costs 1 + 19 = 20 s
    row = "| 0 | 80.0 | 95.0 (+15.0) | 4x, 2x | 2 (4.0 MB, 20 s) | 60.0 (-20.0) | 0x, 2x | never |"
    assert row in md.splitlines()


def test_to_markdown_lists_every_point_of_a_searched_flower_grid() -> None:
    """The grid search is part of the comparison's fairness: each point's best round,
    its cost and when it reached ours stay in the report once the seed is done."""
    fl = _flower_runs()
    collapsed = _flower_seed(0, 0.684, None) | {"local_epochs": 1, "best_round": 2}
    collapsed |= {"rounds_run": 6, "bytes": 145_300_000}
    fl[0]["flower"]["grid"] = [collapsed, dict(fl[0]["flower"], rounds_run=16)]
    r = _header(
        ours=demo_runs.ours_for_flower(_runs()),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
    )
    md = to_markdown(r)
    rows = [line for line in md.splitlines() if line.startswith("| flower")]
    assert rows == [
        "| flower, seed 0 | 1, 0.001 | 68.4 | 2 (6) | 145.3 MB | 20 | never |",
        "| flower, seed 0 | 3, 0.001 | 80.0 | 4 (16) | 0.0 MB | 20 | 2 |",
    ]


def _flower_markdown(fl: list[dict[str, Any]]) -> str:
    """results.md of a bench whose Flower section holds the runs ``fl``."""
    r = _header(
        ours=demo_runs.ours_for_flower(_runs()),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
    )
    return to_markdown(r)


def test_to_markdown_says_flower_chose_on_validation_and_shows_the_peek_apart() -> None:
    md = _flower_markdown(_flower_runs())
    assert "the best mean accuracy on the clients' validation splits" in md
    assert "best on the test split, which favours Flower" not in md
    assert (
        "flower: chosen on validation; at that round, test balanced accuracy 60.0 (50.0-70.0), "
        "macro F1 50.0 (40.0-60.0), validation accuracy 75.0 (65.0-85.0)" in md
    )
    assert (
        "flower, test-selected for reference only (favours Flower): mean acc 80.0 (70.0-90.0) "
        "at rounds [6, 7, 8]" in md
    )


def test_to_markdown_of_results_stored_by_the_earlier_protocol_says_they_chose_on_test() -> None:
    fl = [
        {"flower": _old_flower_seed(s, 0.7), "flower_head": _old_flower_seed(s, 0.5), "seed": s}
        for s in SEEDS
    ]
    md = _flower_markdown(fl)
    assert "is the best on the test split, which favours Flower" in md
    assert "test-selected" not in md and "balanced accuracy" not in md


def test_to_markdown_flower_block_without_flower_results_shows_only_ours() -> None:
    """The Flower section failed: the block has ``ours`` alone (as ``_demos`` leaves it)."""
    r = _header(
        ours=demo_runs.ours_for_flower(_runs()),
        neu_det_flower={"ours": demo_runs.ours_for_flower([_run(0)])},
        errors={"flower elpv": "RuntimeError: flwr is not installed"},
    )
    md = to_markdown(r)
    assert "## 6. Against Flower (elpv)" in md
    assert "## 6. Against Flower (NEU-DET)" in md
    assert "Flower FedAvg" not in md
    assert "rounds to reach" not in md
    assert "- flower elpv: RuntimeError: flwr is not installed" in md


def test_to_markdown_lists_reruns() -> None:
    rerun = {
        "sections": ["wire"],
        "at": "2024-01-02T00:00:00+00:00",
        "machine": {"load_average_at_start": [1.5, 1.0, 0.5]},
    }
    md = to_markdown(_header(reruns=[rerun]))
    assert "- sections ['wire'] rerun at 2024-01-02T00:00:00+00:00 (load average then [1.5" in md


def test_to_markdown_shows_the_grid_points_of_an_unfinished_flower_seed() -> None:
    point = {"accuracy": {"mean": 0.8123}, "best_round": 7, "rounds_run": 11}
    point["selection"] = "validation"
    old = {"accuracy": {"mean": 0.7}, "best_round": 2, "rounds_run": 6}  # earlier protocol
    points = {"1:0.001": point, "3:0.001": old}
    md = to_markdown(_header(flower_partial={"elpv": {"0": {"flower": points}}}))
    assert "## Flower, seeds still running (resume with --only flower --resume)" in md
    assert (
        "- elpv seed 0, flower, (local epochs, lr) 1:0.001: mean test accuracy 81.2% at "
        "round 7 of 11, chosen on validation" in md
    )
    assert (
        "(local epochs, lr) 3:0.001: mean test accuracy 70.0% at round 2 of 6, chosen on test" in md
    )


# --------------------------------------------------------------------------- bench.run


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any section that starts fails the test instead of running for minutes."""

    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a benchmark section ran")

    monkeypatch.setattr(extraction, "run", forbidden)
    monkeypatch.setattr(wire, "run", forbidden)
    monkeypatch.setattr(ingest, "run", forbidden)
    monkeypatch.setattr(demo_runs, "run_demos", forbidden)
    monkeypatch.setattr(flower, "run", forbidden)
    monkeypatch.setattr(bench_run, "_machine", lambda: {"load_average_at_start": [0.0, 0.0, 0.0]})


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize("only", [["nope"], ["wire", "accuracy"], ["demo"]])
def test_run_bench_rejects_unknown_sections_before_running_any(
    tmp_path: Path, only: list[str]
) -> None:
    with pytest.raises(ValueError, match="unknown sections") as err:
        bench_run.run_bench(True, tmp_path / "out", only=only)
    bad = sorted(set(only) - set(bench_run.SECTIONS))
    assert str(bad) in str(err.value)
    assert "extraction" in str(err.value)  # the valid choices are listed
    assert not (tmp_path / "out" / "results.json").exists()
    assert not (tmp_path / "out" / "results.md").exists()


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_unknown_section_leaves_existing_results_untouched(tmp_path: Path) -> None:
    before = json.dumps(_header(errors={"wire": "OSError: x"})) + "\n"
    (tmp_path / "results.json").write_text(before)
    with pytest.raises(ValueError):
        bench_run.run_bench(True, tmp_path, only=["wire", "bogus"])
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_rerun_replaces_only_the_named_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--only wire`` into an existing results.json: the other sections and errors stay."""
    measured = [{"name": "edge-1", "n_train": 1, "uploaded": 2, "downloaded": 3, "raw_images": 4}]
    old = _header(
        extraction=None,
        wire={"old": True, "measured_in_demo": measured},
        errors={"extraction": "RuntimeError: boom", "wire": "OSError: old failure"},
    )
    (tmp_path / "results.json").write_text(json.dumps(old))
    new_wire = {
        "raw_bytes_per_image": 100.0,
        "upload_bytes_per_image": {"int8": 10.0},
        "ratio": {"int8": 0.1},
        "download_bytes_per_cycle": {
            "first_cycle": 3,
            "later_cycles": 1,
            "full_model": 2,
            "delta": 1,
            "changed_tensors": 1,
            "total_tensors": 9,
            "without_delta_first_cycle": 4,
        },
    }
    monkeypatch.setattr(wire, "run", lambda quick: dict(new_wire))

    results = bench_run.run_bench(True, tmp_path, only=["wire"])

    assert results["errors"] == {"extraction": "RuntimeError: boom"}
    assert "old" not in results["wire"]
    assert results["wire"]["ratio"] == {"int8": 0.1}
    assert results["wire"]["measured_in_demo"] == measured  # kept from the demo run
    assert [r["sections"] for r in results["reruns"]] == [["wire"]]
    assert "total_seconds" not in results
    assert json.loads((tmp_path / "results.json").read_text()) == results
    md = (tmp_path / "results.md").read_text()
    assert "| int8 | 10 | 0.1000 |" in md
    assert "- extraction: RuntimeError: boom" in md
    assert "old failure" not in md


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_rerun_of_demos_clears_their_old_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _header(errors={"demo elpv": "RuntimeError: old", "flower elpv": "RuntimeError: old"})
    (tmp_path / "results.json").write_text(json.dumps(old))
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], []))
    monkeypatch.setattr(demo_runs, "run_demos", lambda ds, quick, seeds: [_run(s) for s in seeds])
    fl = {s: r for s, r in zip(SEEDS, _flower_runs(), strict=True)}
    monkeypatch.setattr(flower, "run", lambda quick, ds, seed, target, *_: fl[seed])

    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3)

    assert results["accuracy"]["elpv"]["seeds"] == [0, 1, 2]  # the rerun itself worked
    assert not results.get("errors")


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_flower_alone_compares_with_the_saved_demo_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_header()))
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], []))
    monkeypatch.setattr(demo_runs, "run_demos", lambda ds, quick, seeds: [_run(s) for s in seeds])
    first = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3)
    assert "flower" not in first and first["ours"]["seeds"] == [0, 1, 2]
    monkeypatch.setattr(demo_runs, "run_demos", None)  # calling it would fail the test
    asked: list[tuple[int, float]] = []
    fl = {s: r for s, r in zip(SEEDS, _flower_runs(), strict=True)}

    def fake_flower(
        quick: bool, ds: str, seed: int, target: float, grids: Any = None, *_: Any
    ) -> dict[str, Any]:
        asked.append((seed, target))
        return fl[seed]

    monkeypatch.setattr(flower, "run", fake_flower)
    results = bench_run.run_bench(True, tmp_path, only=["flower"])
    target = first["ours"]["accuracy"]["mean"]["median"]
    assert asked == [(0, target), (1, target), (2, target)]  # our seeds, our mean
    assert results["flower"]["rounds_to_reach_ours"] == [2, None, 5]
    # and each seed beside our cycle on the same seed, from the stored demo runs
    same = results["same_seed"]
    assert [(row["seed"], row["ours"]["mean"]) for row in same] == [(0, 0.9), (1, 0.5), (2, 0.4)]
    assert [row["flower"]["points_above_ours"] for row in same] == [-10.0, 10.0, 30.0]
    assert results["accuracy"] == first["accuracy"]  # the demos' results are kept
    md = (tmp_path / "results.md").read_text()
    assert (
        "flower: rounds to reach the median of our means (all seeds), per seed: [2, None, 5]" in md
    )


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_flower_without_demo_results_says_so_and_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_header()))
    results = bench_run.run_bench(True, tmp_path, only=["flower"])
    assert "run the demos section first" in results["errors"]["flower elpv"]
    assert "flower" not in results


@pytest.mark.usefixtures("no_heavy_work")
def test_an_interrupted_bench_keeps_the_datasets_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_header()))
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv", "/data/neu-det"], []))

    def demos(ds: str, quick: bool, seeds: list[int]) -> list[dict[str, Any]]:
        if ds != "elpv":
            raise KeyboardInterrupt  # Ctrl-C an hour into the second dataset
        return [_run(s) for s in seeds]

    monkeypatch.setattr(demo_runs, "run_demos", demos)
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(False, tmp_path, only=["demos"], seeds=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"]["elpv"]["seeds"] == [0]
    assert saved["ours"]["seeds"] == [0]


# ------------------------------------------------------------- demos built up over runs


def _results_dir(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    names: tuple[str, ...] = ("elpv",),
    **header: Any,
) -> None:
    """``tmp_path`` holds a bench's header (with ``header``) and the demos find the
    datasets ``names``."""
    monkeypatch.setattr(demo_runs, "datasets", lambda: (list(names), []))
    (tmp_path / "results.json").write_text(json.dumps(_header(**header)))


def _recording_demos(
    monkeypatch: pytest.MonkeyPatch, fail_on: int | None = None
) -> list[tuple[str, int]]:
    """Fake ``run_demos`` that records (dataset, seed) and Ctrl-Cs on seed ``fail_on``."""
    asked: list[tuple[str, int]] = []

    def demos(ds: str, quick: bool, seeds: list[int]) -> list[dict[str, Any]]:
        out = []
        for s in seeds:
            if s == fail_on:
                raise KeyboardInterrupt
            asked.append((ds, s))
            out.append(_run(s) | {"dataset": ds})
        return out

    monkeypatch.setattr(demo_runs, "run_demos", demos)
    return asked


@pytest.mark.usefixtures("no_heavy_work")
def test_resume_runs_only_the_missing_seeds_and_tables_cover_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _results_dir(tmp_path, monkeypatch)
    asked = _recording_demos(monkeypatch)
    bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert asked == [("elpv", 0)]

    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3, resume=True)

    assert asked == [("elpv", 0), ("elpv", 1), ("elpv", 2)]  # seed 0 was not run again
    assert [r["seed"] for r in results["demo_runs"]["elpv"]] == [0, 1, 2]
    assert results["accuracy"]["elpv"]["seeds"] == [0, 1, 2]
    # each run remembers the commit it ran at (the header's, as _machine is stubbed)
    assert [r["bench_commit"] for r in results["demo_runs"]["elpv"]] == ["abc123"] * 3
    with_commit = [r | {"bench_commit": "abc123"} for r in _runs()]
    assert results["accuracy"]["elpv"] == demo_runs.accuracy_table(with_commit)
    assert results["ours"]["seeds"] == [0, 1, 2]
    assert results["reruns"][-1]["resume"] is True


@pytest.mark.usefixtures("no_heavy_work")
def test_each_finished_seed_is_saved_before_the_next_one_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _results_dir(tmp_path, monkeypatch)
    _recording_demos(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in saved["demo_runs"]["elpv"]] == [0, 1]
    assert saved["accuracy"]["elpv"]["seeds"] == [0, 1]

    asked = _recording_demos(monkeypatch)
    done = bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3, resume=True)
    assert asked == [("elpv", 2), ("elpv", 0)]  # the missing seed, then the quick cycle demo
    assert done["accuracy"]["elpv"]["seeds"] == [0, 1, 2]


@pytest.mark.usefixtures("no_heavy_work")
def test_without_resume_a_demos_rerun_replaces_the_old_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _run(0) | {"marker": "old"}
    _results_dir(tmp_path, monkeypatch, demo_runs={"elpv": [old]})
    asked = _recording_demos(monkeypatch)
    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert asked == [("elpv", 0)]
    assert [r.get("marker") for r in results["demo_runs"]["elpv"]] == [None]


@pytest.mark.usefixtures("no_heavy_work")
def test_dataset_choice_leaves_the_other_datasets_results_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _results_dir(tmp_path, monkeypatch, ("elpv", "/data/neu-det"))
    asked = _recording_demos(monkeypatch)
    first = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert asked == [("elpv", 0), ("/data/neu-det", 0)]

    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=2, datasets=["neu-det"])

    assert asked[2:] == [("/data/neu-det", 0), ("/data/neu-det", 1)]
    assert results["demo_runs"]["elpv"] == first["demo_runs"]["elpv"]
    assert results["accuracy"]["elpv"] == first["accuracy"]["elpv"]
    assert results["ours"] == first["ours"]
    assert results["accuracy"]["neu-det"]["seeds"] == [0, 1]
    assert results["neu_det_flower"]["ours"]["seeds"] == [0, 1]
    assert results["reruns"][-1]["datasets"] == ["neu-det"]


@pytest.mark.usefixtures("no_heavy_work")
def test_new_runs_of_ours_drop_the_stale_flower_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _results_dir(tmp_path, monkeypatch)
    _recording_demos(monkeypatch)
    bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    fl = {s: r for s, r in zip(SEEDS, _flower_runs(), strict=True)}
    monkeypatch.setattr(flower, "run", lambda quick, ds, seed, target, *_: fl[seed])
    assert "flower" in bench_run.run_bench(True, tmp_path, only=["flower"])

    again = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1, resume=True)
    assert "flower" in again  # nothing new ran: the comparison still holds
    more = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=2, resume=True)
    assert "flower" not in more and "flower_head" not in more


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"datasets": ["mnist"]}, "unknown datasets ['mnist']"),
        ({"resume": True}, "use it with --only demos or --only flower"),
        ({"resume": True, "only": ["wire"]}, "use it with --only demos or --only flower"),
    ],
)
def test_run_bench_rejects_bad_dataset_and_resume_choices(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        bench_run.run_bench(True, tmp_path, **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "results.json").exists()


def test_accuracy_table_says_how_references_were_trained_and_at_which_commits() -> None:
    runs = [_run(0) | {"references": "full", "bench_commit": "b2"}, _run(1)]
    runs[1] |= {"references": "pooled", "bench_commit": "a1"}
    table = demo_runs.accuracy_table(runs)
    assert table["references"] == ["full", "pooled"]
    assert table["commits"] == ["a1", "b2"]
    md = to_markdown(_header(accuracy={"elpv": table}))
    assert "references trained full, pooled; runs at commits a1, b2" in md


# ---------------------------------------------------------------- Flower's round loop


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
    seed0 = _flower_runs()[0]
    seed0["flower_head"] |= {"local_epochs": 1, "lr": 3e-3}
    assert flower.winners(seed0) == {"flower": [(3, 1e-3)], "flower_head": [(1, 3e-3)]}


@pytest.mark.usefixtures("no_heavy_work")
def test_full_flower_searches_the_grid_on_the_first_seed_only_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeds after the first get its winners; an interrupted run keeps finished seeds."""
    _results_dir(tmp_path, monkeypatch, mode="full")
    _recording_demos(monkeypatch)
    bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3)
    fl = {s: r for s, r in zip(SEEDS, _flower_runs(), strict=True)}
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
    _results_dir(tmp_path, monkeypatch, mode="full")
    _recording_demos(monkeypatch)
    bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3)
    fl = {s: r for s, r in zip(SEEDS, _flower_runs(), strict=True)}
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


@pytest.mark.usefixtures("no_heavy_work")
def test_a_dataset_asked_for_by_name_but_absent_fails_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], ["NEU-DET skipped: /x absent"]))
    before = json.dumps(_header()) + "\n"
    (tmp_path / "results.json").write_text(before)
    with pytest.raises(ValueError, match=r"\['neu-det'\] are not available: NEU-DET skipped"):
        bench_run.run_bench(False, tmp_path, only=["demos"], datasets=["neu-det"], resume=True)
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.usefixtures("no_heavy_work")
def test_an_absent_dataset_that_was_not_asked_for_is_not_noted_as_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _results_dir(tmp_path, monkeypatch)
    skipped = "NEU-DET skipped: /x absent"
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], [skipped]))
    _recording_demos(monkeypatch)
    chosen = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1, datasets=["elpv"])
    assert skipped not in chosen["notes"]
    every = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert skipped in every["notes"]
