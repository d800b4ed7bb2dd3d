"""bench.ingest's pieces that run without a server: the bodies it sends, the comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench import docs
from bench.ingest import _body, compare, compare_rows, markdown, variant
from fl_core.features import unpack_features
from fl_core.schemas import FeatureSpec, PrivacyConfig

SPEC = FeatureSpec(
    backbone="tiny_cnn",
    cut="pooled",
    input_size=32,
    feature_shape=[16],
    privacy=PrivacyConfig(mode="pooled", clip_norm=4.0, noise_sigma=0.5),
    class_names=["ok", "defect"],
    base_model_version=1,
    base_model_sha256="0" * 64,
)


def test_variants_are_distinct_uploads_the_server_accepts() -> None:
    body = _body(SPEC, "edge-1", rows=8, seed=3)
    bodies = [body, *(variant(body, i) for i in range(5))]
    assert len(set(bodies)) == len(bodies)
    original = unpack_features(body, SPEC, max_rows=100)
    for other in bodies[1:]:
        batch = unpack_features(other, SPEC, max_rows=100)  # raises if refused
        assert torch.equal(batch.labels, original.labels)
        assert torch.equal(batch.features[1:], original.features[1:])
        assert batch.features.norm(dim=1)[0] <= original.features.norm(dim=1)[0]


def _run(edges: int, side: str, rate: float, p99: float) -> dict[str, Any]:
    return {
        "side": side,
        "edges": edges,
        "uploads_per_s": rate,
        "p99_ms": p99,
        "p50_ms": p99 / 2,
        "server_cpu_ms_per_upload": 10.0,
        "errors": 0,
        "retries_429_503": 1,
        "upload_bytes": 1_538_728,
    }


def test_compare_alternates_the_two_servers_and_summarises_each(tmp_path: Path) -> None:
    calls: list[tuple[int, Path | None]] = []
    trees = {"ref": tmp_path / "ref", "current": tmp_path / "current"}

    def fake_level(edges: int, uploads: int, rows: int, tree: Path | None = None) -> dict[str, Any]:
        calls.append((edges, tree))
        side = "ref" if tree == trees["ref"] else "current"
        rate = {"ref": 20.0, "current": 40.0}[side] + len(calls)
        return {k: v for k, v in _run(edges, side, rate, 1000.0 / rate).items() if k != "side"}

    runs = compare(trees, [10, 200], repeats=2, uploads=5, rows=300, run=fake_level)

    assert [tree for _, tree in calls] == [trees["ref"], trees["current"]] * 4
    assert [edges for edges, _ in calls] == [10] * 4 + [200] * 4
    rows = compare_rows(runs)
    assert [r["edges"] for r in rows] == [10, 200]
    at_200 = rows[1]
    assert at_200["ref"]["uploads_per_s"] == {"median": 26.0, "min": 25.0, "max": 27.0, "runs": 2}
    assert at_200["current"]["uploads_per_s"]["median"] == 47.0
    assert at_200["ref"]["retries_429_503"] == 2 and at_200["current"]["errors"] == 0


def test_the_comparison_page_is_a_section_of_the_benchmarks_page() -> None:
    runs = [_run(200, side, rate, 5000.0) for side, rate in (("ref", 25.0), ("current", 50.0))]
    results = {
        "meta": {
            "section": "ingest",
            "command": "python -m bench.ingest --compare-ref main",
            "ref": "main",
            "ref_commit": "abc1234",
            "current_commit": "def5678",
            "cpus": 2,
            "machine": "x86_64",
            "date": "2026-12-07",
            "load_before": [2.0, 2.0, 2.0],
            "load_after": [3.0, 2.0, 2.0],
            "uploads_per_edge": 5,
            "rows": 300,
            "upload_mb": 1.54,
            "repeats": 1,
        },
        "levels": compare_rows(runs),
        "ceilings": {
            "loopback": {"edges": 200, "uploads_per_s": 127.2, "mb_per_s": 196.0, "p99_ms": 5349},
            "disk": {"threads": 4, "blobs_per_s": 287.5, "mb_per_s": 442.4},
        },
        "raw_runs": runs,
        "notes": ["what bounded it"],
    }
    page = markdown(results)
    assert "| 200 | 25 (25-25) | 50 (50-50) |" in page
    assert "took 127.2 uploads/s (196.0 MB/s) at 200 edges" in page
    assert "287.5 fsynced blobs/s" in page
    assert "what bounded it" in page
    assert docs._renderer(results) is markdown
