"""What each privacy mode costs the server's model (stage 2), on label-skewed edges.

``python -m bench.stage2 --out bench/results/stage2`` extracts the pooled features of
each dataset once (efficientnet_lite0, ImageNet weights, at the dataset's input size),
then for each seed: a stratified 75/25 train/test split, the training part spread over
3 edges by Dirichlet(alpha) label skew, and for each privacy configuration every edge's
upload built, validated and decoded exactly as on the wire (``pack_upload`` /
``unpack_upload`` / ``training_rows``), the part above the cut trained on them with the
server's defaults, and the model scored on the clean test features: pooled, and on each
edge's share of the test split (split by the same skew) beside always answering that
share's majority class. Medians over seeds, with min-max.

Datasets: elpv at 300 px (the demo's size) and 224 px; NEU-DET at 224 px, 6 classes and
relabelled to two (``crazing`` against the rest), when ``../shared/data/neu-det`` exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.stats import write_results
from fl_core.data import (
    ImageSet,
    dirichlet_indices,
    load_elpv,
    load_image_folder,
    stratified_indices,
)
from fl_core.features import extract_images, make_spec
from fl_core.model import build_split_model
from fl_core.onnx_runtime import lower_runner
from fl_core.privacy import pack_upload, training_rows, unpack_upload
from fl_core.schemas import EvalMetrics, PrivacyConfig
from fl_core.training import UpperTrainConfig, evaluate_features, train_upper

NEU_DET = Path(__file__).resolve().parents[2] / "shared" / "data" / "neu-det"

#: the configurations compared, by name; "default" is what a server uses unless told
CONFIGS: dict[str, PrivacyConfig] = {
    "rows, no noise": PrivacyConfig(mode="pooled"),
    "rows, clip 24, sigma 2": PrivacyConfig(mode="pooled", clip_norm=24.0, noise_sigma=2.0),
    "stats, diagonal": PrivacyConfig(mode="stats", stats_rank=0),
    "stats, rank 32 (default)": PrivacyConfig(mode="stats"),
}
REFERENCE = "rows, no noise"


@dataclass(frozen=True)
class Dataset:
    name: str
    input_size: int
    relabel: dict[int, int] | None = None
    class_names: tuple[str, ...] | None = None


def datasets() -> list[Dataset]:
    out = [Dataset("elpv", 300), Dataset("elpv", 224)]
    if NEU_DET.is_dir():
        out.append(Dataset("neu-det", 224))
        # crazing (class 0) is the defect; every other class reads as "other"
        relabel = {c: int(c == 0) for c in range(6)}
        out.append(Dataset("neu-det", 224, relabel, ("other", "crazing")))
    return out


def _label(ds: Dataset) -> str:
    two = ", 2 classes" if ds.relabel else ""
    return f"{ds.name} {ds.input_size} px{two}"


def _images(ds: Dataset) -> ImageSet:
    return load_elpv() if ds.name == "elpv" else load_image_folder(NEU_DET)


def _scores(m: EvalMetrics) -> dict[str, float]:
    return {
        "accuracy": m.accuracy,
        "balanced_accuracy": m.balanced_accuracy,
        "macro_f1": m.macro_f1,
    }


def one_seed(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    input_size: int,
    seed: int,
    edges: int,
    alpha: float,
    configs: dict[str, PrivacyConfig],
    train: UpperTrainConfig,
) -> dict[str, Any]:
    """Every configuration on one seed's split and partition."""
    tr, te = (np.array(i) for i in stratified_indices(labels.numpy(), [0.75, 0.25], seed))
    parts = [np.array(p) for p in dirichlet_indices(labels[tr].numpy(), edges, alpha, seed)]
    test_parts = [
        np.array(p) for p in dirichlet_indices(labels[te].numpy(), edges, alpha, seed + 1000)
    ]
    x_te, y_te = features[te], labels[te]
    model0 = build_split_model(class_names, input_size=input_size, pretrained=False, seed=seed)
    out: dict[str, Any] = {"seed": seed, "train_rows_per_edge": [len(p) for p in parts]}
    for name, privacy in configs.items():
        spec = make_spec(model0, 1, "0" * 64, privacy)
        uploads, sizes, skipped = [], [], []
        for e, p in enumerate(parts):
            try:
                body = pack_upload(features[tr][p], labels[tr][p], spec, f"edge-{e + 1}", seed)
            except Exception as exc:  # an edge too small for the mode sends nothing
                skipped.append(f"edge-{e + 1}: {exc}")
                continue
            sizes.append(len(body))
            uploads.append(unpack_upload(body, spec, 10**6))
        x, y = training_rows(uploads, seed)
        model = build_split_model(class_names, input_size=input_size, pretrained=False, seed=seed)
        train_upper(model, x, y, train)
        per_edge = []
        for p in test_parts:
            if not len(p):
                continue
            m = evaluate_features(model, x_te[p], y_te[p])
            majority = float(np.bincount(y_te[p].numpy()).max() / len(p))
            per_edge.append({"n": len(p), "accuracy": m.accuracy, "majority": majority})
        out[name] = {
            "pooled_test": _scores(evaluate_features(model, x_te, y_te)),
            "edges": per_edge,
            "upload_bytes": sizes,
            "skipped": skipped,
        }
    return out


