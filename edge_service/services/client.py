"""The edge's client of the FedInspect server, with a retry policy.

One injected :class:`httpx.Client` (base URL and timeout from settings; tests pass a
``MockTransport`` client or a ``TestClient`` of the server app) carries every request.
:class:`ServerClient` adds the bearer token and retries what is worth retrying:

- timeouts and connection errors (including a body cut off half-way: the server's
  PUT is idempotent, so the same bytes are simply sent again),
- 5xx answers, and 429; a ``Retry-After`` header (seconds or an HTTP date) is honoured,

with exponential backoff and full jitter, until the request's retry budget is spent.
Other 4xx answers are final: they raise :class:`~fl_core.errors.RemoteError` carrying
the server's ``detail`` and status. Sleeping goes through an injectable function, so
tests run at full speed and a stopping edge interrupts a wait at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from edge_service.config import Settings
from fedinspect.service import log_event, redact_url, utcnow
from fl_core.errors import ConfigError, IntegrityError, RemoteError, Unavailable
from fl_core.schemas import (
    Cycle,
    EdgeEvaluationReport,
    ModelInfo,
    ModelManifest,
    RoundUpdateAck,
    ServerLink,
    TensorSubset,
    UploadAck,
)
from fl_core.serialization import sha256_bytes

log = logging.getLogger("edge_service.client")

Sleep = Callable[[float], None]
"""``sleep(seconds)``; may raise to abandon the wait (the edge is stopping)."""

_M = TypeVar("_M", bound=BaseModel)

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often one request is retried."""

    budget_s: float = 120.0
    base_s: float = 0.5
    max_s: float = 15.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_budget_s, settings.retry_base_s, settings.retry_max_s)

    def backoff(self, attempt: int, rand: float) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)], attempt from 0.

        Never zero, so a burst of failures still spreads out a little.
        """
        ceiling = min(self.max_s, self.base_s * (2**attempt))
        return max(ceiling * rand, ceiling * 0.1)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Parse a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else str(detail)
    text = response.text.strip()
    return text[:500] if text else response.reason_phrase or "no detail"


def build_http_client(settings: Settings) -> httpx.Client:
    """The production client: base URL and timeout from settings.

    httpx's own transport retries are off: retries are :class:`ServerClient`'s job,
    with a budget and backoff, and doing both would multiply attempts.
    """
    return httpx.Client(
        base_url=settings.server_url,
        timeout=httpx.Timeout(settings.request_timeout_s),
        transport=httpx.HTTPTransport(retries=0),
        follow_redirects=False,
    )


class ServerClient:
    """Typed calls of the server's v1 API over one ``httpx.Client``, with retries."""

    def __init__(
        self,
        http: httpx.Client,
        token: str | None,
        policy: RetryPolicy,
        sleep: Sleep = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        on_transfer: Callable[[str, int], None] | None = None,
    ) -> None:
        self.http = http
        self._token = token
        self.policy = policy
        self.sleep = sleep
        self.clock = clock
        self.rand = rand
        self.on_transfer = on_transfer
        self.attempts = 0  # total attempts made, for tests and logs

    # ------------------------------------------------------------------ core

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        if not self._token:
            raise ConfigError(
                "this edge has no server token: set FEDINSPECT_EDGE_TOKEN to the token "
                "issued by the server's POST /v1/edges"
            )
        return {"Authorization": f"Bearer {self._token}", **(extra or {})}

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201),
    ) -> httpx.Response:
        """Send one request, retrying transient failures within the retry budget."""
        all_headers = self._headers(headers)
        started = self.clock()
        attempt = 0
        while True:
            self.attempts += 1
            failure: str
            wait_hint: float | None = None
            status: int | None = None
            try:
                # the timeout is the injected client's own (settings, or a test's choice)
                response = self.http.request(method, path, content=content, headers=all_headers)
            except httpx.UnsupportedProtocol as exc:
                # a wrong URL does not heal by waiting: fail at once
                raise ConfigError(
                    f"FEDINSPECT_EDGE_SERVER_URL is not a usable URL: {self.http.base_url} ({exc})"
                ) from None
            except httpx.TimeoutException as exc:
                failure = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                failure = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                if response.status_code in ok:
                    return response
                status = response.status_code
                detail = _detail(response)
                if status not in _RETRY_STATUSES:
                    raise RemoteError(
                        f"server answered {status} to {method} {path}: {detail}", status
                    )
                failure = f"server answered {status}: {detail}"
                if status in (429, 503):
                    wait_hint = retry_after_seconds(response.headers.get("Retry-After"))
            elapsed = self.clock() - started
            delay = self.policy.backoff(attempt, self.rand())
            if wait_hint is not None:
                # the server knows best; the floor keeps "Retry-After: 0" from spinning
                delay = max(wait_hint, min(delay, self.policy.base_s))
            if elapsed + delay > self.policy.budget_s:
                message = (
                    f"{method} {path} failed after {attempt + 1} attempts in {elapsed:.1f}s "
                    f"(retry budget {self.policy.budget_s:.0f}s): {failure}"
                )
                if status is not None:
                    raise RemoteError(message, status)
                where = redact_url(str(self.http.base_url))
                raise Unavailable(f"cannot reach the server at {where}: {message}")
            log_event(
                log,
                "request.retry",
                logging.WARNING,
                method=method,
                path=path,
                delay_s=f"{delay:.2f}",
                attempt=attempt + 1,
                failure=failure,
            )
            self.sleep(delay)
            attempt += 1

    def _model(self, model: type[_M], response: httpx.Response, what: str) -> _M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise RemoteError(
                f"the server's {what} did not parse: {exc}", response.status_code
            ) from None

    # ------------------------------------------------------------------ API

    def create_cycle(self) -> Cycle:
        return self._model(Cycle, self.request("POST", "/v1/cycles"), "cycle")

    def get_cycle(self, cycle_id: int) -> Cycle:
        return self._model(Cycle, self.request("GET", f"/v1/cycles/{cycle_id}"), "cycle")

    def upload_features(self, cycle_id: int, body: bytes) -> UploadAck:
        response = self.request(
            "PUT",
            f"/v1/cycles/{cycle_id}/features",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        if self.on_transfer is not None:
            self.on_transfer("upload", len(body))
        return self._model(UploadAck, response, "upload acknowledgement")

    def upload_round_update(self, cycle_id: int, round_number: int, body: bytes) -> RoundUpdateAck:
        """This edge's update of a federated round (idempotent, as feature uploads)."""
        response = self.request(
            "PUT",
            f"/v1/cycles/{cycle_id}/rounds/{round_number}/update",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        if self.on_transfer is not None:
            self.on_transfer("upload", len(body))
        return self._model(RoundUpdateAck, response, "update acknowledgement")

    def get_model(self, version: int | str) -> ModelInfo:
        return self._model(ModelInfo, self.request("GET", f"/v1/models/{version}"), "model")

    def _download_checked(self, path: str, sha256: str, what: str) -> bytes:
        """The bytes at ``path``; IntegrityError unless their sha256 is ``sha256``."""
        data = self.request("GET", path).content
        if self.on_transfer is not None:
            self.on_transfer("download", len(data))
        actual = sha256_bytes(data)
        if actual != sha256:
            raise IntegrityError(f"{what} has sha256 {actual}, expected {sha256}: refusing it")
        return data

    def download_weights(self, version: int, sha256: str) -> bytes:
        """The weights of ``version``; IntegrityError unless their sha256 is ``sha256``."""
        return self._download_checked(
            f"/v1/models/{version}/weights", sha256, f"the weights file of model {version}"
        )

    def get_manifest(self, version: int) -> ModelManifest:
        """Per-tensor digests of ``version``'s weights."""
        response = self.request("GET", f"/v1/models/{version}/manifest")
        if self.on_transfer is not None:
            self.on_transfer("download", len(response.content))
        return self._model(ModelManifest, response, "model manifest")

    def download_update(self, version: int, sha256: str) -> bytes:
        """The averaged update that made round model ``version`` from its parent;
        IntegrityError unless its sha256 is ``sha256`` (the manifest's)."""
        return self._download_checked(
            f"/v1/models/{version}/update", sha256, f"the averaged update of model {version}"
        )

    def download_tensors(self, version: int, names: list[str]) -> bytes:
        """Only the named tensors of ``version`` (safetensors with the full metadata).

        Not checked here: the caller rebuilds the full weights and checks their sha256.
        """
        body = TensorSubset(names=names).model_dump_json().encode()
        response = self.request(
            "POST",
            f"/v1/models/{version}/weights/subset",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        if self.on_transfer is not None:
            self.on_transfer("download", len(response.content))
        return response.content

    def report_evaluation(self, version: int, report: EdgeEvaluationReport) -> None:
        """Tell the server how server model ``version`` did here (metrics only)."""
        self.request(
            "PUT",
            f"/v1/models/{version}/evaluation",
            content=report.model_dump_json().encode(),
            headers={"Content-Type": "application/json"},
        )

    def check(self, timeout_s: float = 3.0) -> ServerLink:
        """One authenticated request to the server, no retries: can this edge work?

        The URL it reports has its user info (a password, perhaps) redacted."""
        raw = str(self.http.base_url)
        url = redact_url(raw)
        if not self._token:
            return ServerLink(
                url=url,
                reachable=False,
                authorized=False,
                detail="no server token: set FEDINSPECT_EDGE_TOKEN to the token issued by "
                "the server's POST /v1/edges",
            )
        try:
            # built, then sent: a short timeout of its own, whatever the client's default
            request = self.http.build_request(
                "GET",
                "/v1/cycles",
                params={"limit": 1},
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=timeout_s,
            )
            response = self.http.send(request)
        except httpx.HTTPError as exc:
            return ServerLink(
                url=url,
                reachable=False,
                authorized=False,
                detail=f"cannot reach the server at {url}: {type(exc).__name__}: "
                + str(exc).replace(raw, url),
            )
        if response.status_code == 200:
            return ServerLink(url=url, reachable=True, authorized=True, detail="ok")
        detail = _detail(response)
        if response.status_code in (401, 403):
            return ServerLink(
                url=url,
                reachable=True,
                authorized=False,
                detail=f"the server refused this edge's token ({response.status_code}: "
                f"{detail}): check FEDINSPECT_EDGE_TOKEN",
            )
        return ServerLink(
            url=url,
            reachable=True,
            authorized=False,
            detail=f"the server answered {response.status_code}: {detail}",
        )


__all__ = [
    "RetryPolicy",
    "ServerClient",
    "Sleep",
    "build_http_client",
    "retry_after_seconds",
]
