"""Guards both services put in front of their routes, as plain ASGI middleware.

They live here, beside :mod:`fedinspect.service`, not in ``fl_core``: they are web
code, and ``fl_core`` stays usable from a notebook. Nothing here imports a web
framework either (FastAPI's route objects are read duck-typed), so a guard can be
tested with hand-written ASGI messages.

- :class:`RequestGuard` (outermost): answers 401 on an authenticated route before a
  byte of the body is read, refuses bodies over a per-route limit (413, by
  Content-Length or while counting), keeps one caller from holding every upload slot,
  cuts off bodies that stall or trickle below a minimum rate (408), and logs a client
  that hangs up mid-body as one WARNING line.
- :class:`RequestMetrics`: counts requests by route template, method and status.
- :class:`AdmissionControl`: a bound on requests and uploads handled at once.
- Small ASGI helpers: a whole ``{"detail": ...}`` reply, the bearer token of a request,
  the metric label of a method.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fl_core.errors import AuthError, shorten

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: methods counted under their own name in metrics; anything else is ``other``
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

#: scope["state"] key under which the guard leaves the authenticated caller's key
CALLER_KEY = "fedinspect.caller"


def method_label(method: str) -> str:
    """The metric label of an HTTP method: itself if standard, else ``other``."""
    return method if method in KNOWN_METHODS else "other"


async def send_json(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Send a whole ``{"detail": ...}`` response."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token:
                return token
            return None
    return None


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _depends_on(dependant: Any, dependency: object) -> bool:
    return any(
        d.call is dependency or _depends_on(d, dependency)
        for d in getattr(dependant, "dependencies", ())
    )


def route_needs(dependency: object) -> Callable[[Scope], bool]:
    """``needs(scope)``: whether the route a request was routed to depends on
    ``dependency``, directly, through other dependencies or through its routers'.

    FastAPI leaves the route in ``scope["route"]`` and, since it resolves routers'
    dependencies per request, the route as included (with them) in
    ``scope["fastapi"]["effective_route_context"]``; both are read duck-typed, so that
    no web framework is imported here. :class:`RequestGuard` authenticates exactly
    these routes before their body is read: FastAPI reads a body before it solves
    dependencies.
    """
    known: dict[int, bool] = {}

    def needs(scope: Scope) -> bool:
        fastapi_state = scope.get("fastapi")
        candidates = [scope.get("route")]
        if isinstance(fastapi_state, dict):
            candidates.append(fastapi_state.get("effective_route_context"))
        for route in candidates:
            if route is None:
                continue
            if id(route) not in known:
                dependant = getattr(route, "dependant", None)
                known[id(route)] = _depends_on(dependant, dependency)
            if known[id(route)]:
                return True
        return False

    return needs


class _Refused(Exception):
    def __init__(
        self, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or []


class RequestGuard:
    """Auth before the body, body size and rate limits, quiet client disconnects.

    The checks run when the app first asks for the body, after routing (so the route
    is known) and before a byte is read: ``needs_auth(scope)`` says whether the route
    takes a token; ``authenticate(scope, token)`` returns a key naming the caller or
    raises :class:`AuthError`, whose detail becomes the 401 (routes that read no body
    keep authenticating in their own dependencies). A request that ``is_upload(scope)``
    (by default a PUT) may send ``max_upload_bytes``, any other ``max_request_bytes``
    (413 from Content-Length, or while counting). A caller sends at most
    ``max_uploads_per_caller`` uploads at once; more are answered 503 with Retry-After.
    A body must keep arriving: a gap of more than ``idle_timeout_s`` between chunks, or
    fewer than ``min_rate`` bytes a second on average once ``idle_timeout_s`` has passed
    since the app first asked for the body (time spent waiting for admission does not
    count), ends it with 408.
    A client that hangs up mid-body is logged as one WARNING line, no traceback.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        needs_auth: Callable[[Scope], bool],
        authenticate: Callable[[Scope, str | None], Awaitable[str]],
        max_upload_bytes: int,
        max_request_bytes: int,
        idle_timeout_s: float,
        min_rate: float,
        logger: logging.Logger,
        too_large_detail: Callable[[Scope, int], str] | None = None,
        max_uploads_per_caller: int | None = None,
        is_upload: Callable[[Scope], bool] | None = None,
    ) -> None:
        self.app = app
        self.needs_auth = needs_auth
        self.authenticate = authenticate
        self.max_upload_bytes = max_upload_bytes
        self.max_request_bytes = max_request_bytes
        self.idle_timeout_s = idle_timeout_s
        self.min_rate = min_rate
        self.logger = logger
        self.too_large_detail = too_large_detail or (
            lambda _scope, limit: f"request body too large: the limit is {limit} bytes"
        )
        self.max_uploads_per_caller = max_uploads_per_caller
        self.is_upload = is_upload or (lambda scope: scope.get("method") == "PUT")
        self.uploads_by_caller: dict[str, int] = {}

    def body_limit(self, scope: Scope) -> int:
        """The largest body this request may send."""
        return self.max_upload_bytes if self.is_upload(scope) else self.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted: list[str] = []  # the caller whose upload this request counts as
        try:
            await self._guarded(scope, receive, send, counted)
        finally:
            for key in counted:
                left = self.uploads_by_caller[key] - 1
                if left:
                    self.uploads_by_caller[key] = left
                else:
                    del self.uploads_by_caller[key]

    async def _admit(self, scope: Scope, counted: list[str]) -> None:
        """The checks due before the first byte of the body: auth, per-caller uploads,
        declared size. Raises :class:`_Refused`."""
        if self.needs_auth(scope):
            try:
                key = await self.authenticate(scope, bearer_token(scope))
            except AuthError as exc:
                # the challenge goes with a 401 only, as in the services' error handlers
                challenge = [(b"www-authenticate", b"Bearer")] if exc.http_status == 401 else []
                raise _Refused(exc.http_status, exc.detail, challenge) from None
            scope.setdefault("state", {})[CALLER_KEY] = key
            if self.max_uploads_per_caller is not None and self.is_upload(scope):
                if self.uploads_by_caller.get(key, 0) >= self.max_uploads_per_caller:
                    raise _Refused(
                        503,
                        "server busy: too many concurrent uploads from this caller; retry later",
                        [(b"retry-after", b"1")],
                    )
                self.uploads_by_caller[key] = self.uploads_by_caller.get(key, 0) + 1
                counted.append(key)
        limit = self.body_limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise _Refused(413, self.too_large_detail(scope, limit))

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, counted: list[str]
    ) -> None:
        started = 0.0  # when the app first asked for the body: waits before it are ours
        limit = self.body_limit(scope)
        received = 0
        admitted = False
        body_done = False
        disconnected = False
        refused: _Refused | None = None
        response_started = False

        async def guarded_receive() -> Message:
            nonlocal received, admitted, body_done, disconnected, refused, started
            if refused is not None:
                raise refused
            if body_done:
                return await receive()
            if not admitted:
                admitted = True
                try:
                    await self._admit(scope, counted)
                except _Refused as exc:
                    refused = exc
                    raise
                started = time.monotonic()
            # the body must keep coming: no long gap, and a minimum average rate
            allowed = started + self.idle_timeout_s + received / self.min_rate
            timeout = min(self.idle_timeout_s, allowed - time.monotonic())
            try:
                if timeout <= 0:
                    raise TimeoutError
                # asyncio.timeout, not wait_for: wait_for wraps every chunk's receive in
                # a new task (a 1.5 MB upload arrives in dozens of chunks)
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                refused = _Refused(
                    408,
                    f"request body too slow: at least {int(self.min_rate)} bytes/s, and no "
                    f"pause over {self.idle_timeout_s:g} s",
                    [(b"connection", b"close")],
                )
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = _Refused(
                        413, self.too_large_detail(scope, limit), [(b"connection", b"close")]
                    )
                    raise refused
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused is not None:
                return  # whatever the app makes of a refused body is dropped
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refused is None and not (disconnected and not body_done):
                raise
        if disconnected and not body_done:
            self.logger.warning(
                "event=request.disconnected method=%s path=%s received_bytes=%d",
                method_label(str(scope.get("method", ""))),
                shorten(str(scope.get("path", ""))),
                received,
            )
            return
        if refused is not None and not response_started:
            if refused.status in (408, 413):
                self.logger.info(
                    "event=request.refused status=%d method=%s path=%s received_bytes=%d",
                    refused.status,
                    method_label(str(scope.get("method", ""))),
                    shorten(str(scope.get("path", ""))),
                    received,
                )
            await send_json(send, refused.status, refused.detail, refused.headers)


