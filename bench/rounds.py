"""``python -m bench.rounds``: does a cycle gain from federated fine-tuning rounds?

Whole demo runs (a server and three edges as processes on loopback, stage-2-only
references) of each round recipe on the same seeds: the one-shot cycle (R = 0) beside
cycles with R rounds. Per recipe: the mean federated test accuracy (the model each
edge's gate deployed), balanced accuracy and macro F1, medians over the seeds with their
range; each round's model on each edge's test split (reporting only, as the demo's table
shows it); bytes on the wire and the cycle's wall time. Every run trains the same way
but for the recipe's server settings. ``--resume`` keeps the runs already in the results
and runs only the missing (recipe, seed) pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.stats import summary, write_results
from fedinspect.demo import DemoOptions, run_demo

#: name -> (what it is, server settings as ``--set server.KEY=VALUE`` would give them)
RECIPES: dict[str, tuple[str, dict[str, str]]] = {
    "r0": ("one-shot cycle (R = 0)", {"ROUNDS": "0"}),
    "r2": (
        "R = 2: b13 up, 1 local epoch, lr 3e-4, blocks at the full rate",
        {
            "ROUNDS": "2",
            "ROUND_TRAIN_FROM": "b13",
            "ROUND_EPOCHS": "1",
            "ROUND_LR": "3e-4",
            "ROUND_BACKBONE_LR_SCALE": "1.0",
        },
    ),
    "r3-flower": (
        "R = 3: b13 up, 3 local epochs, lr 1e-3, blocks at 0.1x (Flower's best FedAvg "
        "point; the other ROUND_* defaults)",
        {
            "ROUNDS": "3",
            "ROUND_TRAIN_FROM": "b13",
            "ROUND_EPOCHS": "3",
            "ROUND_LR": "1e-3",
            "ROUND_BACKBONE_LR_SCALE": "0.1",
        },
    ),
    "r3": (
        "R = 3 at the ROUND_* defaults: the edges' fine-tuning stage up (b15 for "
        "efficientnet_lite0), 3 local epochs, lr 1e-3, blocks at 0.1x",
        {"ROUNDS": "3"},
    ),
    "r3-head": (
        "R = 3: the head only, 1 local epoch, lr 1e-3",
        {"ROUNDS": "3", "ROUND_TRAIN_FROM": "upper", "ROUND_EPOCHS": "1", "ROUND_LR": "1e-3"},
    ),
    "r3e1-ft1": (
        "R = 3 of 1 local epoch, then 1 epoch of fine-tuning on each edge (about a third "
        "of r3's training; the references fine-tune for 1 epoch too)",
        {"ROUNDS": "3", "ROUND_EPOCHS": "1"},
    ),
    "r4e1": (
        "R = 4 of 1 local epoch, the blocks at the head's rate (Flower's first grid point "
        "on elpv at 300 px); the edges' fine-tuning as shipped",
        {"ROUNDS": "4", "ROUND_EPOCHS": "1", "ROUND_BACKBONE_LR_SCALE": "1.0"},
    ),
    "r3-last": (
        "R = 3 at the ROUND_* defaults, then no fine-tuning: each edge's gate weighs the "
        "model it trained in the last round against the server's final model "
        "(AFTER_ROUNDS=last_round)",
        {"ROUNDS": "3"},
    ),
    "r3-int8": (
        "R = 3 at the ROUND_* defaults, updates both ways in int8 (ROUND_DTYPE=int8)",
        {"ROUNDS": "3", "ROUND_DTYPE": "int8"},
    ),
    "r5-int8": (
        "R = 5 at the other ROUND_* defaults, updates both ways in int8 (Flower's best "
        "point on elpv seed 0 peaked at round 5)",
        {"ROUNDS": "5", "ROUND_DTYPE": "int8"},
    ),
}

#: edge settings a recipe changes (the rest are the demo's)
EDGE_SETTINGS: dict[str, dict[str, str]] = {
    "r3e1-ft1": {"FINETUNE_EPOCHS": "1"},
    "r3-last": {"AFTER_ROUNDS": "last_round"},
}


def demo_settings(recipe: str) -> dict[str, dict[str, str]]:
    """``recipe``'s settings per service, as ``fedinspect demo --set`` gives them."""
    out = {"server": dict(RECIPES[recipe][1])}
    if recipe in EDGE_SETTINGS:
        out["edge"] = dict(EDGE_SETTINGS[recipe])
    return out


def _mean(rows: list[dict[str, Any]], key: str, metric: str) -> float:
    return statistics.fmean(float(r[key][metric]) for r in rows)


