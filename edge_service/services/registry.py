"""Local models: weights in the content-addressed blob store, rows in the database.

Every fine-tuned candidate is recorded, deployed or not (a rejected one carries the
reason in its note), so an operator can roll back or forward to any of them; a server
model as received is recorded (source ``base``) when the deploy gate chooses it. One
model at most is active: the one that serves predictions. The last decision (the deploy
gate's, with its structured details, or an operator's activation) is kept in the state
table for ``GET /v1/evaluation``. Base models downloaded from the
server are kept in the blob store only, keyed by their sha256, so a cycle never
downloads the same weights twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

from edge_service.db import EdgeStore
from fedinspect.service import log_event
from fl_core.blobstore import LocalBlobStore
from fl_core.errors import Conflict
from fl_core.model import SplitModel, model_from_bytes, model_to_bytes
from fl_core.schemas import EvalMetrics, Evaluation, LocalModel

log = logging.getLogger("edge_service.registry")

PREVIOUS_KEY = "previous_model_id"
DECISION_KEY = "last_decision"
#: the structured details of the last gate decision: optional fields of ``Evaluation``
GATE_KEY = "last_gate"
BASE_VERSION_META = "fedinspect.base_version"


class ModelRegistry:
    """The edge's models, and the loaded copy of the deployed one."""

    def __init__(self, store: EdgeStore, blobs: LocalBlobStore) -> None:
        self.store = store
        self.blobs = blobs
        self._lock = threading.Lock()
        self._loaded: tuple[int, SplitModel] | None = None
        self._on_deploy: list[Callable[[LocalModel], None]] = []

    def on_deploy(self, listener: Callable[[LocalModel], None]) -> None:
        """Call ``listener(model)`` after each deployment, in the deploying thread (the
        cycle job's, or an operator's request); its failures are logged, never raised:
        the deployment itself has happened."""
        self._on_deploy.append(listener)

    # ------------------------------------------------------------------ base weights

    def base_weights(self, sha256: str, download: Callable[[], bytes]) -> tuple[bytes, int]:
        """Weights with this sha256, from the blob store or ``download()`` (then stored).

        Returns ``(weights, bytes_downloaded)``. ``download`` checks the digest itself.
        """
        if self.blobs.exists(sha256):
            return self.blobs.get(sha256), 0
        data = download()
        self.blobs.put(data)
        return data, len(data)

    # ------------------------------------------------------------------ local models

    def add_candidate(
        self,
        model: SplitModel,
        base_version: int,
        metrics: EvalMetrics,
        note: str = "",
        source: Literal["base", "finetuned"] = "finetuned",
    ) -> LocalModel:
        """Record ``model`` (fine-tuned here, or the server's ``base`` model as received)."""
        data = model_to_bytes(model, {BASE_VERSION_META: str(base_version)})
        sha = self.blobs.put(data)
        return self.store.add_model(
            sha256=sha, base_version=base_version, source=source, metrics=metrics, note=note
        )

    def load(self, model: LocalModel) -> SplitModel:
        return model_from_bytes(self.blobs.get(model.sha256))

    def all_models(self) -> list[LocalModel]:
        return self.store.list_models()

    def deployed(self) -> LocalModel | None:
        return self.store.active_model()

    def deploy(
        self, model_id: int, decision: str, gate: Mapping[str, Any] | None = None
    ) -> LocalModel:
        """Make ``model_id`` the model that serves; remember the one it replaces, and the
        decision (with the gate's details when the deploy gate made it)."""
        with self._lock:
            previous = self.store.set_active(model_id)
            if previous is not None and previous != model_id:
                self.store.set_state(PREVIOUS_KEY, previous)
            self._record(decision, gate)
            self._loaded = None
        log_event(log, "model.deployed", local_model=model_id, decision=decision)
        deployed = self.store.get_model(model_id)
        for listener in self._on_deploy:
            try:
                listener(deployed)
            except Exception as exc:  # a listener prepares; the deployment stands
                log_event(
                    log,
                    "model.deploy_listener_failed",
                    logging.WARNING,
                    local_model=model_id,
                    error=f"{type(exc).__name__}: {exc}",
                )
        return deployed

    def activate(self, model_id: int) -> LocalModel:
        """Operator rollback (or roll forward) to any recorded local model."""
        target = self.store.get_model(model_id)
        current = self.deployed()
        if current is not None and current.id == target.id:
            return target
        if not self.blobs.exists(target.sha256):
            raise Conflict(f"the weights of local model {model_id} are missing on this edge")
        was = f" (was model {current.id})" if current else ""
        return self.deploy(model_id, f"activated by an operator: model {model_id}{was}")

    def record_decision(self, decision: str, gate: Mapping[str, Any] | None = None) -> None:
        """Record a decision that deployed nothing new."""
        self._record(decision, gate)

    def _record(self, decision: str, gate: Mapping[str, Any] | None) -> None:
        self.store.set_state(DECISION_KEY, decision)
        # an operator's decision clears the gate's details: they describe the decision
        self.store.set_state(GATE_KEY, dict(gate) if gate is not None else None)

    def evaluation(self) -> Evaluation:
        deployed = self.deployed()
        previous_id = self.store.get_state(PREVIOUS_KEY)
        previous = None
        if isinstance(previous_id, int) and (deployed is None or previous_id != deployed.id):
            previous = self.store.get_model(previous_id)
        gate = self.store.get_state(GATE_KEY)
        return Evaluation(
            deployed=deployed,
            previous=previous,
            decision=str(self.store.get_state(DECISION_KEY) or ""),
            **(gate if isinstance(gate, dict) else {}),
        )

    def serving_model(self) -> tuple[LocalModel, SplitModel] | None:
        """The deployed model, loaded once and reused until another one is deployed."""
        with self._lock:
            active = self.store.active_model()
            if active is None:
                return None
            if self._loaded is None or self._loaded[0] != active.id:
                self._loaded = (active.id, self.load(active))
            return active, self._loaded[1]


__all__ = ["DECISION_KEY", "GATE_KEY", "PREVIOUS_KEY", "ModelRegistry"]
