"""Serving at the runtime's speed: ``POST /v1/predict`` against plain ONNX Runtime.

``python -m bench.serving --out bench/results/serving`` starts a real edge app under
uvicorn on 127.0.0.1 in this process (the server it would talk to answers 401 from a
mock transport: serving needs no server), deploys EfficientNet-Lite0 (ImageNet weights,
elpv's two classes) and measures, side by side in one run and on the same threads:

* plain ONNX Runtime on the edge's own export of the deployed model (the file
  ``GET /v1/models/deployed/onnx`` downloads), on already-decoded tensors;
* ``/v1/predict`` through HTTP with elpv PNG files, as a line would call it: multipart
  upload, decode, resize, the model, JSON answer;
* eager PyTorch on already-decoded tensors (the engine predictions ran on before).

Throughput in images/s at batch 1, 16 and 64 (ONNX Runtime and the edge alternate
repeat by repeat, so a change in the machine's load hits both), and the latency of
one image with and without the heat map (p50/p99 over sequential requests, measured by
the client). The load average is recorded, as the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from pydantic import SecretStr

from bench.stats import fmt, summary, write_results
from edge_service.config import Settings
from edge_service.main import create_app
from edge_service.services.context import EdgeContext
from fl_core.data import ELPV_CLASSES, image_transform, load_elpv, load_model_image
from fl_core.model import build_split_model
from fl_core.onnx_runtime import make_session
from fl_core.schemas import EvalMetrics

RESULTS = Path(__file__).resolve().parent / "results" / "serving"
TOKEN = "bench-serving-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BATCHES = (1, 16, 64)
#: the ratio the issue asks for: /v1/predict at batch 16 over ONNX Runtime's
JUDGED_BATCH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(app: Any, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="edge", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the edge did not start")
        time.sleep(0.05)
    return server, thread


def _dummy_metrics(n_classes: int) -> EvalMetrics:
    return EvalMetrics(
        n=0,
        accuracy=0.0,
        balanced_accuracy=0.0,
        macro_f1=0.0,
        per_class=[],
        confusion_matrix=[[0] * n_classes for _ in range(n_classes)],
    )


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values), q)), 1)


def run(size: int, threads: int, images: int, repeats: int, latency_n: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    elpv = load_elpv()
    step = max(1, len(elpv) // images)
    records = elpv.records[::step][:images]
    files = [(r.path.name, r.path.read_bytes()) for r in records]
    transform = image_transform(size, augment=False)
    decoded = torch.stack([transform(load_model_image(r.path)) for r in records])

    model = build_split_model(list(ELPV_CLASSES), input_size=size)
    with tempfile.TemporaryDirectory(prefix="fedinspect-serving-") as tmp:
        refusing = httpx.Client(
            transport=httpx.MockTransport(lambda _r: httpx.Response(401, json={"detail": "no"})),
            base_url="http://server.invalid",
        )
        settings = Settings(
            admin_token=SecretStr(TOKEN),
            name="bench-serving",
            data_dir=Path(tmp),
            dataset="elpv",
            threads=threads,
            extract_backend="onnxruntime",
            max_predict_files=max(BATCHES),
            max_concurrent_requests=8,
        )
        app = create_app(settings, refusing)
        server, thread = _start(app, _free_port())
        base = f"http://127.0.0.1:{server.config.port}"
        try:
            ctx: EdgeContext = app.state.ctx
            local = ctx.registry.add_candidate(model, 1, _dummy_metrics(len(ELPV_CLASSES)))
            ctx.registry.deploy(local.id, "deployed by bench.serving")
            with httpx.Client(base_url=base, headers=AUTH, timeout=300) as http:
                return _measure(ctx, http, model, files, decoded, threads, repeats, latency_n)
        finally:
            server.should_exit = True
            thread.join(30)
            refusing.close()


def _measure(
    ctx: EdgeContext,
    http: httpx.Client,
    model: torch.nn.Module,
    files: list[tuple[str, bytes]],
    decoded: torch.Tensor,
    threads: int,
    repeats: int,
    latency_n: int,
) -> dict[str, Any]:
    def post(chunk: list[tuple[str, bytes]], heatmap: bool = False) -> dict[str, Any]:
        response = http.post(
            "/v1/predict",
            params={"heatmap": "true"} if heatmap else None,
            files=[("files", (name, data, "image/png")) for name, data in chunk],
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    started = time.perf_counter()
    post(files[:1])  # the deployment has exported and checked the model already
    first_request_s = time.perf_counter() - started
    serving = ctx.deployed.serving()
    assert serving is not None
    runner = serving.runner
    downloaded = http.get("/v1/models/deployed/onnx")
    downloaded.raise_for_status()
    session = make_session(downloaded.content, threads)

    # the download gives /v1/predict's answers
    sample = files[:8]
    answers = post(sample)["predictions"]
    (probs,) = session.run(["probabilities"], {"images": decoded[: len(sample)].numpy()})
    names = list(ELPV_CLASSES)
    same_labels = all(
        a["label"] == names[int(p.argmax())] for a, p in zip(answers, probs, strict=True)
    )
    max_score_diff = max(
        abs(a["scores"][n] - float(p[j]))
        for a, p in zip(answers, probs, strict=True)
        for j, n in enumerate(names)
    )

    def ort_pass(batch: int) -> int:
        for first in range(0, len(decoded), batch):
            x = np.ascontiguousarray(decoded[first : first + batch].numpy())
            session.run(["probabilities"], {"images": x})
        return len(decoded)

    def http_pass(batch: int) -> int:
        for first in range(0, len(files), batch):
            post(files[first : first + batch])
        return len(files)

    def torch_pass(batch: int) -> int:
        with torch.inference_mode():
            for first in range(0, len(decoded), batch):
                model(decoded[first : first + batch]).softmax(dim=1)
        return len(decoded)

    def timed(work: Callable[[int], int], batch: int) -> float:
        t = time.perf_counter()
        n = work(batch)
        return n / (time.perf_counter() - t)

    per_batch = []
    for batch in BATCHES:
        ort_pass(batch)
        http_pass(batch)  # warm-up of both
        ort_rates, http_rates = [], []
        for _ in range(repeats):  # alternate: a change of load hits both
            ort_rates.append(timed(ort_pass, batch))
            http_rates.append(timed(http_pass, batch))
        torch_rates = [timed(torch_pass, batch) for _ in range(max(1, repeats - 1))]
        ort_s, http_s = summary(ort_rates, 1), summary(http_rates, 1)
        per_batch.append(
            {
                "batch": batch,
                "onnxruntime_img_s": ort_s,
                "predict_img_s": http_s,
                "torch_img_s": summary(torch_rates, 1),
                "ratio": round(http_s["median"] / ort_s["median"], 3),
            }
        )

    latency: dict[str, Any] = {}
    for heatmap in (False, True):
        post(files[:1], heatmap)
        times = []
        for i in range(latency_n):
            t = time.perf_counter()
            post(files[i % len(files) : i % len(files) + 1], heatmap)
            times.append((time.perf_counter() - t) * 1000)
        latency["heatmap" if heatmap else "plain"] = {
            "p50_ms": _percentile(times, 50),
            "p99_ms": _percentile(times, 99),
            "requests": latency_n,
        }
    judged = next(r for r in per_batch if r["batch"] == JUDGED_BATCH)
    return {
        "per_batch": per_batch,
        "latency_one_image": latency,
        "ratio_at_16": judged["ratio"],
        "backend": runner.backend,
        "export_check": runner.reason,
        "export_setup_s": round(runner.setup_s, 2),
        "first_request_s": round(first_request_s, 2),
        "onnx_file_bytes": len(downloaded.content),
        "download_same_labels": same_labels,
        "download_max_score_diff": max_score_diff,
    }


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Serving: POST /v1/predict against plain ONNX Runtime",
        "",
        f"`{meta['command']}` on {meta['cpus']} CPU cores ({meta['machine']}), "
        f"{meta['threads']} threads, {meta['date']}; load average "
        f"{meta['load_before']} before, {meta['load_after']} after (a shared machine). "
        f"EfficientNet-Lite0 at {meta['input_size']} px, {meta['images']} elpv cells per "
        f"pass, {meta['repeats']} passes; ONNX Runtime and the edge alternate pass by pass. "
        "ONNX Runtime and torch run on already-decoded tensors; `/v1/predict` is measured "
        "by an HTTP client on loopback (upload, decode, resize, model, JSON answer).",
        "",
        "| batch | /v1/predict img/s | ONNX Runtime img/s | ratio | eager torch img/s |",
        "|---|---|---|---|---|",
    ]
    for r in results["per_batch"]:
        lines.append(
            f"| {r['batch']} | {fmt(r['predict_img_s'])} | {fmt(r['onnxruntime_img_s'])} "
            f"| {r['ratio']} | {fmt(r['torch_img_s'])} |"
        )
    lat = results["latency_one_image"]
    lines += [
        "",
        "| one image | p50 ms | p99 ms | requests |",
        "|---|---|---|---|",
        *(
            f"| {name} | {v['p50_ms']} | {v['p99_ms']} | {v['requests']} |"
            for name, v in (("without heat map", lat["plain"]), ("with heat map", lat["heatmap"]))
        ),
        "",
        f"Engine: {results['backend']} ({results['export_check']}); export and check "
        f"{results['export_setup_s']} s, made once at the deployment; the first request "
        f"after it took {results['first_request_s']} s. The ONNX file downloaded from "
        f"`GET /v1/models/deployed/onnx` ({results['onnx_file_bytes']} bytes) gives "
        f"{'the same labels' if results['download_same_labels'] else 'OTHER LABELS'} as "
        f"/v1/predict, scores within {results['download_max_score_diff']:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--size", type=int, default=224, help="input size, px")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=128, help="elpv cells per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-n", type=int, default=40, help="requests per latency")
    args = parser.parse_args(argv)
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = run(args.size, args.threads, args.images, args.repeats, args.latency_n)
    results["meta"] = {
        "command": f"python -m bench.serving --size {args.size} --threads {args.threads} "
        f"--images {args.images} --repeats {args.repeats} --latency-n {args.latency_n}",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "threads": args.threads,
        "input_size": args.size,
        "images": args.images,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
    }
    write_results(args.out, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