class RequestMetrics:
    """Counts every HTTP request by its route template (not its raw path), method and
    status: ``count(route, method, status)``, once the request is done."""

    def __init__(self, app: ASGIApp, count: Callable[[str, str, str], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # Raw paths of unknown URLs would grow the label set without bound.
            template = getattr(scope.get("route"), "path", None) or "<unmatched>"
            # Likewise any method name a client makes up: one label for them all.
            self.count(template, method_label(str(scope.get("method", ""))), str(status))


class AdmissionControl:
    """Bounds concurrent requests, and concurrent uploads (``is_upload(scope)``; by
    default PUT). Past a bound a request waits up to ``wait_s`` for a slot, then gets
    503 with Retry-After instead of queueing without end. That keeps a burst of clients
    from exhausting the worker threads and database connections (every request would
    then time out), and bounds the memory that upload bodies take. ``exempt`` paths
    (``/health``) are never refused, so probes keep working under load."""

    def __init__(
        self,
        app: ASGIApp,
        max_requests: int,
        max_uploads: int,
        wait_s: float,
        retry_after_s: float = 1.0,
        *,
        is_upload: Callable[[Scope], bool] | None = None,
        exempt: frozenset[str] = frozenset({"/health"}),
    ) -> None:
        self.app = app
        self.requests = asyncio.Semaphore(max_requests)
        self.uploads = asyncio.Semaphore(max_uploads)
        self.wait_s = wait_s
        self.retry_after = str(max(1, math.ceil(retry_after_s)))
        self.is_upload = is_upload or (lambda scope: scope.get("method") == "PUT")
        self.exempt = exempt

    async def _acquire(self, slots: asyncio.Semaphore) -> bool:
        try:
            await asyncio.wait_for(slots.acquire(), timeout=self.wait_s)
        except TimeoutError:
            return False
        return True

    async def _busy(self, send: Send, what: str) -> None:
        await send_json(
            send,
            503,
            f"server busy: too many concurrent {what}; retry later",
            [(b"retry-after", self.retry_after.encode())],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        upload = self.is_upload(scope)
        if upload and not await self._acquire(self.uploads):
            await self._busy(send, "uploads")
            return
        try:
            if not await self._acquire(self.requests):
                await self._busy(send, "requests")
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self.requests.release()
        finally:
            if upload:
                self.uploads.release()


__all__ = [
    "CALLER_KEY",
    "KNOWN_METHODS",
    "AdmissionControl",
    "RequestGuard",
    "RequestMetrics",
    "bearer_token",
    "method_label",
    "route_needs",
    "send_json",
]
