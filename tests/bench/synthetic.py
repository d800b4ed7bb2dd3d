"""Synthetic bench results for the tests of ``bench``'s pure parts: no demo, no
training, no network.

The runs have the shape of ``fedinspect.demo.run_demo``'s result; the numbers are
picked so that the median over seeds, the mean over edges and their order of
application give different answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import demo_runs

EDGE_NAMES = ("edge-1", "edge-2")
SEEDS = (0, 1, 2)
# federated accuracy per seed (rows) and edge (columns): per-edge medians 0.7 / 0.5
# (mean of medians 0.6), per-seed means 0.9 / 0.5 / 0.4 (median of means 0.5)
FEDERATED = ((0.9, 0.9), (0.5, 0.5), (0.7, 0.1))
LOCAL_ONLY = ((0.6, 0.3), (0.4, 0.2), (0.5, 0.4))
CENTRALIZED = (0.95, 0.85, 0.9)
CYCLE_S = (30.0, 12.0, 20.0)
TOTAL_S = (100.0, 80.0, 90.0)
#: federated rounds of each seed's cycle (the last seed's cycle ran one-shot)
ROUNDS = (3, 3, 0)
WAIT_S = 1000.0  # idle time an edge spends waiting for the others: never compute


def fake_scores(acc: float | None) -> dict[str, float] | None:
    if acc is None:
        return None
    return {
        "accuracy": acc,
        "balanced_accuracy": round(acc - 0.1, 4),
        "macro_f1": round(acc - 0.05, 4),
    }


def fake_edge(
    i: int, seed: int, server_model: float | None = 0.55, uploaded: int = 1000
) -> dict[str, Any]:
    return {
        "name": EDGE_NAMES[i],
        "dataset": f"elpv:type=part{i}",
        "n_train": 100 + i,
        "n_test": 40,
        "local_only": fake_scores(LOCAL_ONLY[seed][i]),
        "base": fake_scores(0.5),
        "server_model": fake_scores(server_model),
        "federated": fake_scores(FEDERATED[seed][i]),
        "majority": 0.6 + 0.2 * i,  # always answering the edge's most frequent class
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


def fake_run(seed: int, edges: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One ``run_demo`` result, with the totals computed the way ``run_demo`` does."""
    rows = edges if edges is not None else [fake_edge(i, seed) for i in range(len(EDGE_NAMES))]
    return {
        "dataset": "elpv",
        "quick": True,
        "seed": seed,
        "input_size": 224,
        "backbone": "efficientnet_lite0",
        "class_names": ["functional", "defective"],
        "edges": rows,
        "centralized": fake_scores(CENTRALIZED[seed]),
        "mean_federated_accuracy": round(
            sum(r["federated"]["accuracy"] for r in rows) / len(rows), 4
        ),
        "cycle": {
            "id": f"c{seed}",
            "model_version": 2,
            "seconds": CYCLE_S[seed],
            "rounds": ROUNDS[seed],
        },
        "bytes": {
            k: sum(r["bytes"][k] for r in rows) for k in ("uploaded", "downloaded", "raw_images")
        },
        "references_seconds": 5.0,
        "total_seconds": TOTAL_S[seed],
    }


def fake_runs() -> list[dict[str, Any]]:
    return [fake_run(s) for s in SEEDS]


def fake_flower_seed(seed: int, mean: float, reach: int | None) -> dict[str, Any]:
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


def fake_old_flower_seed(seed: int, mean: float) -> dict[str, Any]:
    """The same, as stored by the earlier protocol (chosen on test, accuracy alone)."""
    new = fake_flower_seed(seed, mean, None)
    gone = ("selection", "balanced_accuracy", "macro_f1", "val_accuracy", "test_selected")
    return {k: v for k, v in new.items() if k not in gone and k != "history_val_mean"}


def fake_flower_runs() -> list[dict[str, Any]]:
    means = (0.8, 0.6, 0.7)
    reach = (2, None, 5)
    return [
        {
            "flower": fake_flower_seed(s, means[s], reach[s]),
            "flower_head": fake_flower_seed(s, means[s] - 0.2, None),
            "engine": "flwr FedAvg",
            "seed": s,
        }
        for s in SEEDS
    ]


def fake_header(**extra: Any) -> dict[str, Any]:
    """What ``run_bench`` writes before any section runs."""
    return {
        "mode": "quick",
        "command": "python -m bench --quick --out /tmp/x",
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


def results_dir_with_header(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    names: tuple[str, ...] = ("elpv",),
    **header: Any,
) -> None:
    """``tmp_path`` holds a bench's header (with ``header``) and the demos find the
    datasets ``names``."""
    monkeypatch.setattr(demo_runs, "datasets", lambda: (list(names), []))
    (tmp_path / "results.json").write_text(json.dumps(fake_header(**header)))


def recording_demos(
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
            out.append(fake_run(s) | {"dataset": ds})
        return out

    monkeypatch.setattr(demo_runs, "run_demos", demos)
    return asked
