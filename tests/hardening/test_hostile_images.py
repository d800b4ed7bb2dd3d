"""Hostile images for the edge's ``POST /v1/predict``, against a real edge process.

Files that are not images, truncated images, a decompression bomb (a PNG header
claiming 20000x20000 pixels, past Pillow's own limit), and a real, valid 20000x20000
PNG compressed to a few hundred KiB: each gets a 4xx with a clear detail, and the
process's memory stays bounded (the pixel count is checked from the header, before
any pixel is decoded). A 1x1 image is valid input and is classified.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_service.config import Settings
from edge_service.services.context import build_context
from tests.edge_service.conftest import deploy_model, tiny_model
from tests.hardening.procs import EDGE_ADMIN_TOKEN, client, edge_env, free_port, services

RSS_BOUND_KIB = 128 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of ``width`` x ``height`` black pixels, compressed."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(height)]
    idat = b"".join(parts) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def png(width: int, height: int) -> bytes:
    pixels = np.full((height, width), 128, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def claims_size(data: bytes, width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _deploy_tiny_model(data_dir: Path, dataset: Path) -> None:
    """Record and deploy a tiny model in the edge's data dir, as a finished cycle would."""
    settings = Settings(admin_token=EDGE_ADMIN_TOKEN, data_dir=data_dir, dataset=str(dataset))  # type: ignore[arg-type]
    ctx = build_context(settings)
    try:
        deploy_model(ctx, tiny_model(2))
    finally:
        ctx.close()


@pytest.mark.slow
def test_hostile_images_are_refused_with_bounded_memory(tmp_path: Path, image_folder: Path) -> None:
    data_dir = tmp_path / "edge"
    _deploy_tiny_model(data_dir, image_folder)
    bomb_png = huge_png(20000, 20000)
    assert len(bomb_png) < 1024 * 1024  # 400 MB of pixels in well under a MiB
    cases = [
        ("notes.txt", b"not an image, just text\n" * 20, 422, "notes.txt: not an image"),
        ("model.pkl", b"\x80\x04\x95" + b"\0" * 64, 422, "model.pkl: not an image"),
        ("cut.png", png(64, 64)[:-30], 422, "cut.png: the image is truncated or corrupt"),
        ("empty.png", b"", 422, "empty.png: empty file"),
        ("bomb.png", claims_size(png(4, 4), 20000, 20000), 413, "bomb.png: image too large"),
        ("real-20000.png", bomb_png, 413, "real-20000.png: image too large"),
        (
            "big.png",
            claims_size(png(4, 4), 10000, 6000),
            413,
            "big.png: 10000x6000 = 60000000 pixels; the limit is 50000000",
        ),
    ]
    port = free_port()
    env = edge_env(data_dir, port, "http://127.0.0.1:9", "unused", "edge-img", image_folder)
    with services(tmp_path) as procs:
        edge = procs.edge("edge", port, env)
        with client(edge.url, EDGE_ADMIN_TOKEN) as c:
            tiny = c.post("/v1/predict?heatmap=true", files={"files": ("1x1.png", png(1, 1))})
            assert tiny.status_code == 200, tiny.text
            assert tiny.json()["predictions"][0]["heatmap_png_base64"]
            baseline = edge.rss_kib()
            for name, data, status, detail in cases:
                response = c.post("/v1/predict", files={"files": (name, data)})
                assert response.status_code == status, (name, response.text)
                assert response.json()["detail"].startswith(detail), response.text
            edge.check_alive()
            peak = edge.peak_rss_kib()
            assert c.post("/v1/predict", files={"files": ("ok.png", png(8, 8))}).status_code == 200
    report = {"baseline_rss_mib": round(baseline / 1024, 1), "peak_rss_mib": round(peak / 1024, 1)}
    (tmp_path / "hostile-images.json").write_text(json.dumps(report))
    print("\nhostile images:", report)
    assert peak < baseline + RSS_BOUND_KIB, report


def _png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A valid, all-zero PNG (compressed to a few KiB), of any size and pixel format."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width * channels * bit_depth + 7) // 8)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


#: the issue's bound: a request within the body limit raises the edge's peak RSS by less
PREDICT_RSS_BOUND_KIB = 500 * 1024


@pytest.mark.slow
def test_predict_memory_is_bounded_per_request(tmp_path: Path, image_folder: Path) -> None:
    """Issue 24, defect 3: twelve 7000x7000 1-bit PNGs in one request (6 KB each, each
    under the per-image limit) took 2.3 GB; one 49,000,000x1 PNG took 945 MB. Now the
    request's pixels, its file count and each image's aspect ratio are bounded from the
    headers, and each image is shrunk right after decoding: the worst request that is
    accepted (two 49 MP RGBA images, with heat maps) stays under 500 MB."""
    data_dir = tmp_path / "edge"
    _deploy_tiny_model(data_dir, image_folder)
    one_bit = _png(7000, 7000, 1, 0)
    rgba = _png(7000, 7000, 8, 6)
    line = _png(49_000_000, 1, 1, 0)
    assert len(one_bit) < 64 * 1024 and len(rgba) < 1024 * 1024
    port = free_port()
    env = edge_env(data_dir, port, "http://127.0.0.1:9", "unused", "edge-img", image_folder)
    with services(tmp_path) as procs:
        edge = procs.edge("edge", port, env)
        with client(edge.url, EDGE_ADMIN_TOKEN, timeout=300) as c:
            assert c.post("/v1/predict", files={"files": ("w.png", png(8, 8))}).status_code == 200
            baseline = edge.rss_kib()
            twelve = c.post(
                "/v1/predict", files=[("files", (f"{i}.png", one_bit)) for i in range(12)]
            )
            assert twelve.status_code == 413, twelve.text
            assert twelve.json()["detail"] == (
                "588000000 pixels in one request; the limit is 100000000"
            )
            many = c.post(
                "/v1/predict", files=[("files", (f"{i}.png", png(2, 2))) for i in range(17)]
            )
            assert many.status_code == 413
            assert many.json()["detail"] == "17 files in one request; the limit is 16"
            thin = c.post("/v1/predict", files={"files": ("line.png", line)})
            assert thin.status_code == 413, thin.text
            assert thin.json()["detail"] == (
                "line.png: 49000000x1: one side is more than 32 times the other"
            )
            worst = c.post(
                "/v1/predict?heatmap=true",
                files=[("files", ("a.png", rgba)), ("files", ("b.png", one_bit))],
            )
            assert worst.status_code == 200, worst.text
            heat = worst.json()["predictions"][0]["heatmap_png_base64"]
            with Image.open(io.BytesIO(base64.b64decode(heat))) as img:
                assert img.size == (1024, 1024)
            edge.check_alive()
            peak = edge.peak_rss_kib()
    report = {"baseline_rss_mib": round(baseline / 1024, 1), "peak_rss_mib": round(peak / 1024, 1)}
    (tmp_path / "predict-memory.json").write_text(json.dumps(report))
    print("\npredict memory:", report)
    assert peak < baseline + PREDICT_RSS_BOUND_KIB, report
