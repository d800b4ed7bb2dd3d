"""Content-addressed blob store: put, get, exists, by sha256.

The local implementation writes each blob to a temporary file in the same directory,
fsyncs it, renames it into place and fsyncs the directory, so a blob either exists
whole or not at all, whatever moment the process is killed. :class:`S3BlobStore` keeps
blobs in an S3-compatible object store (AWS S3, MinIO), where a PUT is atomic: an
object appears whole when it completes, or not at all. Services depend on the
:class:`BlobStore` protocol only; :func:`open_blob_store` picks one from a URL.
Both verify a blob's sha256 when it is read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from fl_core.errors import (
    ConfigError,
    InsufficientStorage,
    IntegrityError,
    NotFound,
    Unavailable,
)

#: errno values of a full disk (or quota): the write failed, nothing is stored
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

_CHUNK = 1 << 20
#: a streamed S3 upload is spooled in memory up to this size, then on a temporary file
_SPOOL_BYTES = 8 << 20


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]: ...

    def get(self, sha256: str) -> bytes: ...

    def exists(self, sha256: str) -> bool: ...

    def local_path(self, sha256: str) -> Path | None:
        """The blob's file when the store is a local folder (None for remote stores)."""
        ...

    def any_blob(self) -> bool:
        """Whether the store holds at least one blob."""
        ...

    def check(self) -> None:
        """Raise :class:`~fl_core.errors.Unavailable` when the store cannot be reached."""
        ...

    def clean_tmp(self) -> int: ...

    def describe(self) -> str:
        """Where the blobs are, for messages (no credentials)."""
        ...


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

    def local_path(self, sha256: str) -> Path | None:
        path = self.path(sha256)
        if not path.is_file():
            raise NotFound(f"no blob {sha256}")
        return path

    def any_blob(self) -> bool:
        return any(
            child.is_file()
            for folder in self.root.iterdir()
            if folder.is_dir() and folder != self._tmp
            for child in folder.iterdir()
        )

    def check(self) -> None:
        if not os.access(self._tmp, os.W_OK):
            raise Unavailable(f"blob folder {self.root} is not writable")

    def describe(self) -> str:
        return str(self.root)

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


class S3BlobStore:
    """Blobs as objects ``PREFIX/ab/abcdef...`` in a bucket of an S3-compatible store.

    Credentials and region come from boto3's usual sources (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ...). The bucket is created on
    first use when it does not exist. Unreachable endpoints and 5xx answers raise
    :class:`~fl_core.errors.Unavailable`, so a service answers 503, never a half blob.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ConfigError(
                "an s3:// blob store needs boto3: pip install 'fedinspect[s3]'"
            ) from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        config = Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=config,
        )
        # One stream per upload, no helper threads: the caller's thread does the work.
        self._transfer = TransferConfig(multipart_threshold=_SPOOL_BYTES, use_threads=False)
        self._bucket_ready = False

    def _key(self, sha256: str) -> str:
        _check_digest(sha256)
        name = f"{sha256[:2]}/{sha256}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if status == 404 or code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}:
                raise NotFound(f"no blob in {self.describe()} ({what})") from None
            if status >= 500 or status in (0, 429):
                raise Unavailable(f"blob store {self.describe()} failed ({code})") from None
            raise
        except BotoCoreError as exc:
            raise Unavailable(
                f"blob store {self.describe()} unreachable ({type(exc).__name__})"
            ) from None

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            self._call("bucket", self._client.head_bucket, Bucket=self.bucket)
        except NotFound:
            from botocore.exceptions import ClientError

            try:
                self._call("bucket", self._client.create_bucket, Bucket=self.bucket)
            except ClientError as exc:  # another replica created it first
                if exc.response.get("Error", {}).get("Code") not in {
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                }:
                    raise
        self._bucket_ready = True

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    def local_path(self, sha256: str) -> Path | None:
        return None

    def exists(self, sha256: str) -> bool:
        try:
            key = self._key(sha256)
        except NotFound:
            return False
        self._ensure_bucket()
        try:
            self._call(sha256, self._client.head_object, Bucket=self.bucket, Key=key)
        except NotFound:
            return False
        return True

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.exists(sha):
            return sha
        # One PUT: the object exists whole once it returns, or not at all. The store
        # checks the body against the sha256 we send, so a corrupted transfer fails.
        self._call(
            sha,
            self._client.put_object,
            Bucket=self.bucket,
            Key=self._key(sha),
            Body=data,
            ChecksumSHA256=_b64(bytes.fromhex(sha)),
        )
        return sha

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Spool the chunks (memory, then disk past 8 MiB) while hashing, then upload."""
        digest = hashlib.sha256()
        size = 0
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            sha = digest.hexdigest()
            if self.exists(sha):
                return sha, size
            spool.seek(0)
            # Past the threshold this is a multipart upload: S3 shows the object only
            # when it completes, and boto3 aborts it when a part fails.
            self._call(
                sha,
                self._client.upload_fileobj,
                spool,
                self.bucket,
                self._key(sha),
                Config=self._transfer,
            )
        return sha, size

    def get(self, sha256: str) -> bytes:
        key = self._key(sha256)
        self._ensure_bucket()
        response = self._call(sha256, self._client.get_object, Bucket=self.bucket, Key=key)
        from botocore.exceptions import BotoCoreError

        try:
            data: bytes = response["Body"].read()
        except BotoCoreError as exc:
            raise Unavailable(
                f"blob store {self.describe()} unreachable ({type(exc).__name__})"
            ) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"blob {sha256} is corrupt in {self.describe()}")
        return data

    def any_blob(self) -> bool:
        self._ensure_bucket()
        listing = self._call(
            "list",
            self._client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=f"{self.prefix}/" if self.prefix else "",
            MaxKeys=1,
        )
        return bool(listing.get("KeyCount", 0))

    def check(self) -> None:
        self._bucket_ready = False
        self._ensure_bucket()

    def clean_tmp(self) -> int:
        return 0  # nothing temporary is ever visible in the bucket


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


def open_blob_store(
    url: str | None, local_dir: Path, endpoint_url: str | None = None
) -> LocalBlobStore | S3BlobStore:
    """The store named by ``url`` (``s3://BUCKET/PREFIX``), or the folder ``local_dir``."""
    if not url:
        return LocalBlobStore(local_dir)
    parts = urlsplit(url)
    if parts.scheme == "s3" and parts.netloc:
        return S3BlobStore(parts.netloc, parts.path, endpoint_url)
    if parts.scheme == "file":
        return LocalBlobStore(Path(parts.path))
    raise ConfigError(f"unsupported blob store URL {url!r}: use s3://BUCKET/PREFIX")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["BlobStore", "LocalBlobStore", "S3BlobStore", "open_blob_store"]
