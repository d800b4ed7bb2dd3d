"""The server client's retry policy, against a MockTransport that counts attempts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from edge_service.services.client import RetryPolicy, ServerClient, retry_after_seconds
from fl_core.errors import ConfigError, IntegrityError, RemoteError, Unavailable
from fl_core.serialization import sha256_bytes

Handler = Callable[[httpx.Request], httpx.Response]


class FakeTime:
    """A clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted(*steps: httpx.Response | type[Exception]) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering ``steps`` in order (the last one repeats); records requests."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        step = steps[min(len(seen), len(steps)) - 1]
        if isinstance(step, httpx.Response):
            return step
        raise step("scripted", request=request)  # type: ignore[call-arg]

    return handler, seen


def make_client(
    handler: Handler, t: FakeTime, budget: float = 30.0, token: str | None = "tok"
) -> ServerClient:
    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://server.test")
    return ServerClient(
        http,
        token,
        RetryPolicy(budget_s=budget, base_s=0.5, max_s=4.0),
        sleep=t.sleep,
        clock=t.clock,
        rand=lambda: 1.0,
    )


OK = httpx.Response(200, json={"ok": True})


def test_connection_errors_are_retried_with_exponential_backoff() -> None:
    t = FakeTime()
    handler, seen = scripted(httpx.ConnectError, httpx.ConnectError, httpx.ConnectError, OK)
    response = make_client(handler, t).request("GET", "/v1/cycles/1")
    assert response.status_code == 200
    assert len(seen) == 4
    assert t.sleeps == [0.5, 1.0, 2.0]


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(budget_s=100, base_s=0.5, max_s=4.0)
    assert policy.backoff(10, 1.0) == 4.0
    assert 0.05 <= policy.backoff(0, 0.0) <= 0.5
    delays = {policy.backoff(3, r) for r in (0.2, 0.5, 0.9)}
    assert len(delays) == 3 and max(delays) <= 4.0


def test_timeouts_are_retried() -> None:
    t = FakeTime()
    handler, seen = scripted(httpx.ReadTimeout, httpx.ConnectTimeout, OK)
    assert make_client(handler, t).request("GET", "/x").status_code == 200
    assert len(seen) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried(status: int) -> None:
    t = FakeTime()
    handler, seen = scripted(httpx.Response(status, json={"detail": "busy"}), OK)
    assert make_client(handler, t).request("GET", "/x").status_code == 200
    assert len(seen) == 2


def test_503_honours_retry_after_seconds() -> None:
    t = FakeTime()
    busy = httpx.Response(503, json={"detail": "training"}, headers={"Retry-After": "7"})
    handler, seen = scripted(busy, OK)
    make_client(handler, t).request("GET", "/x")
    assert t.sleeps == [7.0] and len(seen) == 2


def test_429_honours_retry_after_http_date() -> None:
    t = FakeTime()
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    handler, seen = scripted(httpx.Response(429, headers={"Retry-After": when}), OK)
    make_client(handler, t).request("GET", "/x")
    assert len(seen) == 2
    assert 3.0 <= t.sleeps[0] <= 5.0


def test_retry_after_parsing() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds(date, now=now) == 30.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=5), usegmt=True), now) == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_4xx_is_final_and_carries_the_servers_detail(status: int) -> None:
    t = FakeTime()
    detail = "cycle 3 is no longer collecting"
    handler, seen = scripted(httpx.Response(status, json={"detail": detail}))
    with pytest.raises(RemoteError) as err:
        make_client(handler, t).request("PUT", "/v1/cycles/3/features", content=b"x")
    assert len(seen) == 1 and t.sleeps == []
    assert err.value.status == status
    assert detail in err.value.detail


def test_5xx_past_the_budget_gives_up_with_the_last_answer() -> None:
    t = FakeTime()
    handler, seen = scripted(httpx.Response(500, json={"detail": "database down"}))
    with pytest.raises(RemoteError) as err:
        make_client(handler, t, budget=10.0).request("GET", "/x")
    assert err.value.status == 500 and "database down" in err.value.detail
    assert sum(t.sleeps) <= 10.0
    assert len(seen) == len(t.sleeps) + 1 >= 3


def test_unreachable_server_past_the_budget_is_unavailable() -> None:
    t = FakeTime()
    handler, seen = scripted(httpx.ConnectError)
    with pytest.raises(Unavailable) as err:
        make_client(handler, t, budget=5.0).request("GET", "/x")
    assert "cannot reach the server" in err.value.detail
    assert sum(t.sleeps) <= 5.0 and len(seen) >= 3


def test_interrupted_upload_is_sent_again_with_the_same_bytes() -> None:
    t = FakeTime()
    ack = httpx.Response(
        200,
        json={
            "cycle_id": 3,
            "edge_id": "e",
            "rows": 2,
            "sha256": "0" * 64,
            "unchanged": False,
            "replaced": False,
        },
    )
    handler, seen = scripted(httpx.WriteError, httpx.RemoteProtocolError, ack)
    body = b"\x00" * 5000
    result = make_client(handler, t).upload_features(3, body)
    assert result.rows == 2
    assert [r.content for r in seen] == [body, body, body]
    assert all(r.method == "PUT" and r.url.path == "/v1/cycles/3/features" for r in seen)


def test_every_request_carries_the_edge_token() -> None:
    t = FakeTime()
    handler, seen = scripted(OK)
    make_client(handler, t, token="s3cret").request("GET", "/x")
    assert seen[0].headers["Authorization"] == "Bearer s3cret"


def test_no_token_is_a_clear_config_error() -> None:
    t = FakeTime()
    handler, seen = scripted(OK)
    with pytest.raises(ConfigError, match="FEDINSPECT_EDGE_TOKEN"):
        make_client(handler, t, token=None).request("GET", "/x")
    assert seen == []


def test_weights_with_the_wrong_digest_are_refused() -> None:
    t = FakeTime()
    data = b"weights"
    handler, _ = scripted(httpx.Response(200, content=data))
    client = make_client(handler, t)
    assert client.download_weights(1, sha256_bytes(data)) == data
    with pytest.raises(IntegrityError, match="expected"):
        client.download_weights(1, "0" * 64)


def test_a_wrong_server_url_fails_at_once() -> None:
    t = FakeTime()
    handler, seen = scripted(httpx.UnsupportedProtocol)
    with pytest.raises(ConfigError, match="SERVER_URL"):
        make_client(handler, t).request("GET", "/x")
    assert len(seen) == 1 and t.sleeps == []


def test_retry_after_beyond_the_budget_gives_up_without_waiting() -> None:
    t = FakeTime()
    busy = httpx.Response(
        503, json={"detail": "down for maintenance"}, headers={"Retry-After": "3600"}
    )
    handler, seen = scripted(busy)
    with pytest.raises(RemoteError, match="down for maintenance"):
        make_client(handler, t, budget=60.0).request("GET", "/x")
    assert len(seen) == 1 and t.sleeps == []
