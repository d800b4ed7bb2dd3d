"""``python -m bench``: run every benchmark and write results.json and results.md.

Quick (``--quick``, under 10 minutes on 2 cores): one size for extraction, K = 10, 50,
200 edges with 2 uploads each, the quick demo on elpv and NEU-DET with one seed, and
Flower on the quick elpv plan (6 rounds, one grid point). Full: 224 and 160 px, 5
uploads per edge and 3 repeats per K, the full demo on both datasets over 3 seeds (plus
the quick demo for its cycle time), Flower on the full plan for every seed. Sections
that fail are recorded with their error and the rest still runs. ``--only`` runs some
sections into an existing results.json; ``flower`` reads our results (``ours``) from
the demos section's, so it can run later, on its own.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import demo_runs, extraction, flower, ingest, limit, wire
from bench.report import to_markdown
from bench.stats import write_results


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "git_commit": commit or None,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _section(name: str, results: dict[str, Any], work: Callable[[], Any]) -> Any:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    began = time.monotonic()
    try:
        value = work()
    except Exception as exc:  # one broken section must not lose the others
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        value = None
    results.setdefault("section_seconds", {})[name] = round(time.monotonic() - began, 1)
    print(f"[bench] {name} done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    return value


SECTIONS = ("extraction", "wire", "ingest", "limit", "demos", "flower")
DATASET_LABELS = ("elpv", "neu-det")
#: what the flower section writes (beside ``ours``, which the demos section writes)
FLOWER_KEYS = ("flower", "flower_head", "same_seed", "engine")
#: under DIR: the Flower grid point in progress, after its last round (not committed)
FLOWER_SCRATCH = "flower_running"


def _forget_comparison(results: dict[str, Any], label: str) -> None:
    """Drop one dataset's Flower summaries and error: they compare with our numbers."""
    (results.get("errors") or {}).pop(f"flower {label}", None)
    holder = results if label == "elpv" else (results.get("neu_det_flower") or {})
    for key in FLOWER_KEYS:
        holder.pop(key, None)


def _forget_flower(results: dict[str, Any], label: str) -> None:
    """Drop one dataset's Flower results and errors: they compare with our old numbers."""
    _forget_comparison(results, label)
    (results.get("flower_runs") or {}).pop(label, None)
    (results.get("flower_partial") or {}).pop(label, None)


def _flower_dataset(label: str) -> str:
    """The dataset Flower and the demos run for ``label``."""
    return "elpv" if label == "elpv" else str(demo_runs.NEU_DET)


def _ours_change(results: dict[str, Any], label: str, quick: bool) -> None:
    """Our runs of one dataset are about to change: Flower's comparison with them goes
    (it is made again from the new runs), and so do Flower's runs made on another plan
    than today's. Flower's runs on today's plan stay: they depend on the partitions and
    the fine-tuning recipe (:func:`bench.flower.recipe_tag`), not on our cycle's
    settings, and a seed of them takes hours. Grid points of a seed in progress stay
    too (they are keyed by the recipe alone)."""
    _forget_comparison(results, label)
    stored = results.get("flower_runs") or {}
    ds = _flower_dataset(label)
    kept = [
        r
        for r in stored.get(label) or []
        if r.get("plan") == flower.plan_tag(flower.seed_plan(quick, ds, r["seed"]))
    ]
    if kept:
        stored[label] = kept
    else:
        stored.pop(label, None)


def _forget_demos(results: dict[str, Any], label: str, quick: bool) -> None:
    """Drop one dataset's demo runs and everything computed from them."""
    _ours_change(results, label, quick)
    (results.get("errors") or {}).pop(f"demo {label}", None)
    (results.get("demo_runs") or {}).pop(label, None)
    (results.get("accuracy") or {}).pop(label, None)
    if label == "elpv":
        results.pop("ours", None)
        results.pop("cycle", None)
        (results.get("errors") or {}).pop("demo elpv quick (cycle time)", None)
    else:
        (results.get("neu_det_flower") or {}).pop("ours", None)


