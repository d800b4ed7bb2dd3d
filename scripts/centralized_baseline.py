"""Centralized accuracy of ``train_upper`` on pooled features, and extraction speed.

For the default backbone (EfficientNet-Lite0, ImageNet weights) and the ``pooled``
cut: extract features of every image once, split 75/25 (seeded, stratified), fit the
upper part with ``train_upper`` (MLP head, and a linear probe for reference) on the
75%, and report accuracy on the 25%. Runs on elpv (defective vs functional) and on
NEU-DET (6 classes) when ``../shared/data/neu-det`` is present.

    python scripts/centralized_baseline.py --out bench/results/centralized.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fl_core.data import ImageSet, batches, load_elpv, load_image_folder, stratified_indices
from fl_core.features import extract_features
from fl_core.model import HeadConfig, build_split_model
from fl_core.training import UpperTrainConfig, evaluate_features, train_upper

NEU_DET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "neu-det"


def run_dataset(ds: ImageSet, input_size: int, batch_size: int, seed: int) -> dict[str, object]:
    model = build_split_model(ds.class_names, input_size=input_size)
    start = time.perf_counter()
    feats, labels = extract_features(
        model, batches(ds, input_size, batch_size), len(ds), lambda d, t: None
    )
    seconds = time.perf_counter() - start
    train_idx, test_idx = stratified_indices(labels.numpy(), [0.75, 0.25], seed)
    result: dict[str, object] = {
        "images": len(ds),
        "classes": ds.class_names,
        "extract_img_s": round(len(ds) / seconds, 1),
        "n_train": len(train_idx),
        "n_test": len(test_idx),
    }
    for name, head in (("mlp", HeadConfig()), ("linear_probe", HeadConfig(hidden=0))):
        clf = build_split_model(ds.class_names, input_size=input_size, head=head, seed=seed)
        report = train_upper(clf, feats[train_idx], labels[train_idx], UpperTrainConfig(seed=seed))
        metrics = evaluate_features(clf, feats[test_idx], labels[test_idx])
        result[name] = {
            "accuracy": round(metrics.accuracy, 4),
            "balanced_accuracy": round(metrics.balanced_accuracy, 4),
            "macro_f1": round(metrics.macro_f1, 4),
            "epochs": report.epochs_run,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {
        "backbone": "efficientnet_lite0",
        "cut": "pooled",
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    results["elpv"] = run_dataset(load_elpv(), args.input_size, args.batch_size, args.seed)
    print(json.dumps(results["elpv"], indent=2))
    if NEU_DET.is_dir():
        results["neu_det"] = run_dataset(
            load_image_folder(NEU_DET), args.input_size, args.batch_size, args.seed
        )
        print(json.dumps(results["neu_det"], indent=2))
    else:
        print(f"NEU-DET not found at {NEU_DET}; skipped")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
