"""Hostile feature uploads against a real server process.

Bodies that are not safetensors (text, pickles, torch.save files, zip and gzip bombs),
truncated ones, headers claiming huge tensors, wrong dtype or shape, NaN/Inf, labels
out of range, another cycle's spec hash, and bodies over the size limit (declared, or
chunked and sent slowly): each gets a 4xx with a clear detail; the server process's
memory stays bounded; the cycle's other upload is untouched (sha256 and rows).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import socket
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_core.features import SPEC_HASH_KEY
from fl_core.schemas import FeatureSpec
from tests.hardening.procs import (
    HOST,
    SERVER_ADMIN_TOKEN,
    Service,
    client,
    free_port,
    register_edge,
    services,
)
from tests.server_service.helpers import make_upload, random_rows, raw_upload

LIMIT = 2 * 1024 * 1024
#: growth of the server's peak RSS allowed over the whole hostile sequence
RSS_BOUND_KIB = 128 * 1024


def _header_claiming(rows: int, spec: FeatureSpec) -> bytes:
    """A tiny body whose safetensors header claims ``rows`` rows of features."""
    width = 1
    for d in spec.feature_shape:
        width *= d
    header = {
        "__metadata__": {SPEC_HASH_KEY: spec.spec_hash()},
        "features": {
            "dtype": "F32",
            "shape": [rows, *spec.feature_shape],
            "data_offsets": [0, rows * width * 4],
        },
        "labels": {"dtype": "I64", "shape": [rows], "data_offsets": [rows * width * 4, 0]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 64


def _nested_header(depth: int = 100_000) -> bytes:
    """A safetensors body whose JSON header nests ``depth`` lists (a RecursionError in
    a recursive parser: issue 24, defect 4)."""
    raw = b"[" * depth + b"]" * depth
    return struct.pack("<Q", len(raw)) + raw


def _long_name_header(chars: int = 1_000_000) -> bytes:
    """A header naming a tensor with ``chars`` characters and an unknown dtype (the 422
    repeated the whole name)."""
    header = {"x" * chars: {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 4


def _torch_save(tensors: dict[str, torch.Tensor]) -> bytes:
    out = io.BytesIO()
    torch.save(tensors, out)
    return out.getvalue()


def _zip_bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("features.safetensors", b"\0" * (64 * 1024 * 1024))
    return out.getvalue()


def hostile_bodies(cycle: dict[str, Any]) -> list[tuple[str, bytes, str]]:
    """(name, body, fragment of the expected 422 detail)."""
    spec = FeatureSpec.model_validate(cycle["spec"])
    # The spec of the next cycle, once a model version 2 exists: a valid hash, not ours.
    other_spec_hash = spec.model_copy(update={"base_model_version": 2}).spec_hash()
    assert other_spec_hash != spec.spec_hash()
    features, labels = random_rows(spec, 8, seed=5)
    valid = make_upload(cycle, "hostile", rows=8, seed=5)
    nan = features.index_fill(0, torch.tensor([3]), float("nan"))
    inf = features.index_fill(0, torch.tensor([0]), float("inf"))
    not_st = "is not a safetensors file"
    return [
        ("text", b"hello, this is not a tensor file\n" * 50, not_st),
        ("pickle", pickle.dumps({"features": features.tolist(), "labels": [0] * 8}), not_st),
        ("torch.save", _torch_save({"features": features, "labels": labels}), not_st),
        ("gzip bomb", gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9), not_st),
        ("zip bomb", _zip_bomb(), not_st),
        ("empty", b"", "shorter than its 8-byte header"),
        ("truncated", valid[: len(valid) - 100], "does not fit the bytes sent"),
        ("huge tensors", _header_claiming(10**12, spec), "does not fit the bytes sent"),
        (
            "float64",
            raw_upload(cycle, {"features": features.double(), "labels": labels}),
            "features dtype F64 does not match",
        ),
        (
            "wrong shape",
            raw_upload(cycle, {"features": features[:, :1], "labels": labels}),
            "feature rows have shape",
        ),
        (
            "NaN",
            raw_upload(cycle, {"features": nan, "labels": labels}),
            "features contain NaN or Inf",
        ),
        (
            "Inf",
            raw_upload(cycle, {"features": inf, "labels": labels}),
            "features contain NaN or Inf",
        ),
        (
            "label out of range",
            raw_upload(cycle, {"features": features, "labels": labels + 7}),
            "labels must lie in [0, 1]",
        ),
        (
            "negative label",
            raw_upload(cycle, {"features": features, "labels": labels - 1}),
            "labels must lie in [0, 1]",
        ),
        ("nested JSON header", _nested_header(), "header is not valid JSON"),
        ("1 MB tensor name", _long_name_header(), "unknown dtype 'F99'"),
        # issue 24, defect 7: rows that ignore the spec's clip norm (24) and noise (2)
        (
            "rows of norm 5,657",
            raw_upload(cycle, {"features": features / features.norm() * 5657, "labels": labels}),
            "the spec's privacy transform (clip norm 24, noise sigma 2) allows at most",
        ),
        (
            "rows of 3e38",
            raw_upload(cycle, {"features": torch.full_like(features, 3e38), "labels": labels}),
            "too large for float32",
        ),
        (
            "another cycle's spec hash",
            raw_upload(cycle, {"features": features, "labels": labels}, spec_hash=other_spec_hash),
            "spec hash does not match",
        ),
    ]


def _send_slowly(port: int, path: str, token: str, total: int, chunk: int) -> tuple[int, bytes]:
    """PUT a chunked body of ``total`` bytes in ``chunk``-byte pieces with pauses, stopping
    as soon as the server answers or closes; returns (bytes sent, what the server said)."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sent = 0
    answer = b""
    try:
        sock.sendall(
            (
                f"PUT {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        piece = f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n"
        sock.settimeout(0.02)
        while sent < total:
            try:
                sock.sendall(piece)
            except OSError:  # reset or broken pipe: the server stopped reading
                break
            sent += chunk
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue  # nothing yet: keep sending (this pause makes it slow)
            except OSError:
                break
            answer += data
            break
        sock.settimeout(10)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
    finally:
        sock.close()
    return sent, answer


@pytest.mark.slow
def test_hostile_uploads_are_refused_with_bounded_memory(tmp_path: Path) -> None:
    port = free_port()
    with services(tmp_path) as procs:
        server: Service = procs.server(
            tmp_path / "server", port, max_upload_bytes=str(LIMIT), min_edges="3"
        )
        honest, hostile = register_edge(server.url, "honest"), register_edge(server.url, "hostile")
        with client(server.url, honest["token"]) as h, client(server.url, hostile["token"]) as x:
            cycle = h.post("/v1/cycles").json()
            good = make_upload(cycle, honest["edge_id"], rows=16, seed=1)
            ack = h.put(f"/v1/cycles/{cycle['id']}/features", content=good)
            assert ack.status_code == 201, ack.text
            x.post("/v1/cycles")

            baseline = server.rss_kib()
            peak_during = baseline
            outcomes: dict[str, tuple[int, str]] = {}
            for name, body, fragment in hostile_bodies(cycle):
                response = x.put(
                    f"/v1/cycles/{cycle['id']}/features",
                    content=body,
                    headers={"Content-Type": "application/octet-stream"},
                )
                detail = response.json()["detail"]
                outcomes[name] = (response.status_code, detail)
                assert response.status_code == 422, (name, response.text[:500])
                assert fragment in detail, (name, detail[:500])
                assert len(detail) <= 1000, (name, len(detail))  # input is not echoed whole
                peak_during = max(peak_during, server.rss_kib())

            # A subset of weights naming a 1 MB tensor: 422, the name not echoed whole.
            subset = x.post("/v1/models/1/weights/subset", json={"names": ["y" * 1_000_000]})
            assert subset.status_code == 422
            assert subset.json()["detail"].startswith("model version 1 has no tensor 'yyyy")
            assert len(subset.text) < 1000

            # Over the limit, declared up front: refused before a byte is read.
            big = x.put(f"/v1/cycles/{cycle['id']}/features", content=b"\0" * (LIMIT + 1))
            assert big.status_code == 413
            assert big.json()["detail"] == f"upload exceeds the limit of {LIMIT} bytes"

            # Over the limit, chunked and slow: refused once the limit is passed, and the
            # connection closed without the server reading the rest (64 MiB offered).
            offered = 64 * 1024 * 1024
            sent, answer = _send_slowly(
                port, f"/v1/cycles/{cycle['id']}/features", hostile["token"], offered, 64 * 1024
            )
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert b"upload exceeds the limit" in answer
            assert sent < offered // 4, f"the server read {sent} bytes of {offered}"
            server.check_alive()

            peak_kib = server.peak_rss_kib()
            after = h.get(f"/v1/cycles/{cycle['id']}").json()
            assert after["state"] == "collecting"
            (upload,) = after["uploads"]
            assert upload["edge_id"] == honest["edge_id"]
            assert upload["sha256"] == ack.json()["sha256"]
            assert upload["rows"] == 16 and upload["size"] == len(good)
            # The honest edge's bytes are what it sent: re-sending them is a no-op.
            again = h.put(f"/v1/cycles/{cycle['id']}/features", content=good)
            assert again.status_code == 200 and again.json()["unchanged"] is True
            with client(server.url, SERVER_ADMIN_TOKEN) as admin:
                metrics = admin.get("/metrics").text
            assert 'fedinspect_server_uploads_total{outcome="invalid"}' in metrics

    report = {
        "baseline_rss_mib": round(baseline / 1024, 1),
        "max_rss_during_mib": round(peak_during / 1024, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "bound_mib": round((baseline + RSS_BOUND_KIB) / 1024, 1),
        "slow_body_bytes_sent": sent,
        "outcomes": outcomes,
    }
    (tmp_path / "hostile-uploads.json").write_text(json.dumps(report, indent=2))
    print("\nhostile uploads:", json.dumps({k: v for k, v in report.items() if k != "outcomes"}))
    assert peak_kib < baseline + RSS_BOUND_KIB, report
