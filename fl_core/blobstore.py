"""Content-addressed blob store: put, get, exists, by sha256.

The local implementation writes each blob to a temporary file in the same directory,
fsyncs it, renames it into place and fsyncs the directory, so a blob either exists
whole or not at all, whatever moment the process is killed. Services depend on the
:class:`BlobStore` protocol only, so an S3-compatible store can replace it later.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from fl_core.errors import InsufficientStorage, IntegrityError, NotFound

#: errno values of a full disk (or quota): the write failed, nothing is stored
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

_CHUNK = 1 << 20


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]: ...

    def get(self, sha256: str) -> bytes: ...

    def exists(self, sha256: str) -> bool: ...

    def path(self, sha256: str) -> Path: ...


def _check_digest(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise NotFound(f"no blob {sha256!r}")
    return sha256


class LocalBlobStore:
    """Blobs under ``root/ab/abcdef...`` (first two hex digits as a fan-out folder)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        _check_digest(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except NotFound:
            return False

    def put(self, data: bytes) -> str:
        return self.put_stream([data])[0]

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Write chunks durably; returns ``(sha256, size)``. Idempotent by content."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            sha = digest.hexdigest()
            final = self.path(sha)
            if final.is_file():
                tmp.unlink()
                return sha, size
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return sha, size
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in _DISK_FULL:
                raise InsufficientStorage("no space left on the device of the blob store") from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, sha256: str) -> bytes:
        path = self.path(sha256)
        if not path.is_file():
            raise NotFound(f"no blob {sha256}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"blob {sha256} is corrupt on disk")
        return data

    def clean_tmp(self) -> int:
        """Remove temporary files left by a killed process; returns how many."""
        removed = 0
        for p in self._tmp.iterdir():
            p.unlink(missing_ok=True)
            removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["BlobStore", "LocalBlobStore"]
