"""Bodies before auth, body limits and slow clients, against real processes (issue 24,
defects 1 and 2).

Every authenticated route answers 401 to a request that declares a large body and sends
none of it: the token is checked before a byte is read (a server that read first would
wait for the body and not answer). Bodies over a route's limit are refused from
Content-Length. Slow clients cannot starve honest ones: unauthenticated ones are
answered 401 at once, a body that stalls is cut off with 408, and one edge cannot hold
more than one upload slot.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from tests.hardening.procs import (
    EDGE_ADMIN_TOKEN,
    SERVER_ADMIN_TOKEN,
    client,
    edge_env,
    free_port,
    register_edge,
    services,
)
from tests.hardening.rawhttp import open_request, read_answer, request_without_body
from tests.server_service.helpers import make_upload

#: a body no route takes: 400 MiB, as in the probe
HUGE = 400 * 1024 * 1024
MULTIPART = "multipart/form-data; boundary=xyz"

SERVER_BODY_ROUTES = [
    ("POST", "/v1/edges"),
    ("POST", "/v1/models/1/weights/subset"),
    ("PUT", "/v1/cycles/1/features"),
    ("POST", "/v1/cycles"),
    ("POST", "/v1/cycles/1/train"),
]
EDGE_BODY_ROUTES = [
    ("POST", "/v1/jobs/finetune"),
    ("POST", "/v1/predict"),
    ("POST", "/v1/jobs/cycle"),
    ("POST", "/v1/models/1/activate"),
]


def _detail(body: bytes) -> str:
    detail: str = json.loads(body)["detail"]
    return detail


@pytest.mark.slow
def test_server_answers_401_and_413_before_reading_a_body(tmp_path: Path) -> None:
    port = free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", port, max_request_bytes="65536")
        edge = register_edge(server.url, "edge-a")
        for method, path in SERVER_BODY_ROUTES:
            for token, detail in (
                (None, "missing bearer token"),
                ("not-a-token-at-all-0123456789", "invalid or revoked token"),
            ):
                answer = request_without_body(port, method, path, HUGE, token)
                assert answer.status == 401, (method, path, answer)
                assert b"www-authenticate: Bearer" in answer.head.lower().replace(
                    b"bearer", b"Bearer"
                )
                assert _detail(answer.body) == detail
        # A valid token, a body over the route's limit: 413 from Content-Length.
        big_json = request_without_body(port, "POST", "/v1/edges", 65537, SERVER_ADMIN_TOKEN)
        assert big_json.status == 413, big_json
        assert _detail(big_json.body) == "request body too large: the limit is 65536 bytes"
        big_upload = request_without_body(port, "PUT", "/v1/cycles/1/features", HUGE, edge["token"])
        assert big_upload.status == 413, big_upload
        assert _detail(big_upload.body).startswith("upload exceeds the limit of")
        # The admin token still opens what it opened, the edge token what it did.
        with client(server.url, SERVER_ADMIN_TOKEN) as admin:
            assert admin.post("/v1/edges", json={"name": "edge-b"}).status_code == 201
        with client(server.url, edge["token"]) as c:
            assert c.post("/v1/edges", json={"name": "edge-c"}).status_code == 403
            assert c.post("/v1/cycles").status_code == 201
        server.check_alive()


@pytest.mark.slow
def test_edge_answers_401_and_413_before_reading_a_body(tmp_path: Path, image_folder: Path) -> None:
    port = free_port()
    env = edge_env(
        tmp_path / "edge", port, "http://127.0.0.1:9", "unused-server-token", "e1", image_folder
    )
    env["FEDINSPECT_EDGE_MAX_REQUEST_BYTES"] = "4096"
    with services(tmp_path) as procs:
        edge = procs.edge("edge", port, env)
        for method, path in EDGE_BODY_ROUTES:
            answer = request_without_body(port, method, path, HUGE, None, content_type=MULTIPART)
            assert answer.status == 401, (method, path, answer)
            assert _detail(answer.body).startswith("missing bearer token")
            wrong = request_without_body(
                port, method, path, HUGE, "wrong-token-0123456789", content_type=MULTIPART
            )
            assert wrong.status == 401 and _detail(wrong.body) == "invalid token"
        # The server token of this edge does not open its API either.
        assert (
            request_without_body(port, "POST", "/v1/predict", HUGE, "unused-server-token").status
            == 401
        )
        big = request_without_body(port, "POST", "/v1/jobs/finetune", 4097, EDGE_ADMIN_TOKEN)
        assert big.status == 413 and _detail(big.body) == (
            "request body too large: the limit is 4096 bytes"
        )
        big_predict = request_without_body(
            port, "POST", "/v1/predict", HUGE, EDGE_ADMIN_TOKEN, content_type=MULTIPART
        )
        assert big_predict.status == 413, big_predict
        assert _detail(big_predict.body).startswith("request body too large: the limit is")
        edge.check_alive()


def _slow_put(port: int, path: str, token: str | None) -> socket.socket:
    """An upload that declares 1 MiB and sends 1 byte of it (then nothing)."""
    return open_request(port, "PUT", path, 1024 * 1024, token, first_bytes=b"\0")


@pytest.mark.slow
def test_slow_clients_do_not_starve_honest_edges(tmp_path: Path) -> None:
    port = free_port()
    with services(tmp_path) as procs:
        server = procs.server(
            tmp_path / "server",
            port,
            max_concurrent_requests="4",
            max_concurrent_uploads="2",
            admission_wait_s="0.5",
            body_timeout_s="2",
            min_body_rate="1000",
            min_edges="3",
        )
        slow, honest = register_edge(server.url, "slow"), register_edge(server.url, "honest")
        with client(server.url, slow["token"]) as s, client(server.url, honest["token"]) as h:
            cycle = h.post("/v1/cycles").json()
            s.post("/v1/cycles")
            path = f"/v1/cycles/{cycle['id']}/features"

            # 8 unauthenticated trickling bodies: each is answered 401 at once and holds
            # no slot (before, they held every request slot for as long as they liked).
            anonymous = [_slow_put(port, path, None) for _ in range(8)]
            # 3 trickling uploads of one edge: it gets one upload slot, not all of them.
            held = [_slow_put(port, path, slow["token"]) for _ in range(3)]
            try:
                for sock in anonymous:
                    assert read_answer(sock, 10).status == 401
                # While they are held, an honest edge is served, upload included.
                assert h.get(f"/v1/cycles/{cycle['id']}").status_code == 200
                good = make_upload(cycle, honest["edge_id"], rows=16, seed=1)
                ack = h.put(path, content=good)
                assert ack.status_code == 201, ack.text
                answers = [read_answer(sock, 30) for sock in held]
            finally:
                for sock in anonymous + held:
                    sock.close()
            statuses = sorted(a.status or 0 for a in answers)
            # one got the slot and was cut off for stalling; two were refused at once
            assert statuses == [408, 503, 503], answers
            refused = [a for a in answers if a.status == 503]
            assert all(b"Retry-After" in a.head or b"retry-after" in a.head for a in refused)
            assert all(
                _detail(a.body) == "server busy: too many concurrent uploads from this caller; "
                "retry later"
                for a in refused
            )
            (cut,) = [a for a in answers if a.status == 408]
            assert _detail(cut.body).startswith("request body too slow")
            # Once it sends at a normal pace, the slow edge's upload goes through.
            mine = make_upload(cycle, slow["edge_id"], rows=16, seed=2)
            assert s.put(path, content=mine).status_code == 201
        assert "Traceback" not in server.log(200_000)
        server.check_alive()


def test_a_dribbling_body_is_cut_off_even_with_no_long_pause(tmp_path: Path) -> None:
    """One byte every 0.4 s never pauses for the 2 s idle timeout, but falls below the
    minimum rate: 408 within a bounded time, not a slot held for good."""
    port = free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", port, body_timeout_s="2", min_body_rate="1000")
        sock = open_request(
            port, "POST", "/v1/edges", 60_000, SERVER_ADMIN_TOKEN, content_type="application/json"
        )
        try:
            answer = None
            for _ in range(100):  # at most 40 s of dribbling
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                answer = read_answer(sock, 0.4)
                if answer.status is not None:
                    break
            if answer is None or answer.status is None:
                answer = read_answer(sock, 10)
        finally:
            sock.close()
        assert answer.status == 408, answer
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/health").status_code == 200


@pytest.mark.slow
def test_edge_admission_bounds_predictions_and_cuts_off_slow_bodies(
    tmp_path: Path, image_folder: Path
) -> None:
    """The edge had no admission control: any number of predictions decoded images at
    once, and a stalled body held its request for good."""
    port = free_port()
    env = edge_env(tmp_path / "edge", port, "http://127.0.0.1:9", "unused", "e1", image_folder)
    env.update(
        {
            "FEDINSPECT_EDGE_MAX_CONCURRENT_PREDICTIONS": "1",
            "FEDINSPECT_EDGE_ADMISSION_WAIT_S": "0.2",
            "FEDINSPECT_EDGE_BODY_TIMEOUT_S": "2",
            "FEDINSPECT_EDGE_MIN_BODY_RATE": "1000",
        }
    )
    with services(tmp_path) as procs:
        edge = procs.edge("edge", port, env)
        stalled = open_request(
            port,
            "POST",
            "/v1/predict",
            1024 * 1024,
            EDGE_ADMIN_TOKEN,
            first_bytes=b"--xyz\r\n",
            content_type=MULTIPART,
        )
        try:
            with client(edge.url, EDGE_ADMIN_TOKEN) as c:
                busy = None
                for _ in range(50):  # the stalled request takes the one slot at once
                    busy = c.post("/v1/predict", files={"files": ("a.png", b"x")})
                    if busy.status_code == 503:
                        break
                assert busy is not None and busy.status_code == 503, busy and busy.text
                assert busy.headers["Retry-After"] == "1"
                assert c.get("/v1/status").status_code == 200  # other routes are served
            cut = read_answer(stalled, 30)
        finally:
            stalled.close()
        assert cut.status == 408, cut
        with client(edge.url, EDGE_ADMIN_TOKEN) as c:
            # no model deployed: 409, but admitted and answered
            assert c.post("/v1/predict", files={"files": ("a.png", b"x")}).status_code == 409
        assert "Traceback" not in edge.log(200_000)
