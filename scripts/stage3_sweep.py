"""Sweep stage-3 (edge fine-tuning) settings on the full demo's elpv partitions.

Stage 2 is approximated without the server: the upper part is fitted on the pooled
features of the union of the edges' training splits (no privacy noise), as the server
does; then each edge fine-tunes a copy on its own images with each setting, and the
test accuracy per edge is printed with and without flip test-time augmentation.

    python scripts/stage3_sweep.py --input-size 224 --configs default,views4

Seen on the project's 2-core machine (seed 0; test accuracy % of edges 1/2/3, then the
same with flip TTA):

- stage 2 at 224: 85.6/80.4/85.3 (TTA 83.1/82.8/89.0); at 300 px: 87.6/84.2/84.7.
- ``default`` (from b11, blocks at 0.1x the head's rate): 85.6/83.2/85.3, 600 s; early
  stopping kept the starting weights (epoch 0) on edges 1 and 3.
- ``flat`` (blocks at the head's rate): epoch 0 kept on every edge: AdamW at 1e-3
  on pretrained blocks wrecks them in the first epoch (validation accuracy 0.39).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from fedinspect.demo import DemoOptions, _base_model, _union, plan_demo
from fl_core.data import batches
from fl_core.features import extract_features
from fl_core.metrics import compute_metrics
from fl_core.training import finetune, train_upper

CONFIGS = {
    "default": {},
    "views4": {"views": 4, "epochs": 12},
    "b8": {"train_from": "b8"},
    "lr3": {"lr": 3e-3, "backbone_lr_scale": 0.3},
    "flat": {"backbone_lr_scale": 1.0},
    "flat_acc": {"backbone_lr_scale": 1.0, "patience": 8},
    "b8lr": {"train_from": "b8", "backbone_lr_scale": 0.3, "views": 3, "epochs": 12},
    "stem": {"train_from": "b4", "backbone_lr_scale": 0.3, "views": 3, "epochs": 10},
}


@torch.inference_mode()
def tta_accuracy(model, images, size: int) -> tuple[float, float]:
    model.eval()
    plain, tta, ys = [], [], []
    for x, y in batches(images, size, 64):
        p = model(x).softmax(1)
        views = [p, model(x.flip(3)).softmax(1), model(x.flip(2)).softmax(1)]
        views.append(model(x.flip(2, 3)).softmax(1))
        plain.append(p)
        tta.append(torch.stack(views).mean(0))
        ys.append(y)
    y = torch.cat(ys).numpy()
    a = compute_metrics(y, torch.cat(plain).argmax(1).numpy(), model.class_names).accuracy
    b = compute_metrics(y, torch.cat(tta).argmax(1).numpy(), model.class_names).accuracy
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--configs", default="default")
    ap.add_argument("--edges", default="0,1,2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    plan = plan_demo(DemoOptions(edges=3, seed=args.seed, input_size=args.input_size))
    splits = [plan.split(s) for s in plan.edge_specs]
    base = _base_model(plan)
    size = base.arch.input_size
    t = time.monotonic()
    union = _union([s.train for s in splits], plan.class_names)
    feats, labels = extract_features(base, batches(union, size, plan.batch_size))
    server = copy.deepcopy(base)
    train_upper(server, feats, labels, plan.upper)
    print(f"stage 2 in {time.monotonic() - t:.0f} s", flush=True)
    edges = [int(e) for e in args.edges.split(",")]
    s2 = {i: tta_accuracy(server, splits[i].test, size) for i in edges}
    print("stage 2", {i: [round(100 * v, 1) for v in s2[i]] for i in edges}, flush=True)
    for name in args.configs.split(","):
        cfg = replace(plan.finetune, **CONFIGS[name])
        accs = {}
        t = time.monotonic()
        for i in edges:
            model = copy.deepcopy(server)
            rep = finetune(model, splits[i].train, splits[i].val, cfg)
            accs[i] = (*tta_accuracy(model, splits[i].test, size), rep.best_epoch)
        mean = [statistics.fmean(v[k] for v in accs.values()) for k in (0, 1)]
        print(
            json.dumps(
                {
                    "config": name,
                    "size": size,
                    "per_edge": {
                        i: [round(100 * v[0], 1), round(100 * v[1], 1), v[2]]
                        for i, v in accs.items()
                    },
                    "mean": [round(100 * m, 1) for m in mean],
                    "seconds": round(time.monotonic() - t),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
