"""safetensors round-trips, and refusal of anything else."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest
import torch

from fl_core import serialization
from fl_core.errors import NotSafetensors


def test_round_trip_is_exact_with_metadata() -> None:
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(2, 2).half(),
        "d": torch.tensor([-3, 7], dtype=torch.int8),
    }
    data = serialization.dumps(tensors, {"k": "v"})
    back, meta = serialization.loads(data)
    assert meta == {"k": "v"}
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)


def test_sha256_matches_hashlib() -> None:
    import hashlib

    assert serialization.sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_refuses_pickle() -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    with pytest.raises(NotSafetensors):
        serialization.loads(buf.getvalue())
    with pytest.raises(NotSafetensors):
        serialization.loads(pickle.dumps({"x": 1}))


def test_refuses_truncated_body() -> None:
    data = serialization.dumps({"a": torch.randn(100)})
    with pytest.raises(NotSafetensors, match="does not fit the bytes sent"):
        serialization.loads(data[:-10])


def test_refuses_header_claiming_huge_tensor_without_allocating() -> None:
    header = {"a": {"dtype": "F32", "shape": [10**9, 10**3], "data_offsets": [0, 4 * 10**12]}}
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * 16
    with pytest.raises(NotSafetensors, match="does not fit"):
        serialization.inspect_header(data)


@pytest.mark.parametrize(
    "body",
    [b"", b"1234567", b"\xff" * 64, struct.pack("<Q", 2**40) + b"{}"],
)
def test_refuses_garbage(body: bytes) -> None:
    with pytest.raises(NotSafetensors):
        serialization.loads(body)


def test_refuses_non_string_metadata() -> None:
    header = {"__metadata__": {"k": 3}}
    raw = json.dumps(header).encode()
    with pytest.raises(NotSafetensors, match="metadata"):
        serialization.inspect_header(struct.pack("<Q", len(raw)) + raw)


def test_a_deeply_nested_header_is_not_safetensors() -> None:
    """Issue 24, defect 4: JSON nested 100,000 deep raised RecursionError (a 500)."""
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(NotSafetensors, match="header is not valid JSON"):
        serialization.loads(struct.pack("<Q", len(raw)) + raw)


def test_errors_do_not_echo_a_huge_tensor_name() -> None:
    header = {"n" * 1_000_000: {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    with pytest.raises(NotSafetensors) as err:
        serialization.inspect_header(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    assert err.value.detail.startswith("tensor 'nnnn") and "unknown dtype 'F99'" in err.value.detail
    assert len(err.value.detail) < 300
