"""HTTP/1.1 by hand over a socket, for what httpx will not do: declare a body and not
send it, send it a byte at a time, hang up half way."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from tests.hardening.procs import HOST


@dataclass
class RawAnswer:
    status: int | None  # None: no answer before the timeout, or the connection closed
    head: bytes
    body: bytes


def open_request(
    port: int,
    method: str,
    path: str,
    declared: int,
    token: str | None = None,
    first_bytes: bytes = b"",
    content_type: str = "application/octet-stream",
) -> socket.socket:
    """A connection that sent a request's headers (``Content-Length: declared``) and
    ``first_bytes`` of its body, and nothing more yet."""
    sock = socket.create_connection((HOST, port), timeout=30)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{auth}"
        f"Content-Type: {content_type}\r\nContent-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + first_bytes)
    return sock


def read_answer(sock: socket.socket, timeout_s: float) -> RawAnswer:
    """The response on ``sock`` (status, head, body), reading for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = _content_length(head)
            if length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    return RawAnswer(status, head, body)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def request_without_body(
    port: int,
    method: str,
    path: str,
    declared: int,
    token: str | None,
    timeout_s: float = 10,
    content_type: str = "application/octet-stream",
) -> RawAnswer:
    """Send the headers of a request declaring ``declared`` body bytes, none of them, and
    read the answer: only a server that answers before reading the body answers."""
    sock = open_request(port, method, path, declared, token, content_type=content_type)
    try:
        return read_answer(sock, timeout_s)
    finally:
        sock.close()


__all__ = ["RawAnswer", "open_request", "read_answer", "request_without_body"]
