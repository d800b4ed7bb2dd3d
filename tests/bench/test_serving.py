"""bench.serving's report: rendered from its results.json, also on the benchmarks page."""

from __future__ import annotations

import json
from pathlib import Path

from bench import docs, serving


def _rate(median: float) -> dict[str, float | int]:
    return {"median": median, "min": median - 1, "max": median + 1, "runs": 3}


RESULTS = {
    "per_batch": [
        {
            "batch": b,
            "onnxruntime_img_s": _rate(40.0),
            "predict_img_s": _rate(38.0),
            "torch_img_s": _rate(20.0),
            "ratio": 0.95,
        }
        for b in serving.BATCHES
    ],
    "latency_one_image": {
        "plain": {"p50_ms": 30.0, "p99_ms": 41.5, "requests": 40},
        "heatmap": {"p50_ms": 120.0, "p99_ms": 150.0, "requests": 40},
    },
    "ratio_at_16": 0.95,
    "backend": "onnxruntime",
    "export_check": "checked against torch: max abs diff of the logits 1e-06",
    "export_setup_s": 3.1,
    "first_request_s": 3.5,
    "onnx_file_bytes": 1000,
    "download_same_labels": True,
    "download_max_score_diff": 0.0,
    "meta": {
        "command": "python -m bench.serving",
        "cpus": 2,
        "machine": "x86_64",
        "date": "2026-12-07",
        "threads": 2,
        "input_size": 224,
        "images": 128,
        "repeats": 3,
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [2.0, 2.0, 2.0],
        "torch": "2",
    },
}


def test_the_report_shows_each_batch_and_both_latencies() -> None:
    text = serving.markdown(RESULTS)
    assert "| 16 | 38 (37-39) | 40 (39-41) | 0.95 | 20 (19-21) |" in text
    assert "| without heat map | 30.0 | 41.5 | 40 |" in text
    assert "| with heat map | 120.0 | 150.0 | 40 |" in text
    assert "load average [1.0, 1.0, 1.0] before" in text


def test_the_benchmarks_page_renders_a_serving_run(tmp_path: Path) -> None:
    (tmp_path / "serving").mkdir()
    (tmp_path / "reading.md").write_text("reading")
    (tmp_path / "serving" / "results.json").write_text(json.dumps(RESULTS))
    page = docs.render_page(tmp_path)
    assert "## serving: Serving: POST /v1/predict against plain ONNX Runtime" in page
