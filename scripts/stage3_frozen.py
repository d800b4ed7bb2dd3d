"""What stage 3's frozen part costs on each engine, on the full demo's elpv data.

Stage 3 fine-tunes blocks ``b11`` up; ``b0``-``b10`` stay frozen. Their activations are
computed once per augmented view of every training image (the fine-tuning cache), and
the test split is evaluated for up to three models that share them (the server's model,
the candidate, the deployed model). This measures both on one edge's images:

- the cache's images per second with torch (channels-last) and with ONNX Runtime, plus
  the ONNX export and check, paid once per frozen part;
- evaluating three models on the test split as before (``evaluate`` three times, all in
  torch) against one ONNX Runtime pass of the frozen part and the upper stages three
  times (``frozen_activations`` + ``evaluate_activations``), as the edge does now.

    python scripts/stage3_frozen.py --images 128 --threads 1

``--threads 1`` is what each of the demo's three edges gets on two cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedinspect.demo import DemoOptions, _base_model, plan_demo
from fl_core.data import ImageSet
from fl_core.onnx_runtime import clear_sessions, lower_runner, torch_runner
from fl_core.training import (
    evaluate,
    evaluate_activations,
    finetune_start,
    frozen_activations,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="training and test images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--edge", type=int, default=0, help="which edge's split (0-based)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = plan_demo(DemoOptions(edges=3, dataset="elpv", seed=0))
    sp = plan.split(plan.edge_specs[args.edge])
    train = ImageSet(sp.train.records[: args.images], sp.train.class_names)
    test = ImageSet(sp.test.records[: args.images], sp.test.class_names)
    model = _base_model(plan)
    start = finetune_start(model, plan.finetune.train_from)
    views, bs = plan.finetune.views, plan.batch_size
    out: dict[str, object] = {
        "input_size": model.arch.input_size,
        "frozen_stages": model.stage_names[:start],
        "threads": args.threads,
        "train_images": len(train),
        "views": views,
        "test_images": len(test),
    }

    clear_sessions()
    began = time.perf_counter()
    ort = lower_runner(model, "onnxruntime", args.threads, end=start)
    out["onnx_export_and_check_s"] = round(time.perf_counter() - began, 2)
    out["onnx_backend"] = ort.backend
    for name, runner in (("torch", torch_runner(model, end=start)), ("onnxruntime", ort)):
        began = time.perf_counter()
        frozen_activations(model, train, start, bs, runner, views)
        seconds = time.perf_counter() - began
        out[f"cache_{name}_img_s"] = round(views * len(train) / seconds, 2)

    began = time.perf_counter()
    before = [evaluate(model, test, bs) for _ in range(3)]
    out["evaluate_3_models_before_s"] = round(time.perf_counter() - began, 2)
    began = time.perf_counter()
    acts = frozen_activations(model, test, start, bs, ort)
    after = [evaluate_activations(model, acts, bs) for _ in range(3)]
    out["evaluate_3_models_now_s"] = round(time.perf_counter() - began, 2)
    out["same_accuracy"] = [a.accuracy for a in after] == [b.accuracy for b in before]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
