"""``bench.demo_runs``: the accuracy and cycle tables aggregated over seeded demo runs
(synthetic runs, see ``tests.bench.synthetic``), and what Flower is compared with."""

from __future__ import annotations

import pytest

from bench import demo_runs
from tests.bench.synthetic import (
    WAIT_S,
    fake_run,
    fake_runs,
    fake_scores,
)


def test_accuracy_table_takes_medians_over_seeds_per_edge() -> None:
    t = demo_runs.accuracy_table(fake_runs())
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
    mean = demo_runs.accuracy_table(fake_runs())["mean"]
    # per-seed means 0.9, 0.5, 0.4: median 0.5 (the mean of per-edge medians would be 0.6)
    assert mean["federated"]["median"] == pytest.approx(0.5)
    assert mean["federated"]["min"] == pytest.approx(0.4)
    assert mean["federated"]["max"] == pytest.approx(0.9)
    assert mean["federated"]["runs"] == 3
    # local-only per-seed means 0.45, 0.3, 0.45
    assert mean["local_only"]["median"] == pytest.approx(0.45)
    assert mean["local_only"]["min"] == pytest.approx(0.3)
    assert set(mean) == {"local_only", "base", "server_model", "federated", "majority"}
    assert mean["majority"]["median"] == pytest.approx(0.7)  # edges 0.6 and 0.8


def test_accuracy_table_gives_balanced_accuracy_and_macro_f1_of_the_edge_mean() -> None:
    scores = demo_runs.accuracy_table(fake_runs())["scores"]
    # the same per-seed means as the accuracy's, shifted by the synthetic offsets
    assert scores["balanced_accuracy"]["federated"]["median"] == pytest.approx(0.4)
    assert scores["macro_f1"]["federated"]["median"] == pytest.approx(0.45)
    assert scores["macro_f1"]["local_only"]["min"] == pytest.approx(0.25)
    assert scores["balanced_accuracy"]["centralized"] == {
        "median": 0.8,
        "min": 0.75,
        "max": 0.85,
        "runs": 3,
    }


def test_accuracy_table_gives_the_fine_tuned_model_where_every_run_kept_it() -> None:
    runs = fake_runs()
    assert "candidate" not in demo_runs.accuracy_table(runs)["mean"]
    for r in runs:
        for i, e in enumerate(r["edges"]):
            e["candidate"] = {"accuracy": 0.6 + 0.1 * i + 0.01 * r["seed"]}
    assert demo_runs.accuracy_table(runs)["mean"]["candidate"] == {
        "median": 0.66,
        "min": 0.65,
        "max": 0.67,
        "runs": 3,
    }
    del runs[1]["edges"][0]["candidate"]  # one run from before it was kept: no figure
    assert "candidate" not in demo_runs.accuracy_table(runs)["mean"]


def test_accuracy_table_of_runs_without_the_other_scores_has_none() -> None:
    runs = fake_runs()
    for r in runs:  # as stored before the demo kept balanced accuracy and macro F1
        for e in r["edges"]:
            for key in ("local_only", "base", "server_model", "federated"):
                e[key] = {"accuracy": e[key]["accuracy"]}
            del e["majority"]
        r["centralized"] = {"accuracy": r["centralized"]["accuracy"]}
    t = demo_runs.accuracy_table(runs)
    assert t["scores"] == {}
    assert "majority" not in t["mean"]
    assert t["mean"]["federated"]["median"] == pytest.approx(0.5)


def test_accuracy_table_per_edge_skips_seeds_without_a_score() -> None:
    runs = fake_runs()
    runs[1]["edges"][0]["server_model"] = None
    runs[2]["edges"][0]["server_model"] = fake_scores(0.75)
    first = demo_runs.accuracy_table(runs)["edges"][0]
    assert first["server_model"] == {"median": 0.65, "min": 0.55, "max": 0.75, "runs": 2}


def test_accuracy_table_of_one_run_has_one_run_everywhere() -> None:
    t = demo_runs.accuracy_table([fake_run(2)])
    assert t["seeds"] == [2]
    assert t["edges"][1]["federated"] == {"median": 0.1, "min": 0.1, "max": 0.1, "runs": 1}
    assert t["mean"]["federated"]["median"] == pytest.approx(0.4)
    assert t["centralized"]["runs"] == 1


def test_cycle_stages_pools_every_edge_and_seed_per_stage() -> None:
    c = demo_runs.cycle_stages(fake_runs())
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
    runs = [fake_run(0)]
    for e in runs[0]["edges"]:
        e["stage_seconds"]["finetune"] = 3.14159
    assert demo_runs.cycle_stages(runs)["stages"]["finetune"]["median"] == 3.14


def test_ours_for_flower_edge_compute_excludes_wait() -> None:
    ours = demo_runs.ours_for_flower(fake_runs())
    # per seed: sum over both edges of every stage but wait
    expected = [
        sum(
            v
            for e in r["edges"]
            for k, v in e["stage_seconds"].items()
            if k != "wait"  # 1000 s each: including it would dwarf the rest
        )
        for r in fake_runs()
    ]
    assert expected == pytest.approx([15.7, 19.7, 23.7])
    assert ours["seconds"]["edge_compute"] == {
        "median": 19.7,
        "min": 15.7,
        "max": 23.7,
        "runs": 3,
    }
    assert ours["seconds"]["wall"] == {"median": 20.0, "min": 12.0, "max": 30.0, "runs": 3}
    # the federated rounds of each seed's cycle: 3, 3 and 0
    assert ours["rounds"] == {"median": 3, "min": 0, "max": 3, "runs": 3}


def test_ours_for_flower_bytes_are_upload_plus_download_over_all_edges() -> None:
    ours = demo_runs.ours_for_flower(fake_runs())
    # per seed: uploads (1000 + s) + (2000 + s), downloads 5000 + 5000
    assert ours["bytes_uploaded"] == {"median": 3002, "min": 3000, "max": 3004, "runs": 3}
    assert ours["bytes_downloaded"] == {"median": 10000, "min": 10000, "max": 10000, "runs": 3}
    assert ours["bytes"] == {"median": 13002, "min": 13000, "max": 13004, "runs": 3}


def test_ours_for_flower_accuracy_per_edge_and_mean() -> None:
    acc = demo_runs.ours_for_flower(fake_runs())["accuracy"]
    assert acc["per_edge"] == [
        {"median": 0.7, "min": 0.5, "max": 0.9, "runs": 3},
        {"median": 0.5, "min": 0.1, "max": 0.9, "runs": 3},
    ]
    # the runs' own mean_federated_accuracy (0.9, 0.5, 0.4), median over seeds
    assert acc["mean"] == {"median": 0.5, "min": 0.4, "max": 0.9, "runs": 3}
