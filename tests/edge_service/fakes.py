"""A fake FedInspect server behind ``httpx.MockTransport``: enough of the v1 API for
the edge (cycles, features, models, weights), recording every request it receives and
failing on cue (status codes or transport errors), so tests can count attempts."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx

from fl_core.features import make_spec
from fl_core.model import SplitModel, model_to_bytes
from fl_core.schemas import Cycle, CycleState, ModelInfo, UploadAck
from fl_core.serialization import inspect_header, sha256_bytes

EDGE_TOKEN = "edge-token"

#: a scripted failure: an HTTP status (with optional headers) or an exception to raise
Fault = int | tuple[int, dict[str, str]] | type[Exception]


@dataclass
class FakeServer:
    base_model: SplitModel
    new_model: SplitModel
    #: polls answered "training" before the cycle is done
    polls_before_done: int = 1
    #: final state of the cycle: done, failed or cancelled
    outcome: CycleState = CycleState.done
    reason: str | None = None
    deadline_s: float = 60.0
    requests: list[httpx.Request] = field(default_factory=list)
    #: (method, path regex) -> faults served in order before the real answer
    faults: dict[tuple[str, str], list[Fault]] = field(default_factory=dict)
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    uploads: list[bytes] = field(default_factory=list)
    #: evaluation reports received (PUT /v1/models/{version}/evaluation), parsed
    reports: list[dict[str, object]] = field(default_factory=list)
    tamper_weights: bool = False

    def __post_init__(self) -> None:
        self.weights = {1: model_to_bytes(self.base_model), 2: model_to_bytes(self.new_model)}
        self.spec = make_spec(self.base_model, 1, sha256_bytes(self.weights[1]))
        self.cycle: Cycle | None = None
        self.polls = 0

    # ------------------------------------------------------------------ helpers

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=self.transport(), base_url="http://server.test")

    def fail(self, method: str, path: str, *faults: Fault) -> None:
        self.faults.setdefault((method, path), []).extend(faults)

    def model_info(self, version: int) -> ModelInfo:
        data = self.weights[version]
        model = self.base_model if version == 1 else self.new_model
        return ModelInfo(
            version=version,
            parent=version - 1 or None,
            backbone=model.arch.backbone,
            cut=model.arch.cut,
            input_size=model.arch.input_size,
            class_names=model.class_names,
            sha256=sha256_bytes(data),
            size=len(data),
            created_at=datetime.now(UTC),
        )

    def _cycle(self, state: CycleState) -> Cycle:
        now = datetime.now(UTC)
        assert self.cycle is not None
        return self.cycle.model_copy(update={"state": state, "updated_at": now})

    # ------------------------------------------------------------------ routing

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        method, path = request.method, request.url.path
        for (f_method, pattern), queue in self.faults.items():
            if f_method == method and re.fullmatch(pattern, path) and queue:
                key = (f_method, pattern)
                self.attempts[key] = self.attempts.get(key, 0) + 1
                fault = queue.pop(0)
                if isinstance(fault, int):
                    return httpx.Response(fault, json={"detail": f"scripted {fault}"})
                if isinstance(fault, tuple):
                    status, headers = fault
                    return httpx.Response(
                        status, json={"detail": f"scripted {status}"}, headers=headers
                    )
                raise fault("scripted transport failure", request=request)  # type: ignore[call-arg]
        if request.headers.get("Authorization") != f"Bearer {EDGE_TOKEN}":
            return httpx.Response(401, json={"detail": "invalid token"})
        route = self._route(method, path)
        if route is None:
            return httpx.Response(404, json={"detail": f"no route {method} {path}"})
        return route(request)

    def _route(self, method: str, path: str) -> Callable[[httpx.Request], httpx.Response] | None:
        if method == "POST" and path == "/v1/cycles":
            return self._create_cycle
        if method == "GET" and re.fullmatch(r"/v1/cycles/\d+", path):
            return self._get_cycle
        if method == "PUT" and re.fullmatch(r"/v1/cycles/\d+/features", path):
            return self._put_features
        if method == "GET" and re.fullmatch(r"/v1/models/(\d+|latest)", path):
            return self._get_model
        if method == "GET" and re.fullmatch(r"/v1/models/\d+/weights", path):
            return self._get_weights
        if method == "GET" and path == "/v1/cycles":
            return lambda _r: httpx.Response(200, json=[])
        if method == "PUT" and re.fullmatch(r"/v1/models/\d+/evaluation", path):
            return self._put_evaluation
        return None

    def _put_evaluation(self, request: httpx.Request) -> httpx.Response:
        self.reports.append(json.loads(request.content))
        return httpx.Response(200, json={})

    def _create_cycle(self, _request: httpx.Request) -> httpx.Response:
        now = datetime.now(UTC)
        if self.cycle is None:
            self.cycle = Cycle(
                id=7,
                state=CycleState.collecting,
                base_model_version=1,
                spec=self.spec,
                spec_hash=self.spec.spec_hash(),
                min_edges=1,
                deadline=now + timedelta(seconds=self.deadline_s),
                created_at=now,
                updated_at=now,
            )
            return httpx.Response(201, content=self.cycle.model_dump_json())
        return httpx.Response(200, content=self.cycle.model_dump_json())

    def _get_cycle(self, _request: httpx.Request) -> httpx.Response:
        if self.cycle is None:
            return httpx.Response(404, json={"detail": "no such cycle"})
        self.polls += 1
        if not self.uploads or self.polls <= self.polls_before_done:
            state = CycleState.collecting if not self.uploads else CycleState.training
            return httpx.Response(200, content=self._cycle(state).model_dump_json())
        update: dict[str, object] = {"state": self.outcome, "reason": self.reason}
        if self.outcome == CycleState.done:
            update["result_model_version"] = 2
        return httpx.Response(200, content=self.cycle.model_copy(update=update).model_dump_json())

    def _put_features(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        unchanged = bool(self.uploads) and self.uploads[-1] == body
        self.uploads.append(body)
        header, _ = inspect_header(body)
        shape = header["labels"]["shape"]
        assert isinstance(shape, list)
        ack = UploadAck(
            cycle_id=7,
            edge_id="edge-1",
            rows=int(shape[0]),
            sha256=sha256_bytes(body),
            unchanged=unchanged,
            replaced=False,
        )
        return httpx.Response(200, content=ack.model_dump_json())

    def _get_model(self, request: httpx.Request) -> httpx.Response:
        tail = request.url.path.rsplit("/", 1)[1]
        version = max(self.weights) if tail == "latest" else int(tail)
        if version not in self.weights:
            return httpx.Response(404, json={"detail": f"no model {version}"})
        return httpx.Response(200, content=self.model_info(version).model_dump_json())

    def _get_weights(self, request: httpx.Request) -> httpx.Response:
        version = int(request.url.path.split("/")[3])
        if version not in self.weights:
            return httpx.Response(404, json={"detail": f"no model {version}"})
        data = self.weights[version]
        if self.tamper_weights:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return httpx.Response(
            200,
            content=data,
            headers={"ETag": f'"{sha256_bytes(self.weights[version])}"'},
        )
