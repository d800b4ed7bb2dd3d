"""Content-addressed blob store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fl_core.blobstore import LocalBlobStore
from fl_core.errors import IntegrityError, NotFound


def test_put_get_exists_and_idempotence(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    sha = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert store.exists(sha)
    assert store.get(sha) == b"hello"
    assert store.put(b"hello") == sha
    assert list(store._tmp.iterdir()) == []


def test_streamed_put_reports_size(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    sha, size = store.put_stream([b"ab", b"cd", b""])
    assert size == 4
    assert store.get(sha) == b"abcd"


def test_failed_stream_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)

    def chunks():  # type: ignore[no-untyped-def]
        yield b"partial"
        raise RuntimeError("connection dropped")

    with pytest.raises(RuntimeError):
        store.put_stream(chunks())
    assert list(store._tmp.iterdir()) == []
    assert not store.exists(hashlib.sha256(b"partial").hexdigest())


def test_unknown_and_malformed_digests(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(NotFound):
        store.get("0" * 64)
    with pytest.raises(NotFound):
        store.get("../../etc/passwd")
    assert not store.exists("nothex")


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    sha = store.put(b"payload")
    store.path(sha).write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        store.get(sha)
