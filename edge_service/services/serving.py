"""The deployed model as the engine that serves it: ONNX Runtime, or torch.

The whole model is exported once per deployed model, checked against torch
(:func:`fl_core.onnx_runtime.model_runner`), and its session kept until another model is
deployed or rolled back to. The export is made at deployment, in the deploying thread
(the cycle job, or the operator's activation), so the first prediction does not wait for
it; every call also compares the active model's id with the one the runner was built
for, so a deployment made elsewhere is seen by the next request, never a stale model.

The checked export is written beside the blob store, named by the weights' sha256
(content-addressed, so a rollback to an earlier model finds its file again and a
restarted edge does not export again); a file there serves only after the same check
against torch.

With ``extract_backend = "torch"`` predictions run in torch, and the ONNX file is
exported only when someone downloads it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_service.services.registry import ModelRegistry
from fedinspect.service import log_event
from fl_core.errors import Conflict, NotFound
from fl_core.model import SplitModel
from fl_core.onnx_runtime import (
    Backend,
    ModelRunner,
    OnnxUnavailable,
    model_runner,
    onnx_model_runner,
)
from fl_core.schemas import LocalModel

log = logging.getLogger("edge_service.serving")

NO_MODEL = "no model deployed yet: run a cycle first"


@dataclass(frozen=True)
class Serving:
    """The deployed model, loaded, and the engine that runs it."""

    local: LocalModel
    model: SplitModel
    runner: ModelRunner


class DeployedModel:
    """The deployed model's runner, built once per deployment and reused."""

    def __init__(
        self, registry: ModelRegistry, backend: Backend, threads: int | None, onnx_dir: Path
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.threads = threads
        self.onnx_dir = onnx_dir
        self._lock = threading.Lock()
        self._current: Serving | None = None
        registry.on_deploy(self._prepare)

    def _prepare(self, _model: LocalModel) -> None:
        """At deployment: export and check now, not at the first request."""
        self.serving()

    def _path(self, local: LocalModel) -> Path:
        return self.onnx_dir / f"{local.sha256}.onnx"

    def _cached_bytes(self, local: LocalModel) -> bytes | None:
        path = self._path(local)
        return path.read_bytes() if path.is_file() else None

    def _keep(self, local: LocalModel, data: bytes) -> None:
        """Write the checked export beside the model (atomically: a reader never sees
        half a file)."""
        path = self._path(local)
        if path.is_file():
            return
        self.onnx_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(path)

    def serving(self) -> Serving | None:
        """The deployed model and its runner (None when nothing is deployed). The first
        call after a deployment exports (or reads the kept export) and checks it."""
        loaded = self.registry.serving_model()
        if loaded is None:
            return None
        local, model = loaded
        with self._lock:
            current = self._current
            if current is not None and current.local.id == local.id:
                return current
            cached = self._cached_bytes(local) if self.backend == "onnxruntime" else None
            runner = model_runner(model, self.backend, self.threads, cached)
            if runner.onnx_bytes is not None:
                self._keep(local, runner.onnx_bytes)
            log_event(
                log,
                "serving.ready",
                local_model=local.id,
                backend=runner.backend,
                setup_s=round(runner.setup_s, 2),
                reason=runner.reason,
            )
            self._current = Serving(local, model, runner)
            return self._current

    def onnx(self) -> tuple[LocalModel, bytes]:
        """The deployed model as a checked ONNX file. NotFound when nothing is deployed;
        Conflict when this model cannot be exported (the reason says why)."""
        serving = self.serving()
        if serving is None:
            raise NotFound(NO_MODEL)
        if serving.runner.onnx_bytes is not None:
            return serving.local, serving.runner.onnx_bytes
        # served by torch (asked for, or the export failed): export for the download only
        with self._lock:
            cached = self._cached_bytes(serving.local)
            if cached is not None:
                return serving.local, cached
            try:
                runner = onnx_model_runner(serving.model, self.threads)
            except OnnxUnavailable as exc:
                raise Conflict(f"the deployed model cannot be exported to ONNX: {exc}") from None
            assert runner.onnx_bytes is not None
            self._keep(serving.local, runner.onnx_bytes)
            return serving.local, runner.onnx_bytes


__all__ = ["NO_MODEL", "DeployedModel", "Serving"]