def one_run(recipe: str, seed: int, input_size: int) -> dict[str, Any]:
    """One demo run of ``recipe`` on ``seed``: what the bench keeps of it."""
    started = time.monotonic()
    res = run_demo(
        DemoOptions(
            edges=3,
            dataset="elpv",
            seed=seed,
            input_size=input_size,
            references="pooled",
            settings=demo_settings(recipe),
        )
    )
    rows = res["edges"]
    n_rounds = max(len(r["rounds"]) for r in rows)
    per_round = []
    for i in range(n_rounds):
        tests = [r["rounds"][i]["test"] for r in rows if i < len(r["rounds"])]
        per_round.append(
            {
                "round": i + 1,
                "model": "the round's model as received",
                "mean_accuracy": round(statistics.fmean(t["accuracy"] for t in tests), 4),
            }
        )
    return {
        "recipe": recipe,
        "seed": seed,
        "federated": {
            m: round(_mean(rows, "federated", m), 4)
            for m in ("accuracy", "balanced_accuracy", "macro_f1")
        },
        "server_model": round(_mean(rows, "server_model", "accuracy"), 4),
        # each edge's fine-tuned model on its test split, whether its gate deployed it or not
        "candidate": round(_mean(rows, "candidate", "accuracy"), 4)
        if all(r.get("candidate") for r in rows)
        else None,
        "per_edge": [r["federated"]["accuracy"] for r in rows],
        "rounds": per_round,
        "bytes": res["bytes"],
        "bytes_rounds_uploaded": sum(rr["bytes_uploaded"] for r in rows for rr in r["rounds"]),
        "cycle_seconds": res["cycle"]["seconds"],
        "wall_seconds": round(time.monotonic() - started, 1),
        "centralized": res["centralized"],
        "settings": res["settings"]["set"],
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for recipe in RECIPES:
        mine = [r for r in runs if r["recipe"] == recipe]
        if not mine:
            continue
        out[recipe] = {
            "seeds": sorted(r["seed"] for r in mine),
            "accuracy": summary([r["federated"]["accuracy"] for r in mine], 4),
            "balanced_accuracy": summary([r["federated"]["balanced_accuracy"] for r in mine], 4),
            "macro_f1": summary([r["federated"]["macro_f1"] for r in mine], 4),
            "server_model": summary([r["server_model"] for r in mine], 4),
            "bytes": summary([r["bytes"]["uploaded"] + r["bytes"]["downloaded"] for r in mine], 0),
            "cycle_seconds": summary([r["cycle_seconds"] for r in mine], 1),
        }
    return out


def _pct(s: dict[str, Any]) -> str:
    if s["median"] is None:
        return "-"
    return f"{100 * s['median']:.1f} ({100 * s['min']:.1f}-{100 * s['max']:.1f})"


def page(results: dict[str, Any]) -> str:
    lines = [
        "# Federated fine-tuning rounds",
        "",
        f"`{results['command']}` on {results['machine']['cpu']} "
        f"({results['machine']['cores']} cores, commit {results['machine']['git_commit']}); "
        "elpv, three non-iid edges, "
        f"{results['input_size']} px, stage-2-only references. Medians over the seeds "
        "(min-max) of the mean over edges of the deployed model's test accuracy.",
        "",
        "| recipe | seeds | federated acc | balanced | macro F1 | last server model | "
        "MB on the wire | cycle s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for recipe, a in results["summary"].items():
        mb = a["bytes"]["median"] / 1e6
        lines.append(
            f"| {recipe}: {RECIPES[recipe][0]} | {','.join(map(str, a['seeds']))} "
            f"| {_pct(a['accuracy'])} "
            f"| {_pct(a['balanced_accuracy'])} | {_pct(a['macro_f1'])} "
            f"| {_pct(a['server_model'])} | {mb:.1f} | {a['cycle_seconds']['median']:.0f} |"
        )
    lines += ["", "Each run, the mean accuracy of each round's model as the edges received it:", ""]
    for r in results["runs"]:
        curve = ", ".join(f"{100 * p['mean_accuracy']:.1f}" for p in r["rounds"]) or "-"
        lines.append(
            f"- {r['recipe']}, seed {r['seed']}: rounds' models {curve}; last server model "
            f"{100 * r['server_model']:.1f}; deployed {100 * r['federated']['accuracy']:.1f}"
        )
    return "\n".join(lines) + "\n"


def run(
    out: Path, seeds: list[int], recipes: list[str], input_size: int, resume: bool
) -> dict[str, Any]:
    """Every (seed, recipe) run not in ``out`` yet; results written after each run."""
    from bench.run import _machine

    path = out / "results.json"
    runs: list[dict[str, Any]] = []
    if resume and path.exists():
        old = json.loads(path.read_text())
        if old.get("input_size") == input_size:
            runs = old["runs"]
    results: dict[str, Any] = {}
    command = (
        f"python -m bench.rounds --out {out} --seeds {' '.join(map(str, seeds))} "
        f"--recipes {' '.join(recipes)} --input-size {input_size}" + (" --resume" if resume else "")
    )
    for seed in seeds:
        for recipe in recipes:
            if any(r["recipe"] == recipe and r["seed"] == seed for r in runs):
                continue
            runs.append(one_run(recipe, seed, input_size))
            results = {
                "command": command,
                "machine": _machine(),
                "input_size": input_size,
                "runs": runs,
                "summary": aggregate(runs),
            }
            write_results(out, results, page(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/rounds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, args.seeds, args.recipes, args.input_size, args.resume)


if __name__ == "__main__":
    main()