def _median(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in configs:
        metrics = {
            k: _median([r[name]["pooled_test"][k] for r in runs])
            for k in ("accuracy", "balanced_accuracy", "macro_f1")
        }
        below = sum(e["accuracy"] < e["majority"] for r in runs for e in r[name]["edges"])
        edges = sum(len(r[name]["edges"]) for r in runs)
        costs = [
            r[REFERENCE]["pooled_test"]["accuracy"] - r[name]["pooled_test"]["accuracy"]
            for r in runs
        ]
        summary[name] = metrics | {
            "cost_vs_reference": _median(costs),
            "edges_below_majority": f"{below}/{edges}",
            "upload_bytes_median": float(
                np.median([b for r in runs for b in r[name]["upload_bytes"]])
            ),
        }
    return summary


def markdown(results: dict[str, Any]) -> str:
    o = results["options"]
    lines = [
        "# Stage 2: what each privacy mode costs the server's model",
        "",
        f"`{results['command']}`, {results['seconds']:.0f} s on {results['machine']}.",
        f"Seeds {o['seeds']}; {o['edges']} edges by Dirichlet(alpha={o['alpha']}) label skew "
        "of a stratified 75% training split; the server's default training; scored on the "
        "clean 25% test split (medians over seeds, min-max). 'Cost' is accuracy lost "
        f"against '{REFERENCE}' on the same seed, in points. 'Below majority': edges' test "
        "shares (split by the same skew) where the server's model is less accurate than "
        "always answering that share's majority class.",
        "",
    ]
    for label, block in results["datasets"].items():
        lines += [
            f"## {label}",
            "",
            "| configuration | accuracy | balanced acc. | macro F1 | cost (points) "
            "| below majority | upload bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, s in block["summary"].items():

            def pct(d: dict[str, float]) -> str:
                return f"{100 * d['median']:.1f} ({100 * d['min']:.1f}-{100 * d['max']:.1f})"

            lines.append(
                f"| {name} | {pct(s['accuracy'])} | {pct(s['balanced_accuracy'])} | "
                f"{pct(s['macro_f1'])} | {100 * s['cost_vs_reference']['median']:+.1f} | "
                f"{s['edges_below_majority']} | {s['upload_bytes_median']:,.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(out: Path, seeds: list[int], edges: int, alpha: float) -> dict[str, Any]:
    began = time.monotonic()
    results: dict[str, Any] = {
        "command": "python -m bench.stage2 " + " ".join(sys.argv[1:]),
        "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "options": {"seeds": seeds, "edges": edges, "alpha": alpha},
        "datasets": {},
    }
    cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
    for ds in datasets():
        key = (ds.name, ds.input_size)
        if key not in cache:
            images = _images(ds)
            model = build_split_model(images.class_names, input_size=ds.input_size)
            t0 = time.monotonic()
            f, y = extract_images(model, images, 32, lower=lower_runner(model, "onnxruntime"))
            print(f"[stage2] {_label(ds)}: {len(y)} images in {time.monotonic() - t0:.0f} s")
            cache[key] = (f, y, images.class_names)
        features, labels, names = cache[key]
        if ds.relabel is not None and ds.class_names is not None:
            labels = torch.tensor([ds.relabel[int(v)] for v in labels])
            names = list(ds.class_names)
        runs = []
        for seed in seeds:
            runs.append(
                one_seed(
                    features,
                    labels,
                    names,
                    ds.input_size,
                    seed,
                    edges,
                    alpha,
                    CONFIGS,
                    UpperTrainConfig(seed=seed),
                )
            )
            print(f"[stage2] {_label(ds)} seed {seed} done", flush=True)
        results["datasets"][_label(ds)] = {
            "summary": summarise(runs, list(CONFIGS)),
            "runs": runs,
        }
    results["seconds"] = round(time.monotonic() - began, 1)
    write_results(out, results, markdown(results) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/stage2"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--edges", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args(argv)
    results = run(args.out, args.seeds, args.edges, args.alpha)
    print(markdown(results))


if __name__ == "__main__":
    main()
