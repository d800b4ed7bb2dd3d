"""Cycle time and accuracy, from whole demo runs (real processes on loopback).

``fedinspect.demo.run_demo`` runs one cycle with a server and three edges and trains
the local-only and centralized references with the same code; its results dict has the
per-edge accuracies, bytes and stage seconds this module aggregates over seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.stats import summary
from fedinspect.demo import DemoOptions, run_demo

ROOT = Path(__file__).resolve().parents[1]
NEU_DET = ROOT.parent / "shared" / "data" / "neu-det"


def datasets() -> tuple[list[str], list[str]]:
    """(datasets to run, notes about skipped ones)."""
    if NEU_DET.is_dir():
        return ["elpv", str(NEU_DET)], []
    return ["elpv"], [f"NEU-DET skipped: {NEU_DET} is absent"]


def run_demos(dataset: str, quick: bool, seeds: list[int]) -> list[dict[str, Any]]:
    return [run_demo(DemoOptions(edges=3, quick=quick, dataset=dataset, seed=s)) for s in seeds]


def _acc(row: dict[str, Any], key: str, metric: str = "accuracy") -> float | None:
    value = row.get(key)
    if value is None or value.get(metric) is None:  # runs from before a metric was kept
        return None
    return float(value[metric])


#: what the accuracy table's ``scores`` give beside the accuracy, where the runs keep it
OTHER_METRICS = ("balanced_accuracy", "macro_f1")


def _edge_means(runs: list[dict[str, Any]], key: str, metric: str) -> list[float]:
    """Per run, the mean of ``metric`` over its edges (runs missing it on an edge: left out)."""
    means = []
    for r in runs:
        values = [_acc(e, key, metric) for e in r["edges"]]
        if values and all(v is not None for v in values):
            means.append(statistics.fmean(v for v in values if v is not None))
    return means


def accuracy_table(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per edge and mean: local-only, base, stage-2 server model, federated; centralized."""
    keys = ("local_only", "base", "server_model", "federated")
    edges = []
    for i, first in enumerate(runs[0]["edges"]):
        row: dict[str, Any] = {"name": first["name"], "dataset": first["dataset"]}
        for key in keys:
            values = [v for r in runs if (v := _acc(r["edges"][i], key)) is not None]
            row[key] = summary(values, 4)
        edges.append(row)
    mean = {
        key: summary([statistics.fmean(_acc(e, key) or 0.0 for e in r["edges"]) for r in runs], 4)
        for key in keys
    }
    majority = [
        statistics.fmean(float(e["majority"]) for e in r["edges"])
        for r in runs
        if all(e.get("majority") is not None for e in r["edges"])
    ]
    if majority:  # always answering the edge's most frequent class
        mean["majority"] = summary(majority, 4)
    candidate = _edge_means(runs, "candidate", "accuracy")
    if len(candidate) == len(runs):  # the fine-tuned model, deployed or not
        mean["candidate"] = summary(candidate, 4)
    # balanced accuracy and macro F1 of the edges' mean, and of the centralized reference
    scores: dict[str, dict[str, Any]] = {}
    for metric in OTHER_METRICS:
        row = {key: summary(means, 4) for key in keys if (means := _edge_means(runs, key, metric))}
        central = [v for r in runs if (v := _acc(r, "centralized", metric)) is not None]
        if central:
            row["centralized"] = summary(central, 4)
        if row:
            scores[metric] = row
    return {
        "seeds": [r["seed"] for r in runs],
        # how the local-only and centralized references were trained, and at which commit
        "references": sorted({r.get("references", "full") for r in runs}),
        "commits": sorted({c for r in runs if (c := r.get("bench_commit"))}),
        "quick": runs[0]["quick"],
        "input_size": runs[0]["input_size"],
        "edges": edges,
        "mean": mean,
        "centralized": summary([r["centralized"]["accuracy"] for r in runs], 4),
        "scores": scores,
    }


def cycle_stages(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds of each stage (median over edges and seeds) and of the whole cycle."""
    stages: dict[str, list[float]] = {}
    for r in runs:
        for e in r["edges"]:
            for stage, seconds in e["stage_seconds"].items():
                stages.setdefault(stage, []).append(float(seconds))
    return {
        "cycle_s": summary([r["cycle"]["seconds"] for r in runs], 1),
        "demo_total_s": summary([r["total_seconds"] for r in runs], 1),
        "stages": {k: summary(v, 2) for k, v in stages.items()},
    }


def _ours_of(run: dict[str, Any]) -> dict[str, Any]:
    """One demo run's federated result: mean and per-edge accuracy, bytes moved (up and
    down, all edges) and the cycle's wall seconds."""
    return {
        "mean": run["mean_federated_accuracy"],
        "per_edge": [e["federated"]["accuracy"] for e in run["edges"]],
        "bytes": run["bytes"]["uploaded"] + run["bytes"]["downloaded"],
        "wall": run["cycle"]["seconds"],
    }


def ours_for_flower(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Our federated result in Flower's terms: accuracy, bytes, seconds."""
    each = [_ours_of(r) for r in runs]
    per_edge = [summary([o["per_edge"][i] for o in each], 4) for i in range(len(runs[0]["edges"]))]
    compute = []
    for r in runs:
        total = 0.0
        for e in r["edges"]:
            total += sum(v for k, v in e["stage_seconds"].items() if k != "wait")
        compute.append(total)
    return {
        "accuracy": {
            "per_edge": per_edge,
            "mean": summary([o["mean"] for o in each], 4),
        },
        "bytes": summary([o["bytes"] for o in each], 0),
        "bytes_uploaded": summary([r["bytes"]["uploaded"] for r in runs], 0),
        "bytes_downloaded": summary([r["bytes"]["downloaded"] for r in runs], 0),
        "seconds": {
            "wall": summary([o["wall"] for o in each], 1),
            "edge_compute": summary(compute, 1),
        },
        # federated fine-tuning rounds of each run's cycle (0: the one-shot cycle)
        "rounds": summary([float(r["cycle"].get("rounds") or 0) for r in runs], 0),
        "seeds": [r["seed"] for r in runs],
    }


def ours_per_seed(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Our cycle on each seed (its own splits), to set beside Flower's run on that seed."""
    return {r["seed"]: _ours_of(r) for r in runs}


__all__ = [
    "accuracy_table",
    "cycle_stages",
    "datasets",
    "ours_for_flower",
    "ours_per_seed",
    "run_demos",
]
