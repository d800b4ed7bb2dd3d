"""safetensors on the wire and on disk, with string metadata and sha256 digests.

Nothing here ever unpickles: loading pickles executes code, so a model or a feature
upload that is not a well-formed safetensors file is refused before any tensor is
built. The header is checked by hand first so that a body claiming huge tensors, or
offsets outside the body, is refused with a clear message and without allocating.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fl_core.errors import NotSafetensors, shorten

#: Largest JSON header we accept; real headers of our models are a few tens of KiB.
MAX_HEADER_BYTES = 8 * 1024 * 1024

_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def inspect_header(data: bytes) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Parse and check a safetensors header without building any tensor.

    Returns ``(tensors, metadata)`` where ``tensors`` maps a name to its ``dtype``,
    ``shape`` and ``data_offsets``. Raises :class:`NotSafetensors` when the bytes are
    not a complete, self-consistent safetensors file.
    """
    if len(data) < 8:
        raise NotSafetensors("body is not a safetensors file: shorter than its 8-byte header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise NotSafetensors("body is not a safetensors file: header length out of range")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # RecursionError: JSON nested thousands deep, which no real header is
        raise NotSafetensors("body is not a safetensors file: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise NotSafetensors("body is not a safetensors file: header is not an object")
    raw_meta = header.pop("__metadata__", {}) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise NotSafetensors("body is not a safetensors file: metadata must map strings")
    payload = len(data) - 8 - header_len
    covered = 0
    tensors: dict[str, dict[str, object]] = {}
    for full_name, info in header.items():
        name = shorten(full_name)  # errors name the tensor, not a megabyte of it
        if not isinstance(info, dict):
            raise NotSafetensors(f"tensor {name!r}: malformed header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_SIZES:
            raise NotSafetensors(f"tensor {name!r}: unknown dtype {shorten(repr(dtype))}")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise NotSafetensors(f"tensor {name!r}: malformed shape or offsets")
        start, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= start <= end <= payload or end - start != numel * _DTYPE_SIZES[dtype]:
            raise NotSafetensors(
                f"tensor {name!r}: its shape {shape} does not fit the bytes sent "
                f"(truncated body or a header claiming more data than present)"
            )
        covered += end - start
        tensors[full_name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if covered != payload:
        raise NotSafetensors("body is not a safetensors file: data does not match the header")
    return tensors, dict(raw_meta)


def dumps(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise tensors (made contiguous, moved to CPU) with string metadata.

    The header is rewritten with sorted keys, so equal tensors and metadata always give
    equal bytes (and an equal sha256): re-sending a re-packed upload is then a no-op.
    """
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = _st_save(clean, metadata=dict(metadata or {}))
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the payload to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + data[8 + header_len :]


def loads(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata; refuses anything that is not safetensors."""
    _, metadata = inspect_header(data)
    try:
        tensors = _st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise NotSafetensors(f"body is not a safetensors file: {exc}") from None
    return tensors, metadata


def read_metadata(data: bytes) -> dict[str, str]:
    return inspect_header(data)[1]


def tensor_digests(data: bytes) -> dict[str, str]:
    """``{name: sha256}`` of each tensor's dtype, shape and bytes, read from the header's
    offsets (no tensor is built). Equal digests mean interchangeable tensors."""
    header, _ = inspect_header(data)
    (header_len,) = struct.unpack("<Q", data[:8])
    base = 8 + header_len
    digests = {}
    view = memoryview(data)
    for name, info in header.items():
        offsets = info["data_offsets"]
        assert isinstance(offsets, list)  # checked by inspect_header
        start, end = int(offsets[0]), int(offsets[1])
        digest = hashlib.sha256(f"{info['dtype']}{info['shape']}".encode())
        digest.update(view[base + start : base + end])
        digests[name] = digest.hexdigest()
    return digests


def subset(data: bytes, names: Collection[str]) -> bytes:
    """A safetensors file with only the tensors ``names`` of ``data`` and its metadata.

    Raises KeyError naming the first tensor that ``data`` does not hold.
    """
    tensors, metadata = loads(data)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(missing[0])
    return dumps({n: tensors[n] for n in names}, metadata)


__all__ = [
    "MAX_HEADER_BYTES",
    "dumps",
    "inspect_header",
    "loads",
    "read_metadata",
    "sha256_bytes",
    "sha256_file",
    "subset",
    "tensor_digests",
]
