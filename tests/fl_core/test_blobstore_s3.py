"""The S3 blob store against a real S3 API server on loopback (moto, in its own
process): content addressing, checksums on read, streamed and failed puts, and an
unreachable endpoint answered as Unavailable (a service's 503)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from fl_core.blobstore import S3BlobStore, open_blob_store
from fl_core.errors import ConfigError, IntegrityError, NotFound, Unavailable
from tests.services import S3Server


@pytest.fixture
def store(s3_server: S3Server, s3_env: dict[str, str]) -> S3BlobStore:
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    made = open_blob_store(f"s3://{bucket}/fedinspect/blobs", tmp_dir(), s3_server.endpoint)
    assert isinstance(made, S3BlobStore)
    made.check()  # creates the bucket, as a server's start does
    return made


def tmp_dir() -> Path:
    return Path("/nonexistent-never-used")


def _objects(store: S3BlobStore) -> list[str]:
    client = boto3.session.Session().client(
        "s3", endpoint_url=store.endpoint_url, region_name="us-east-1"
    )
    listing = client.list_objects_v2(Bucket=store.bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_put_get_exists_and_idempotence(store: S3BlobStore) -> None:
    assert not store.any_blob()
    sha = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert store.exists(sha) and store.any_blob()
    assert store.get(sha) == b"hello"
    assert store.put(b"hello") == sha
    assert _objects(store) == [f"fedinspect/blobs/{sha[:2]}/{sha}"]
    assert store.local_path(sha) is None


def test_streamed_put_of_a_multipart_size(store: S3BlobStore) -> None:
    # Past 8 MiB the spool goes to disk and boto3 uploads in parts.
    chunk = bytes(range(256)) * 4096  # 1 MiB
    chunks = [chunk] * 9 + [b"tail"]
    sha, size = store.put_stream(iter(chunks))
    assert size == 9 * len(chunk) + 4
    assert store.get(sha) == b"".join(chunks)


def test_failed_stream_leaves_nothing(store: S3BlobStore) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("connection dropped")

    with pytest.raises(RuntimeError):
        store.put_stream(chunks())
    assert _objects(store) == []
    assert not store.exists(hashlib.sha256(b"partial").hexdigest())


def test_unknown_and_malformed_digests(store: S3BlobStore) -> None:
    with pytest.raises(NotFound):
        store.get("0" * 64)
    with pytest.raises(NotFound):
        store.get("../../etc/passwd")
    assert not store.exists("nothex")


def test_rotted_bytes_are_refused_on_read(store: S3BlobStore) -> None:
    sha = store.put(b"weights")
    client = boto3.session.Session().client(
        "s3", endpoint_url=store.endpoint_url, region_name="us-east-1"
    )
    client.put_object(Bucket=store.bucket, Key=f"fedinspect/blobs/{sha[:2]}/{sha}", Body=b"rot")
    with pytest.raises(IntegrityError, match="is corrupt"):
        store.get(sha)


def test_an_unreachable_endpoint_is_unavailable(s3_env: dict[str, str]) -> None:
    from tests.integration.processes import free_port

    dead = S3BlobStore("bucket", "p", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unavailable, match="unreachable"):
        dead.put(b"x")
    with pytest.raises(Unavailable):
        dead.check()


def test_only_s3_urls_are_accepted() -> None:
    with pytest.raises(ConfigError, match="unsupported blob store URL"):
        open_blob_store("ftp://host/x", tmp_dir())
