"""Extraction against the CPU's limit.

The edge's real path (decode, resize, lower part, privacy transform, packing) is timed
on real elpv images against the fastest ways this CPU runs the same lower network on
already-decoded tensors at the same batch size and thread count: eager PyTorch (NCHW
and channels-last) and ONNX Runtime. The path is also timed change by change, so the
breakdown says what each change bought:

1. ``before``: serial decode, eager PyTorch channels-last (the edge before this work);
2. ``+onnxruntime``: the lower part in ONNX Runtime, decoding unchanged;
3. ``+decode on one torch thread``: torch only decodes while ORT owns the cores;
4. ``+overlap``: the next batch decodes on a thread meanwhile;
5. ``the edge now``: overlap only when a core is free of ORT's threads (on 2 cores with
   ORT on both it is not, and 3. is what runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bench.stats import rate
from fl_core.data import ImageSet, batches, load_elpv
from fl_core.features import extract_features, extract_images, make_spec, overlaps_decoding
from fl_core.model import SplitModel, build_split_model
from fl_core.onnx_runtime import LowerRunner, onnx_runner, torch_runner
from fl_core.privacy import pack_upload

BATCH = 16
THREADS = 2
EDGE_NOW = "the edge now (overlap only with a spare core)"


def _images(n: int) -> ImageSet:
    elpv = load_elpv()
    step = max(1, len(elpv) // n)
    return elpv.subset(list(range(0, step * n, step))[:n], "elpv-bench")


def _decoded(images: ImageSet, size: int) -> list[torch.Tensor]:
    return [x for x, _ in batches(images, size, BATCH)]


def _on_tensors(run: Callable[[torch.Tensor], Any], decoded: list[torch.Tensor]) -> int:
    with torch.inference_mode():
        for x in decoded:
            run(x)
    return sum(len(x) for x in decoded)


def measure_size(size: int, n_images: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    images = _images(n_images)
    model: SplitModel = build_split_model(["functional", "defective"], input_size=size)
    spec = make_spec(model, 1, "0" * 64)
    decoded = _decoded(images, size)

    # references: the lower network on already-decoded tensors
    nchw = build_split_model(["functional", "defective"], input_size=size)

    def torch_nchw(x: torch.Tensor) -> torch.Tensor:
        return nchw.lower(x)

    cl = torch_runner(model)
    ort: LowerRunner = onnx_runner(model, threads=THREADS)
    refs = {
        "torch_nchw_img_s": rate(lambda: _on_tensors(torch_nchw, decoded), repeats),
        "torch_img_s": rate(lambda: _on_tensors(cl, decoded), repeats),
        "onnxruntime_img_s": rate(lambda: _on_tensors(ort, decoded), repeats),
    }

    def path(extract: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], int]:
        def work() -> int:
            feats, labels = extract()
            pack_upload(feats, labels, spec, "bench")
            return len(labels)

        return work

    steps = {
        "before (serial decode, torch channels-last)": path(
            lambda: extract_images(model, images, BATCH, lower=cl, overlap=False)
        ),
        "+onnxruntime": path(
            lambda: extract_features(model, batches(images, size, BATCH), lower=ort)
        ),
        "+decode on one torch thread": path(
            lambda: extract_images(model, images, BATCH, lower=ort, overlap=False)
        ),
        "+overlap decode with the model": path(
            lambda: extract_images(model, images, BATCH, lower=ort, overlap=True)
        ),
        EDGE_NOW: path(lambda: extract_images(model, images, BATCH, lower=ort)),
        "decode only (no model)": lambda: sum(len(y) for _, y in batches(images, size, BATCH)),
    }
    breakdown = {name: rate(work, repeats) for name, work in steps.items()}
    project = breakdown[EDGE_NOW]
    fastest = max(
        refs["torch_img_s"]["median"],
        refs["onnxruntime_img_s"]["median"],
        refs["torch_nchw_img_s"]["median"],
    )
    return {
        "input_size": size,
        "batch_size": BATCH,
        "threads": THREADS,
        "images": len(images),
        "project_img_s": project,
        **refs,
        "ratio": round(project["median"] / fastest, 3),
        "breakdown": breakdown,
        "onnx_setup_s": round(ort.setup_s, 2),
        "onnx_max_abs_diff": ort.max_abs_diff,
        "edge_overlaps": overlaps_decoding(ort),
    }


def run(quick: bool) -> dict[str, Any]:
    sizes = [224] if quick else [224, 160]
    n, repeats = (64, 3) if quick else (192, 5)
    per_size = [measure_size(s, n, repeats) for s in sizes]
    first = per_size[0]
    return {
        "project_img_s": first["project_img_s"],
        "torch_img_s": first["torch_img_s"],
        "torch_nchw_img_s": first["torch_nchw_img_s"],
        "onnxruntime_img_s": first["onnxruntime_img_s"],
        "ratio": first["ratio"],
        "breakdown": first["breakdown"],
        "sizes": per_size,
    }


__all__ = ["run"]