def _forget(
    results: dict[str, Any],
    name: str,
    datasets: list[str],
    resume: bool = False,
    quick: bool = False,
) -> None:
    """Drop a section's old results and errors before it runs again.

    Demos and Flower: the chosen datasets' runs, unless ``resume`` keeps them (seeds
    already run are then skipped); old and new runs never mix otherwise. Flower's runs
    outlive a rerun of our demos where their plan is today's (:func:`_ours_change`).
    """
    (results.get("errors") or {}).pop(name, None)
    for label in datasets:
        if name == "flower" and not resume:
            _forget_flower(results, label)
        elif name == "demos" and not resume:
            _forget_demos(results, label, quick)


def run_bench(
    quick: bool,
    out: Path,
    only: list[str] | None = None,
    seeds: int | None = None,
    datasets: list[str] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the benchmarks; with ``only``, rerun those sections into DIR's results.json.

    ``datasets`` limits the demos and Flower to some of ``DATASET_LABELS``; ``resume``
    keeps the demo and Flower runs already in results.json and runs only the missing
    seeds.
    """
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    unknown = sorted(set(only or []) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    bad = sorted(set(datasets or []) - set(DATASET_LABELS))
    if bad:
        raise ValueError(f"unknown datasets {bad}; choose from {list(DATASET_LABELS)}")
    if resume and not {"demos", "flower"} & set(only or []):
        raise ValueError(
            "--resume adds seeds to DIR's results.json: use it with --only demos or --only flower"
        )
    if datasets and {"demos", "flower"} & set(only or SECTIONS):
        found, notes = demo_runs.datasets()
        absent = sorted(set(datasets) - {_label(ds) for ds in found})
        if absent:  # asked for by name: fail now, not after an hour of other sections
            raise ValueError(f"datasets {absent} are not available: {'; '.join(notes)}")
    chosen = list(datasets or DATASET_LABELS)
    path = out / "results.json"
    if only and path.is_file():
        results: dict[str, Any] = json.loads(path.read_text())
        rerun: dict[str, Any] = {
            "sections": only,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
        }
        if datasets:
            rerun["datasets"] = chosen
        if resume:
            rerun["resume"] = True
        if seeds:
            rerun["seeds"] = seeds
        results.setdefault("reruns", []).append(rerun)
        for name in only:
            _forget(results, name, chosen, resume, quick)
    else:
        results = {
            "mode": "quick" if quick else "full",
            "command": f"python -m bench{' --quick' if quick else ''} --out {out}"
            + (f" --seeds {seeds}" if seeds else "")
            + "".join(f" --only {name}" for name in only or [])
            + "".join(f" --dataset {name}" for name in datasets or []),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "notes": [],
        }

    def want(section: str) -> bool:
        return not only or section in only

    def save() -> None:
        write_results(out, results, to_markdown(results))

    if want("extraction"):
        results["extraction"] = _section("extraction", results, lambda: extraction.run(quick))
        save()
    if want("wire"):
        measured = (results.get("wire") or {}).get("measured_in_demo")
        results["wire"] = _section("wire", results, lambda: wire.run(quick))
        if measured and results["wire"]:
            results["wire"]["measured_in_demo"] = measured
        save()
    if want("ingest"):
        results["ingest"] = _section("ingest", results, lambda: ingest.run(quick))
        save()
    if want("limit"):
        results["limit"] = _section("limit", results, lambda: limit.section(quick))
        save()
    if want("demos"):
        _demos(quick, results, save, list(range(seeds or (1 if quick else 3))), chosen)
    if want("flower"):
        scratch = out / FLOWER_SCRATCH
        if not resume:  # a fresh Flower run: no point goes on from an older one
            for label in chosen:
                for stale in scratch.glob(f"{label}-seed*.safetensors"):
                    stale.unlink()
        _flowers(quick, results, save, chosen, scratch)
    if not only:
        results["total_seconds"] = round(time.monotonic() - started, 1)
    save()
    return results


def _label(dataset: str) -> str:
    return "elpv" if dataset == "elpv" else "neu-det"


def _missing(runs: list[dict[str, Any]], seeds: list[int]) -> list[int]:
    """The seeds of ``seeds`` that ``runs`` has no result for, in order."""
    done = {r["seed"] for r in runs}
    return [s for s in seeds if s not in done]


def _run_seeds(
    section: str,
    results: dict[str, Any],
    save: Callable[[], None],
    runs: list[dict[str, Any]],
    seeds: list[int],
    run_seed: Callable[[int], dict[str, Any]],
    aggregate: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Run the seeds missing from ``runs`` one by one as ``section``; keep, aggregate and
    save each as it finishes (a full seed takes an hour or more on two cores). With
    none missing, aggregate the stored runs."""
    todo = _missing(runs, seeds)

    def work() -> None:
        for seed in todo:
            runs.append(run_seed(seed))
            runs.sort(key=lambda done_run: done_run["seed"])
            aggregate(runs)
            save()

    if todo:
        _section(section, results, work)
    elif runs:
        aggregate(runs)


def _demos(
    quick: bool,
    results: dict[str, Any],
    save: Callable[[], None],
    seeds: list[int],
    datasets: list[str],
) -> None:
    """Cycle time, accuracy and our results in Flower's terms: all from whole demo runs.

    Every finished run is kept in ``demo_runs`` and the tables are recomputed from all
    of them, so a full bench (hours per seed) can be built up over several invocations
    (``--resume``): seeds already there are not run again.
    """
    names, notes = demo_runs.datasets()
    if "neu-det" in datasets:  # the one that can be absent: not asked for, not skipped
        results["notes"] = sorted(set(results.get("notes", [])) | set(notes))
    stored: dict[str, list[dict[str, Any]]] = results.setdefault("demo_runs", {})
    commit = (results.get("machine") or {}).get("git_commit")
    for ds in names:
        label = _label(ds)
        if label not in datasets:
            continue
        runs = stored.setdefault(label, [])
        if _missing(runs, seeds):
            # new runs change our numbers: Flower's old comparison with them is stale
            _ours_change(results, label, quick)
            (results.get("errors") or {}).pop(f"demo {label}", None)

        def one(seed: int, ds: str = ds) -> dict[str, Any]:
            at = _machine_commit() or commit  # the code this run starts with
            return demo_runs.run_demos(ds, quick, [seed])[0] | {"bench_commit": at}

        def aggregate(runs: list[dict[str, Any]], label: str = label) -> None:
            _aggregate(label, runs, results)

        _run_seeds(f"demo {label}", results, save, runs, seeds, one, aggregate)
        kept = (results.get("flower_runs") or {}).get(label)
        ours = _flower_block(results, label).get("ours")
        if kept and ours:  # Flower's runs that outlived ours, beside the new ones
            flower.refresh_reach(kept, ours["accuracy"]["mean"]["median"])
            _aggregate_flower(label, kept, results)
    cycle: dict[str, Any] = dict(results.get("cycle") or {})
    elpv = stored.get("elpv")
    if elpv:
        stages = demo_runs.cycle_stages(elpv)
        if quick:
            cycle["quick_s"] = stages["cycle_s"]
            cycle["full_s"] = None
        else:
            cycle["full_s"] = stages["cycle_s"]
            if not cycle.get("quick_s"):
                quick_runs = _section(
                    "demo elpv quick (cycle time)",
                    results,
                    lambda: demo_runs.run_demos("elpv", True, [0]),
                )
                cycle["quick_s"] = (
                    demo_runs.cycle_stages(quick_runs)["cycle_s"] if quick_runs else None
                )
        cycle["stages"] = stages["stages"]
        cycle["demo_total_s"] = stages["demo_total_s"]
        measured = [
            {k: e["bytes"][k] for k in ("uploaded", "downloaded", "raw_images")}
            | {"name": e["name"], "n_train": e["n_train"]}
            for e in elpv[0]["edges"]
        ]
        if results.get("wire"):
            results["wire"]["measured_in_demo"] = measured
    results["cycle"] = cycle
    save()


def _machine_commit() -> str | None:
    return _machine().get("git_commit")


def _aggregate(label: str, runs: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """The accuracy table and our Flower-side figures of one dataset, from its runs."""
    results.setdefault("accuracy", {})[label] = demo_runs.accuracy_table(runs)
    _flower_block(results, label)["ours"] = demo_runs.ours_for_flower(runs)


def _flower_block(results: dict[str, Any], label: str) -> dict[str, Any]:
    """Where one dataset's ``ours`` and Flower results live: elpv's at the top level
    (the keys the issue names), NEU-DET's under ``neu_det_flower``."""
    return results if label == "elpv" else results.setdefault("neu_det_flower", {})


def _flowers(
    quick: bool,
    results: dict[str, Any],
    save: Callable[[], None],
    datasets: list[str],
    scratch: Path | None = None,
) -> None:
    """Flower's FedAvg on the demos' plans and seeds, against our results in ``results``.

    Each seed's result is kept in ``flower_runs`` as it finishes; the full bench
    searches the grid on the first seed and gives the others its winners. Within a
    seed, each finished grid point is kept in ``flower_partial`` (by dataset, seed,
    configuration and point) until the seed is done, so ``--resume`` goes on from there;
    the point in progress keeps its state after every round in ``scratch``.
    """
    stored: dict[str, list[dict[str, Any]]] = results.setdefault("flower_runs", {})
    partial: dict[str, dict[str, Any]] = results.setdefault("flower_partial", {})
    neu_det = results.get("neu_det_flower") or {}
    for label, ours in (("elpv", results.get("ours")), ("neu-det", neu_det.get("ours"))):
        if label not in datasets:
            continue
        if not ours:
            if label == "elpv":
                results.setdefault("errors", {})["flower elpv"] = (
                    "no result of ours to compare with: run the demos section first"
                )
            continue
        if quick and label != "elpv":
            # Flower on NEU-DET doubles the quick bench's longest section; the full bench runs it
            results["notes"] = sorted(
                set(results.get("notes", []))
                | {"quick: Flower runs on elpv only (the full bench adds NEU-DET)"}
            )
            continue
        target = ours["accuracy"]["mean"]["median"]
        ds = _flower_dataset(label)
        seeds = ours.get("seeds") or results["accuracy"][label]["seeds"]
        runs = stored.setdefault(label, [])

        def one(
            seed: int,
            ds: str = ds,
            target: float = target,
            runs: list[Any] = runs,
            label: str = label,
        ) -> dict[str, Any]:
            grids = flower.winners(runs[0]) if runs and not quick else None
            at = _machine_commit()  # the code this seed starts with
            kept = partial.setdefault(label, {}).setdefault(str(seed), {})
            run = flower.run(quick, ds, seed, target, grids, kept, save, scratch)
            partial[label].pop(str(seed))  # saved with the seed's result, next
            if not partial[label]:
                partial.pop(label)
            return run | {"bench_commit": at}

        def aggregate(runs: list[dict[str, Any]], label: str = label) -> None:
            _aggregate_flower(label, runs, results)

        _run_seeds(f"flower {label}", results, save, runs, seeds, one, aggregate)
        save()
    if not partial:
        results.pop("flower_partial")


def _aggregate_flower(label: str, runs: list[dict[str, Any]], results: dict[str, Any]) -> None:
    ours = demo_runs.ours_per_seed((results.get("demo_runs") or {}).get(label, []))
    _flower_block(results, label).update(
        {
            "flower": flower.summarize(runs, "flower"),
            "flower_head": flower.summarize(runs, "flower_head"),
            "same_seed": flower.same_seed(runs, ours),
            "engine": runs[0]["engine"],
        }
    )


__all__ = ["SECTIONS", "run_bench"]
